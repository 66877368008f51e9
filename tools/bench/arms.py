"""Benchmark arms: ``+``-joined components such as ``ce``, ``ls``, ``byot``, ``byot+ls``, ``cskd+ls``, ``byot+zipf``.

``ce`` (plain cross-entropy) stands alone; ``ls`` smooths every label loss by 0.1; ``byot`` adds exits (``byotrms``:
BYOT's hint at batch 128); the methods take their published defaults (:data:`COMPONENTS`); ``mixup`` and ``cutmix`` are
the framework's own batch augments. Methods without ``byot`` run on the same model with no exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

LABEL_SMOOTHING = 0.1
#: Beta(alpha, alpha) mixing of Mixup and CutMix: 1.0 as in the CutMix paper's CIFAR runs and Self-KD-Lib's table.
MIX_ALPHA = 1.0
#: Components that are a batch augment rather than a loss option.
BATCH_AUGMENTS = ("mixup", "cutmix")
#: The arm every other is compared with.
BASELINE_ARM = "ce"
#: Options each component sets on ``SelfDistillConfig`` (the methods' published defaults; see docs/configuration.md).
COMPONENTS: Dict[str, Dict[str, Any]] = {
    "ce": {},
    "ls": {},
    "byot": {},
    "byotrms": {"hint_form": "rms", "hint_weight": 0.34},
    "pskd": {"pskd_alpha": 0.8},
    "cskd": {"cskd_weight": 1.0, "cskd_temperature": 4.0},
    "tfkd": {"tfkd_weight": 0.1, "tfkd_temperature": 20.0},
    "zipf": {"zipf_weight": 0.1, "zipf_power": 1.0},
    "mixup": {},
    "cutmix": {},
}


@dataclass(frozen=True)
class ArmRecipe:
    """What an arm trains: exits or not, label smoothing, and the self-distillation options."""

    name: str
    exits: bool
    label_smoothing: float
    options: Dict[str, Any] = field(default_factory=dict)
    class_pairs: bool = False
    pskd: bool = False
    batch_augment: str = ""  # 'mixup', 'cutmix' or '' (none)

    @property
    def self_distill_model(self) -> bool:
        """Needs the self-distillation model (exits or a method), not the plain one."""
        return self.exits or bool(self.options)


def parse_arm(name: str) -> ArmRecipe:
    """The recipe of an arm name (see the module docstring)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"arm {name!r}: expected '+'-joined components from {sorted(COMPONENTS)} without repeats "
            f"(e.g. byot+ls), got unknown {unknown}."
        )
    if "ce" in parts and len(parts) > 1:
        raise ValueError(f"arm {name!r}: 'ce' is the plain baseline and stands alone; drop it (e.g. 'ls').")
    if "byot" in parts and "byotrms" in parts:
        raise ValueError(f"arm {name!r}: choose one of byot and byotrms.")
    augments = [p for p in parts if p in BATCH_AUGMENTS]
    if len(augments) > 1:
        raise ValueError(f"arm {name!r}: choose one batch augment of {BATCH_AUGMENTS}.")
    options: Dict[str, Any] = {k: v for p in parts for k, v in COMPONENTS[p].items()}
    exits = "byot" in parts or "byotrms" in parts
    if not exits and options:
        options["exit_indices"] = []
    return ArmRecipe(
        name=name,
        exits=exits,
        label_smoothing=LABEL_SMOOTHING if "ls" in parts else 0.0,
        options=options,
        class_pairs="cskd" in parts,
        pskd="pskd" in parts,
        batch_augment=augments[0] if augments else "",
    )


def parse_arms(names: Sequence[str]) -> List[ArmRecipe]:
    """Recipes of ``names`` (no duplicates)."""
    if len(set(names)) != len(names):
        raise ValueError(f"--arms has duplicates: {list(names)}.")
    return [parse_arm(n) for n in names]
