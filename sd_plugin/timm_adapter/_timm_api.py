"""timm's model API on the wrapped model, so timm's own tools work on ``wrap(model)`` as on the plain model.

:class:`TimmApiMixin` is a base of :class:`~sd_plugin.timm_adapter.SelfDistillModel`. What timm's helpers read
(``resolve_data_config``, ``create_optimizer_v2`` with or without ``layer_decay``, ``set_grad_checkpointing``,
``reset_classifier``, ...) is forwarded to the wrapped timm model, with parameter names translated where they name
parameters of the wrapper (``no_weight_decay``, ``group_matcher``) and the exits included where the call concerns
them (``reset_classifier``, ``group_matcher``). Any other public attribute the wrapper lacks is read from the
timm model (as PEFT's wrapped models do).

Names in the wrapper: the timm model's parameters are ``model.<timm name>``, the exits' ``sd_exits.<k>.<name>``
(``named_parameters``). ``state_dict()`` keys drop the ``model.`` level (see ``SelfDistillModel``), so
``pretrained_cfg`` (whose ``classifier`` / ``first_conv`` name state-dict keys) is forwarded unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Sequence, Set, Tuple

import torch
import torch.nn as nn

__all__ = ["TimmApiMixin"]

_MODEL = "model."
_EXITS = "sd_exits."


class TimmApiMixin:
    """The timm model API of a wrapped timm model (a base class of ``SelfDistillModel``; see the module doc).

    ``group_matcher`` puts every exit in the layer-decay group of the stage (or block) it reads its feature from,
    i.e. the group of the deepest layer inside ``exit_points[k].module``: an exit after ``layer2`` of a ResNet
    gets ``layer2``'s last block's learning-rate scale, an exit after ``blocks.5`` of a ViT that of ``blocks.5``.
    """

    # provided by SelfDistillModel
    model: nn.Module
    sd_exits: nn.ModuleList
    num_classes: int
    if TYPE_CHECKING:

        @property
        def exit_points(self) -> Sequence[Any]: ...

        def _tap(self, classifier: bool) -> None: ...

    # unknown attributes ------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """nn.Module's lookup (parameters, buffers, submodules), then the wrapped timm model's public attributes."""
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            # Never forward private names (torch and this class probe them with hasattr) nor before ``model`` exists
            # (during __init__): read the module dict directly, so this cannot recurse.
            modules = self.__dict__.get("_modules")
            inner = modules.get("model") if modules is not None else None
            if name.startswith("_") or inner is None:
                raise
            try:
                return getattr(inner, name)
            except AttributeError:
                raise AttributeError(
                    f"'{type(self).__name__}' object has no attribute '{name}' (nor has the wrapped "
                    f"{type(inner).__name__})"
                ) from None

    # configuration -------------------------------------------------------------------------------------------------
    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """The timm model's ``pretrained_cfg`` (what ``timm.data.resolve_data_config(model=...)`` reads)."""
        return self.model.pretrained_cfg  # type: ignore[return-value]

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: Dict[str, Any]) -> None:
        inner: Any = self.model
        inner.pretrained_cfg = value

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of :attr:`pretrained_cfg`, as in timm."""
        return self.model.default_cfg  # type: ignore[return-value]

    @default_cfg.setter
    def default_cfg(self, value: Dict[str, Any]) -> None:
        inner: Any = self.model
        inner.default_cfg = value

    @property
    def num_features(self) -> int:
        """Width of the timm model's final features (``forward_features`` channels)."""
        return int(self.model.num_features)  # type: ignore[arg-type]

    @property
    def feature_info(self) -> Any:
        """The timm model's ``feature_info``; its module names are relative to ``model`` (as ``exit_points``)."""
        return self.model.feature_info

    # forward pieces --------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> Any:
        """The timm model's ``forward_features`` (no exit runs)."""
        return self.model.forward_features(x)  # type: ignore[operator]

    def forward_head(self, x: Any, pre_logits: bool = False) -> Any:
        """The timm model's ``forward_head`` (the deepest classifier)."""
        return self.model.forward_head(x, pre_logits=pre_logits)  # type: ignore[operator]

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The timm model's ``forward_intermediates`` (indices relative to the timm model's blocks/stages)."""
        return self.model.forward_intermediates(x, *args, **kwargs)  # type: ignore[operator]

    # classifier --------------------------------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        """The deepest classifier (the timm model's own); exit ``k``'s is ``sd_exits[k].fc``."""
        return self.model.get_classifier()  # type: ignore[operator,no-any-return]

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's ``reset_classifier`` on the deepest classifier, and the same number of classes on every exit.

        ``num_classes >= 1``: every exit gets a fresh ``num_classes``-way classifier (its block is kept).
        ``num_classes == 0``: as in timm, no classifier is left: in eval, ``forward`` returns what the timm model
        returns (pooled features; unpooled after ``reset_classifier(0, '')``) and ``predict_exit=k`` exit ``k``'s
        pooled features; training (which distils logits) raises until ``reset_classifier(n)`` gives them back.
        Other arguments (``global_pool``) go to the timm model.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"reset_classifier({num_classes!r}): num_classes must be an int >= 0 (0 removes the classifiers, "
                "as in timm)."
            )
        engine = getattr(self, "exit_engine", None)
        if engine is not None:
            engine.remove()  # now: timm may drop the classifier module its tap sits on (EfficientViT-MSRA)
        try:
            self.model.reset_classifier(num_classes, *args, **kwargs)  # type: ignore[operator]
            for branch in self.sd_exits:
                branch.reset_classifier(num_classes)  # type: ignore[operator]
            self.num_classes = num_classes
        finally:
            if engine is not None:  # taps on the exit points, and on the new classifier's input if there is one
                self._tap(classifier=self.num_classes > 0)

    # optimisation ------------------------------------------------------------------------------------------------
    def no_weight_decay(self) -> Set[str]:
        """The timm model's no-weight-decay names, prefixed with ``model.`` as ``named_parameters`` names them."""
        fn = getattr(self.model, "no_weight_decay", None)
        names = fn() if callable(fn) else set()
        return {_MODEL + n for n in names}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing of the wrapped model; the exits' features keep their gradients."""
        self.model.set_grad_checkpointing(enable)  # type: ignore[operator]

    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        """timm's layer grouping (layer-wise lr decay) of the timm model, with each exit in its stage's group.

        Returns a callable ``name -> (group ordinal,)`` over this module's parameter and module names
        (``model.*`` and ``sd_exits.*``), as ``timm.models.group_parameters`` / ``group_modules`` accept; the
        ordinals are the timm model's own groups (``model.group_matcher(coarse)``, or timm's automatic grouping
        for a model without one), so the number of groups is unchanged.
        """
        from timm.models import group_modules, group_parameters
        from timm.optim import auto_group_layers

        inner = self.model
        if hasattr(inner, "group_matcher"):
            matcher = inner.group_matcher(coarse=coarse)  # type: ignore[operator]
            params: Dict[str, int] = group_parameters(inner, matcher, reverse=True)
            modules: Dict[str, int] = group_modules(inner, matcher, reverse=True)
        else:
            params, modules = auto_group_layers(inner), {}
        exit_groups = [_group_of_module(inner, p.module, params) for p in self.exit_points]

        def ordinal(name: str) -> Tuple[float, ...]:
            if name.startswith(_MODEL):
                rest = name[len(_MODEL) :]
                group = params.get(rest, modules.get(rest))
                return (math.inf,) if group is None else (float(group),)
            if name.startswith(_EXITS):
                index = name[len(_EXITS) :].split(".", 1)[0]
                if index.isdigit() and int(index) < len(exit_groups):
                    return (float(exit_groups[int(index)]),)
            return (math.inf,)

        return ordinal


def _group_of_module(model: nn.Module, module_name: str, groups: Dict[str, int]) -> int:
    """Group of the deepest parameter inside ``module_name``; for a parameter-free module (a tapped activation),
    the deepest group of the parameters registered before it."""
    prefix = module_name + "."
    inside = [g for n, g in groups.items() if n.startswith(prefix)]
    if inside:
        return max(inside)
    deepest = 0
    for name, module in model.named_modules():
        if name == module_name:
            break
        for param_name, _ in module.named_parameters(recurse=False):
            deepest = max(deepest, groups.get(f"{name}.{param_name}" if name else param_name, 0))
    return deepest
