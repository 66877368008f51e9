"""``wrap`` / ``unwrap``: self-distillation exits on any timm classifier.

The timm model runs its own, unchanged forward; forward hooks (from
:mod:`sd_plugin.core.taps`) read the stage outputs chosen from timm's
``feature_info`` and the input of the model's own classifier (the teacher
features) during that single pass, and the exits are run on them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._checks import check_finite_input
from ..core import ExitPoint, SelfDistillConfig, SelfDistillOutput, build_exit
from ..core.engine import ExitEngine, ProbeError
from ._discovery import default_input_sizes, discover, pool_teacher
from ._saving import load_exits, save_exits
from ._timm_api import TimmApiMixin

__all__ = ["SelfDistillModel", "ExitBranch", "wrap", "unwrap", "load_exits"]

_MODEL = "model."
_EXITS = "sd_exits."


class ExitBranch(nn.Module):
    """One exit: a :func:`~sd_plugin.core.build_exit` block to the deepest width, then a linear classifier
    (``nn.Identity`` after ``reset_classifier(0)``, as timm's own heads)."""

    def __init__(self, point: ExitPoint, feature_dim: int, num_classes: int, hidden_ratio: float) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.block = build_exit(point.fmt, point.channels, feature_dim, point.stride, hidden_ratio)
        self.fc: nn.Module = nn.Linear(feature_dim, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``num_classes``-way classifier on the same block; none (``nn.Identity``) for 0."""
        if num_classes == 0:
            self.fc = nn.Identity()
            return
        ref = next(self.block.parameters())
        self.fc = nn.Linear(self.feature_dim, num_classes, device=ref.device, dtype=ref.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (N, feature_dim) features of the tapped feature ``x``."""
        feats = self.block(x)
        if feats.shape != (x.shape[0], self.feature_dim):
            raise ValueError(
                f"exit features have shape {tuple(feats.shape)}, expected ({x.shape[0]}, {self.feature_dim})."
            )
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _rename(state_dict: Dict[str, Any], prefix: str, add: bool) -> None:
    """Drop (or, with ``add``, restore) the ``model.`` level of the wrapped model's keys, in place, order kept."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix) and not key.startswith(prefix + _EXITS):
            rest = key[len(prefix) :]
            if add:
                key = prefix + _MODEL + rest
            elif rest.startswith(_MODEL):
                key = prefix + rest[len(_MODEL) :]
        state_dict[key] = value


def _state_dict_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    _rename(state_dict, prefix, add=False)


def _load_pre_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    module._sd_load_prefix = prefix  # type: ignore[assignment]
    _rename(state_dict, prefix, add=True)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    prefix = getattr(module, "_sd_load_prefix", "")
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [prefix + k[len(prefix + _MODEL) :] if k.startswith(prefix + _MODEL) else k for k in keys]


class SelfDistillModel(TimmApiMixin, nn.Module):
    """A timm classifier with self-distillation exits (implements :class:`sd_plugin.core.MultiExitModel`).

    Train mode: ``forward(x)`` returns a :class:`~sd_plugin.core.SelfDistillOutput` (every exit's logits and
    pooled features, the model's own logits and the input features of its classifier) from one pass of the
    model. Eval mode: exactly what the wrapped model returns (``predict_exit='deepest'``, the exits do not
    run), the log of the mean softmax of all exits (``'ensemble'``), or exit ``k``'s logits (an int).
    After ``reset_classifier(0)`` it is a feature extractor, as the timm model is (see ``reset_classifier``).

    ``state_dict()`` holds the timm model's own keys unchanged plus the exits under ``sd_exits.``, so a plain
    timm checkpoint loads with ``strict=False`` (only ``sd_exits.*`` missing). Parameter names
    (``named_parameters``) carry a ``model.`` prefix.

    Args:
        model: A timm classifier (``num_classes > 0``).
        config: Self-distillation options; ``None`` uses the paper's defaults.
        input_size: (C, H, W) of the probe forward; ``None`` takes the model's own input size.
    """

    #: State-dict key prefixes of the exits (what ``sd_plugin.deploy.strip`` drops to give the plain model).
    exit_state_prefixes: Tuple[str, ...] = (_EXITS,)

    def __init__(
        self,
        model: nn.Module,
        config: Optional[SelfDistillConfig] = None,
        input_size: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap() needs a timm model (torch.nn.Module), got {type(model).__name__}.")
        if isinstance(model, SelfDistillModel):
            raise TypeError("this model is already wrapped; call wrap() on the plain timm model.")
        if config is not None and not isinstance(config, SelfDistillConfig):
            raise TypeError(f"config must be a SelfDistillConfig, got {type(config).__name__}.")
        self.config = config if config is not None else SelfDistillConfig()
        sizes = [tuple(input_size)] if input_size is not None else default_input_sizes(model)
        for i, size in enumerate(sizes):
            try:
                found = discover(model, self.config, size)
                break
            except ProbeError:
                if i == len(sizes) - 1:
                    raise
        num_exits = len(found.points)
        if isinstance(self.config.predict_exit, int) and self.config.predict_exit > num_exits + 1:
            raise ValueError(
                f"predict_exit={self.config.predict_exit} but the model has {num_exits} exits plus the deepest "
                f"classifier (valid: 1..{num_exits + 1}, 'deepest' or 'ensemble')."
            )
        self.model = model
        self.kind = found.kind
        self.positions: Tuple[str, ...] = found.positions
        self._points: Tuple[ExitPoint, ...] = found.points
        self._teacher = found.teacher
        self.feature_dim = found.feature_dim
        self.num_classes = found.num_classes
        self.input_size: Tuple[int, ...] = size
        self.sd_exits = nn.ModuleList(
            ExitBranch(p, found.feature_dim, found.num_classes, self.config.exit_hidden_ratio) for p in found.points
        )
        param = next(model.parameters(), None)
        if param is not None:
            self.sd_exits.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
        self._tap(classifier=True)
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)

    def _tap(self, classifier: bool) -> None:
        """(Re)build the taps: on the exit points, and on the classifier's input (the teacher) while there is one."""
        #: The taps on the timm model's exit points and classifier input (sd_plugin.core.engine).
        self.exit_engine = ExitEngine(self.model, self._points, extra=[self._teacher] if classifier else [])

    # MultiExitModel -------------------------------------------------------------------------------------------
    @property
    def exit_points(self) -> Tuple[ExitPoint, ...]:
        """Where every exit reads its feature, relative to :meth:`tapped_module`, shallowest first."""
        return self._points

    @property
    def num_exits(self) -> int:
        return len(self._points)

    def tapped_module(self) -> nn.Module:
        """The timm model that :attr:`exit_points` name modules of."""
        return self.model

    def forward_deepest(self, inputs: torch.Tensor) -> torch.Tensor:
        """The timm model's own logits."""
        return self.model(inputs)

    def forward_exit(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``k`` (0-based) from the feature tapped at ``exit_points[k]`` (its pooled features once
        ``reset_classifier(0)`` removed the classifiers)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_exits:
            raise ValueError(f"exit index {k!r} is out of range: this model has exits 0..{self.num_exits - 1}.")
        return self.sd_exits[k](feature)

    # forward ------------------------------------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor) -> SelfDistillOutput:
        """Every exit's and the deepest classifier's logits and features, from one pass of the model."""
        self._require_classifier("forward_train()")
        self.exit_engine.ensure_installed()
        with self.exit_engine.capture() as taps:
            logits = self.model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise TypeError(f"the wrapped model must return (N, num_classes) logits, got {type(logits).__name__}.")
        *feats, teacher = taps.features
        if self.training:
            self.exit_engine.check_gradients(feats)
        features = pool_teacher(teacher, self._teacher.fmt)
        if features.shape != (x.shape[0], self.feature_dim):
            raise ValueError(
                f"classifier input features have shape {tuple(features.shape)}, expected "
                f"({x.shape[0]}, {self.feature_dim}); was the model changed after wrap()?"
            )
        branches: List[ExitBranch] = list(self.sd_exits)  # type: ignore[arg-type]
        exit_feats = [branch.forward_features(f) for branch, f in zip(branches, feats)]
        exit_logits = [branch.fc(f) for branch, f in zip(branches, exit_feats)]
        return SelfDistillOutput(logits=logits, features=features, exit_logits=exit_logits, exit_features=exit_feats)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, SelfDistillOutput]:
        if self.training:
            check_finite_input(x)
            self._require_classifier("training")
            return self.forward_train(x)
        predict = self.config.predict_exit
        if predict == "deepest" or predict == self.num_exits + 1:
            return self.model(x)
        if self.num_classes == 0:  # no classifiers: exit k's pooled features, as timm's forward gives its own
            if predict == "ensemble":
                self._require_classifier("predict_exit='ensemble'")
            k = int(predict) - 1
            self.exit_engine.ensure_installed()
            return self.forward_exit(k, self.exit_engine.run_to(k, lambda: self.model(x)))
        out = self.forward_train(x)
        if predict == "ensemble":
            return out.ensemble_logits()
        return out.all_logits()[int(predict) - 1]

    def _require_classifier(self, what: str) -> None:
        """Raise when ``what`` needs logits and ``reset_classifier(0)`` removed the classifiers."""
        if self.num_classes == 0:
            raise ValueError(
                f"{what} needs the classifiers' logits, but this wrapped model has none: reset_classifier(0) removed "
                "them (num_classes=0). Call reset_classifier(num_classes) with num_classes >= 1 to train, or "
                "sd_plugin.unwrap(model) for timm's plain feature extractor."
            )

    # weights ------------------------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """The original timm model: same keys, same outputs as before wrapping, no hooks left."""
        self.exit_engine.remove()
        return self.model

    def exits_state_dict(self) -> Dict[str, torch.Tensor]:
        """The exits' weights alone (keys as in ``sd_exits``, without the prefix)."""
        return dict(self.sd_exits.state_dict())

    def load_exits_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        """Load weights saved by :meth:`exits_state_dict` (or a full state dict: its ``sd_exits.`` part)."""
        if any(k.startswith(_EXITS) for k in state_dict):
            state_dict = {k[len(_EXITS) :]: v for k, v in state_dict.items() if k.startswith(_EXITS)}
        return self.sd_exits.load_state_dict(state_dict, strict=strict)

    def save_exits(self, directory: Union[str, os.PathLike[str]], safe_serialization: Optional[bool] = None) -> Path:
        """Write the exits' weights and their options to ``directory``; :func:`load_exits` reloads them.

        As PEFT saves an adapter's config beside its weights: ``exits.safetensors`` (``exits.pth``, a plain
        ``torch.save`` state dict, when ``safe_serialization=False`` or safetensors is not installed) and
        ``sd_plugin_config.json`` (the options, the exit points, the timm architecture, ``num_classes``, the probe
        input size and the sd_plugin version). The timm model's own weights are not written.

        Returns:
            The path of ``sd_plugin_config.json``.
        """
        return save_exits(self, directory, safe_serialization)

    def load_model_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        """Load a plain timm checkpoint into the wrapped model (exits untouched)."""
        return self.model.load_state_dict(state_dict, strict=strict)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, exits={[p.module for p in self._points]}, feature_dim={self.feature_dim}"


def wrap(
    model: nn.Module,
    *,
    exit_indices: Optional[Sequence[int]] = None,
    input_size: Optional[Sequence[int]] = None,
    **options: Any,
) -> SelfDistillModel:
    """Attach self-distillation exits to a timm classifier.

    Args:
        model: Any timm classifier, pretrained or not, created with ``num_classes > 0``.
        exit_indices: Where exits go: indices into the model's stage ends (stage-wise models; the last stage is
            the deepest classifier) or blocks (plain ViT-like models), 0-based, negatives from the end. ``None``
            places an exit after every stage but the last, or after the blocks at 1/4, 2/4, 3/4 of the depth.
        input_size: (C, H, W) of the probe forward that finds feature layouts and sizes. ``None`` takes the
            model's own (``patch_embed.img_size``, ``img_size`` or timm's data config).
        **options: The other fields of :class:`sd_plugin.core.SelfDistillConfig` (``temperature=3.0``,
            ``ce_weight=0.7``, ``kd_weight=0.3``, ``hint_weight=0.03``, ``deepest_weight=1.0``,
            ``exit_hidden_ratio=0.25``, ``predict_exit='deepest'``).

    Returns:
        The :class:`SelfDistillModel`; ``.unwrap()`` gives ``model`` back.
    """
    valid = set(SelfDistillConfig.option_names()) - {"exit_indices"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"wrap() got unknown option(s) {unknown}; valid options: {sorted(valid)}.")
    return SelfDistillModel(model, SelfDistillConfig(exit_indices=exit_indices, **options), input_size=input_size)


def unwrap(model: nn.Module) -> nn.Module:
    """The original timm model of a :class:`SelfDistillModel` (also inside DDP or a timm EMA wrapper)."""
    from timm.utils import unwrap_model

    inner: List[nn.Module] = [unwrap_model(model)]
    if not isinstance(inner[0], SelfDistillModel):
        raise TypeError(f"unwrap() needs a model returned by sd_plugin.wrap(), got {type(inner[0]).__name__}.")
    return inner[0].unwrap()
