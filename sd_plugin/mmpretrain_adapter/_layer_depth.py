"""Layer-wise lr decay (mmpretrain's ``LearningRateDecayOptimWrapperConstructor``) with the exits at their stage.

``ImageClassifier.get_layer_depth`` asks the backbone, which puts every parameter outside ``backbone.`` at the last
depth (the head's, lr scale 1). An exit (``exit_necks.k.*`` / ``exit_heads.k.*``) reads its feature from a backbone
stage, so it is given that stage's depth instead: the depth of the deepest backbone parameter inside the module it
taps (``exit_points[k].module``), i.e. the learning rate of the layer that produces its input (for a
parameter-free module, the depth the backbone gives its name).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["exit_layer_depth"]

_EXIT_PREFIXES = ("exit_necks.", "exit_heads.")


def exit_layer_depth(classifier: Any, param_name: str) -> Optional[Tuple[int, int]]:
    """(layer depth, number of depths) of an exit parameter of ``classifier``; None for any other parameter."""
    prefix = next((p for p in _EXIT_PREFIXES if param_name.startswith(p)), None)
    if prefix is None:
        return None
    index = param_name[len(prefix) :].split(".", 1)[0]
    if not index.isdigit() or int(index) >= classifier.num_exits:
        return None
    module = classifier.exit_points[int(index)].module
    backbone = classifier.backbone
    inside = [n for n, _ in backbone.named_parameters() if n.startswith(module + ".")]
    if inside:
        return max(backbone.get_layer_depth("backbone." + n, "backbone.") for n in inside)
    try:  # a parameter-free module (e.g. a padding or activation): the depth its name gives
        return backbone.get_layer_depth(f"backbone.{module}.weight", "backbone.")
    except (ValueError, IndexError, KeyError, NotImplementedError):
        return None
