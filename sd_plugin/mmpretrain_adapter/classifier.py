"""``SelfDistillClassifier``: an ImageClassifier with self-distillation exits."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.structures import DataSample

from sd_plugin._checks import check_class_labels, check_finite_input
from sd_plugin.core import ExitPoint, SelfDistillConfig, SelfDistillOutput
from sd_plugin.core.engine import ExitEngine

from ..registry import MODELS
from ._discovery import discover_exits, plain_backprop_for_exits
from ._early_exit_infer import early_exit_logits, exit_scores_requested, parse_early_exit
from ._head_calls import HeadOutput, deepest_head_loss, given_loss, head_loss, plain_logits, run_head
from ._heads import check_head, is_multi_label, plan_exit_heads, targets_of
from ._layer_depth import exit_layer_depth
from .distill_loss import SelfDistillLoss
from .exit_neck import SelfDistillExitNeck

__all__ = ["SelfDistillClassifier", "EXIT_SCORES"]

#: Field of a validation/test DataSample holding every exit's softmax scores,
#: a (num_exits + 1, num_classes) tensor, shallowest exit first, deepest last.
EXIT_SCORES = "exit_scores"


@MODELS.register_module()
class SelfDistillClassifier(ImageClassifier):
    """An :class:`~mmpretrain.models.ImageClassifier` trained with teacher-free self-distillation (BYOT).

    Takes any supervised ``ImageClassifier`` config unchanged (backbone, neck,
    head, data preprocessor, Mixup/CutMix ``train_cfg``). Exits are placed
    automatically after every backbone stage but the last (after the blocks at
    1/4, 2/4, 3/4 of a plain ViT/DeiT); each one is a
    :class:`SelfDistillExitNeck` followed by a copy of the user's head (same
    type and loss, ``in_channels`` set to the measured width the deepest head
    receives); a head that cannot be copied that way gets a ``LinearClsHead``
    with its loss, and a ``ClsHead`` whose logits come from the backbone a
    Linear to the logits with its loss (``exit_head_kind`` says which; see
    ``_heads``). Features are read
    through forward hooks: the backbone config (``out_indices`` ...) is not touched.

    Parameter names: the model's own keep theirs (``backbone.*``, ``neck.*``, ``head.*``), so the config's
    ``optim_wrapper.paramwise_cfg`` gives them exactly what it gives them in an ``ImageClassifier``. The exits
    are ``exit_necks.*`` and ``exit_heads.*``; mmengine matches ``custom_keys`` as substrings, so a ``'head'`` key
    (e.g. a fine-tuning recipe's ``lr_mult=10`` for the new classifier) also applies to the exit heads, on purpose:
    they are copies of the head trained from scratch like it; a ``'neck'`` key applies to the exit necks. Keys
    ``'exit_heads'`` / ``'exit_necks'`` (longer keys win) set the exits apart, e.g. ``lr_mult=1.0`` to opt out.

    ``mode='loss'`` returns ``loss_ce`` (deepest head, its own loss) and
    ``exit{k}_loss_ce`` / ``exit{k}_loss_kd`` / ``exit{k}_loss_hint`` for every
    exit (k = 1 is the shallowest). ``mode='predict'``/``'tensor'`` run the
    deepest classifier only (no exit is computed) unless ``predict_exit`` says
    otherwise. In the Runner's validation and test loops (``val_step`` /
    ``test_step``) every exit's softmax scores are attached to each DataSample as
    ``exit_scores`` ((num_exits + 1, num_classes), deepest last) when a metric
    reads them (:class:`MultiExitAccuracy`); with MMPretrain's ``Accuracy``, the
    ``ImageClassificationInferencer`` and ``predict`` no exit runs.

    Multi-label heads (``MultiLabelClsHead``, ``MultiLabelLinearClsHead``, ``CSRAClsHead``) work the same way,
    with a binary KL per class as the KD term and the head's sigmoid and threshold for exit predictions
    (per-exit mAP: :class:`MultiExitAveragePrecision`). A RevViT backbone is switched to plain backprop
    (logged), so the exits' losses reach its layers.

    Args:
        backbone: As for ``ImageClassifier``.
        neck: As for ``ImageClassifier``.
        head: As for ``ImageClassifier``.
        pretrained: As for ``ImageClassifier``.
        train_cfg: As for ``ImageClassifier``.
        data_preprocessor: As for ``ImageClassifier``.
        init_cfg: As for ``ImageClassifier``.
        stage_modules: Dotted names (relative to the backbone) of its main-path
            stage modules, for a backbone whose stages are not found
            automatically. Each one's output must feed the next.
        probe_size: Input size of the probe forward pass that measures channels
            and strides (default: the backbone's ``img_size``, else 224).
        eval_exits: Attach every exit's scores in ``val_step``/``test_step`` when a metric
            reads them (``MultiExitAccuracy``); False: never.
        early_exit: Early-exit inference for ``predict``/``'tensor'`` (the inferencer, ``tools/test.py``):
            ``dict(policy='policy.json')`` (a file written by ``ExitPolicy.save``) or
            ``dict(thresholds=[...], criterion='max_prob')``; each sample is answered by the first exit
            whose confidence clears its threshold (see ``sd_plugin.deploy.EarlyExitModel``). Overrides
            ``predict_exit``. None (default): no early exit.
        **options: The fields of :class:`sd_plugin.core.SelfDistillConfig`
            (``exit_indices``, ``temperature``, ``ce_weight``, ``kd_weight``,
            ``hint_weight``, ``deepest_weight``, ``exit_hidden_ratio``,
            ``predict_exit``), validated by it.

    Example:
        >>> _base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
        >>> custom_imports = dict(imports=['sd_plugin'], allow_failed_imports=False)
        >>> model = dict(type='SelfDistillClassifier')
    """

    #: State-dict key prefixes of the exits (what ``sd_plugin.deploy.strip`` drops to give the plain model).
    exit_state_prefixes: Tuple[str, ...] = ("exit_necks.", "exit_heads.", "distill_loss.")

    def __init__(
        self,
        backbone: dict,
        neck: Optional[dict] = None,
        head: Optional[dict] = None,
        pretrained: Optional[str] = None,
        train_cfg: Optional[dict] = None,
        data_preprocessor: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
        stage_modules: Optional[Sequence[str]] = None,
        probe_size: Optional[Union[int, Sequence[int]]] = None,
        eval_exits: bool = True,
        early_exit: Optional[dict] = None,
        **options: Any,
    ) -> None:
        known = SelfDistillConfig.option_names()
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise TypeError(
                f"SelfDistillClassifier got unexpected options {unknown}. It takes an ImageClassifier config "
                "(backbone, neck, head, train_cfg, data_preprocessor) plus the self-distillation options "
                f"{list(known)}, stage_modules, probe_size, eval_exits and early_exit. Self-supervised algorithm "
                "configs (MoCo, SimCLR, BYOL, MAE, ...) are not supported: use a supervised classification config."
            )
        self.sd_config = SelfDistillConfig(**options)
        head_cfg = head
        super().__init__(
            backbone=backbone,
            neck=neck,
            head=head,
            pretrained=pretrained,
            train_cfg=train_cfg,
            data_preprocessor=data_preprocessor,
            init_cfg=init_cfg,
        )
        check_head(self.head, head_cfg)
        #: A multi-label head (MultiLabelClsHead family): a sigmoid per class, distilled with a binary KL per class.
        self.multi_label = is_multi_label(self.head)
        if early_exit is not None:
            from sd_plugin.deploy.early_exit import single_label

            single_label(self, "early_exit")  # fail at build time, not at the first prediction
        plain_backprop_for_exits(self.backbone)  # RevViT: its layers' outputs must carry gradients for the exits
        self.eval_exits = bool(eval_exits)
        self._attach_exit_scores = False
        self.distill_loss = SelfDistillLoss(config=self.sd_config)
        points, self.num_positions, head_probe = discover_exits(self, stage_modules, probe_size)
        self._exit_points: Tuple[ExitPoint, ...] = tuple(points)
        #: The taps on the backbone's exit points (sd_plugin.core.engine): one per exit, per-thread sessions.
        self.exit_engine = ExitEngine(self.backbone, self._exit_points)
        plan = plan_exit_heads(self.head, head_cfg, head_probe, [p.channels for p in points])  # type: ignore
        #: How the exits classify (see ``_heads``): 'copy' of the head, 'linear' or 'logits'.
        self.exit_head_kind = plan.kind
        self._num_classes = plan.num_classes
        self.exit_necks = nn.ModuleList(
            SelfDistillExitNeck(p.channels, plan.width, p.fmt, p.stride, self.sd_config.exit_hidden_ratio)
            for p in points
        )
        self.exit_heads = nn.ModuleList(plan.build() for _ in points)
        self._early_exit = parse_early_exit(early_exit, self.num_exits)
        self.register_load_state_dict_post_hook(_log_fresh_exits)
        p = self.sd_config.predict_exit
        if isinstance(p, int) and p > self.num_exits + 1:
            raise ValueError(
                f"predict_exit={p} but this model has {self.num_exits} exits (1..{self.num_exits}) and the deepest "
                f"classifier ({self.num_exits + 1}); choose one of those, 'deepest' or 'ensemble'."
            )

    # ------------------------------------------------------ MultiExitModel
    @property
    def exit_points(self) -> Sequence[ExitPoint]:
        """Where each exit reads its feature, relative to :meth:`tapped_module` (the backbone)."""
        return self._exit_points

    @property
    def num_exits(self) -> int:
        return len(self._exit_points)

    def tapped_module(self) -> nn.Module:
        return self.backbone

    def forward_deepest(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the deepest classifier (the unmodified model), (N, num_classes)."""
        return plain_logits(self.head, self.head(self.extract_feat(inputs)))  # type: ignore[misc,arg-type]

    def forward_exit(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``k`` (0-based, shallowest first) from its tapped feature."""
        self._check_exit_index(k)
        head = self.exit_heads[k]
        # A plain call (nothing recorded, nothing patched): safe from many threads at once.
        return plain_logits(head, head(self.exit_necks[k](feature)))

    def _check_exit_index(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_exits:
            raise ValueError(f"exit index k={k!r} is out of range: this model has exits 0..{self.num_exits - 1}.")

    def _run_exit(self, k: int, feature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_exit_index(k)
        return run_head(self.exit_heads[k], self.exit_necks[k](feature))

    # --------------------------------------------------------------- train
    def get_layer_depth(self, param_name: str) -> Tuple[int, int]:
        """mmpretrain's layer-wise lr decay: the backbone's depths; each exit at the depth of the stage it reads."""
        depth = exit_layer_depth(self, param_name)
        return depth if depth is not None else super().get_layer_depth(param_name)

    def set_distill_scale(self, scale: float) -> None:
        """Scale the KD and hint weights (used by :class:`DistillWeightWarmupHook`)."""
        self.distill_loss.set_distill_scale(scale)

    def _tapped_forward(self, inputs: torch.Tensor) -> Tuple[Any, List[torch.Tensor]]:
        """The backbone/neck output and every exit point's feature (shallowest first), from one forward pass."""
        with self.exit_engine.capture() as cap:
            feats = self.extract_feat(inputs)
        if self.training:
            self.exit_engine.check_gradients(cap.features)
        return feats, cap.features

    def _output(self, deepest: HeadOutput, exits: Sequence[HeadOutput]) -> SelfDistillOutput:
        logits, pre = deepest.logits, deepest.features
        for k, e in enumerate(exits, 1):
            if e.logits.shape != logits.shape or e.features.shape != pre.shape:
                raise ValueError(
                    f"exit {k} gives logits {tuple(e.logits.shape)} and features {tuple(e.features.shape)}, the "
                    f"deepest head {tuple(logits.shape)} and {tuple(pre.shape)}; they must match exactly."
                )
        exit_logits, exit_features = [e.logits for e in exits], [e.features for e in exits]
        return SelfDistillOutput(logits, pre, exit_logits, exit_features, multi_label=self.multi_label)

    def _forward_all(self, inputs: torch.Tensor) -> Tuple[Any, SelfDistillOutput]:
        feats, tapped = self._tapped_forward(inputs)
        deepest = HeadOutput(*run_head(self.head, feats))  # type: ignore[arg-type]
        exits = [HeadOutput(*self._run_exit(k, f)) for k, f in enumerate(tapped)]
        return feats, self._output(deepest, exits)

    def loss(self, inputs: torch.Tensor, data_samples: List[DataSample]) -> dict:
        """Deepest head loss plus every exit's CE, KD and hint terms (see the class docstring).

        ``loss_ce`` is exactly the user's ``head.loss(feats, data_samples)``
        (times ``deepest_weight``, 1 by default), computed once; each exit's
        label loss is its own head's ``loss()`` on the exit features, times
        ``ce_weight``. KD and hint use every head's plain logits (no margin) and
        ``pre_logits`` from those same calls.
        """
        check_finite_input(inputs)
        target = targets_of(data_samples, self._num_classes, self.multi_label)
        check_class_labels(target, self._num_classes)
        feats, tapped = self._tapped_forward(inputs)
        deepest = deepest_head_loss(self.head, feats, data_samples)  # type: ignore[arg-type]
        exits = [head_loss(self.exit_heads[k], self.exit_necks[k](f), data_samples) for k, f in enumerate(tapped)]
        out = self._output(deepest, exits)
        losses = self.distill_loss(
            out,
            target.to(out.logits.device),
            ce_fn=given_loss(deepest),
            exit_ce_fns=[given_loss(e) for e in exits],
            sample_index=_sample_indices(data_samples) if self.sd_config.pskd_alpha > 0 else None,
        )
        losses.update(deepest.extras or {})
        return losses

    # ----------------------------------------------------------- inference
    def _exit_only(self, inputs: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of exit ``k`` (0-based); the backbone stops right after the exit's module."""
        feature = self.exit_engine.run_to(k, lambda: self.backbone(inputs))
        return self.forward_exit(k, feature)

    def _selected_logits(self, inputs: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits chosen by ``early_exit`` or ``predict_exit`` when it is not the deepest classifier, else None."""
        if self._early_exit is not None:
            return early_exit_logits(self, inputs, self._early_exit)[0]
        p = self.sd_config.predict_exit
        if isinstance(p, int) and p <= self.num_exits:
            return self._exit_only(inputs, p - 1)
        if p == "ensemble":
            return self._forward_all(inputs)[1].ensemble_logits()
        return None

    def forward(
        self, inputs: torch.Tensor, data_samples: Optional[List[DataSample]] = None, mode: str = "tensor"
    ) -> Any:
        """As ``ImageClassifier.forward``; ``'tensor'`` gives the ``predict_exit`` classifier's logits.

        For ``predict_exit='ensemble'`` the tensor is the log of the mean softmax
        (its softmax is the ensemble's probabilities).
        """
        if mode == "tensor":
            selected = self._selected_logits(inputs)
            if selected is not None:
                return selected
        return super().forward(inputs, data_samples, mode)

    def predict(
        self, inputs: torch.Tensor, data_samples: Optional[List[DataSample]] = None, **kwargs: Any
    ) -> List[DataSample]:
        """Predictions of the ``predict_exit`` classifier; with ``exit_scores`` in the Runner's val/test loops."""
        if not self._attach_exit_scores:
            selected = self._selected_logits(inputs)
            if selected is None:
                return super().predict(inputs, data_samples, **kwargs)
            return self._to_samples(selected, data_samples)
        feats, out = self._forward_all(inputs)
        p = self.sd_config.predict_exit
        if p == "ensemble":
            samples = self._to_samples(out.ensemble_logits(), data_samples)
        elif isinstance(p, int) and p <= self.num_exits:
            samples = self._to_samples(out.exit_logits[p - 1], data_samples)
        else:
            samples = self.head.predict(feats, data_samples, **kwargs)  # type: ignore[union-attr]
        scores = torch.stack([out.probs(lg) for lg in out.all_logits()], dim=1).detach()
        for sample, s in zip(samples, scores):
            sample.set_field(s, EXIT_SCORES, dtype=torch.Tensor)
        return samples

    def _to_samples(self, logits: torch.Tensor, data_samples: Optional[List[DataSample]]) -> List[DataSample]:
        """DataSamples with ``pred_score`` and ``pred_label`` from ``logits``, as the user's head fills them (its own
        post-processing: softmax and arg-max, or a sigmoid per class and its ``thr``/``topk``)."""
        if data_samples is None:
            data_samples = [DataSample() for _ in range(logits.size(0))]
        return list(self.head._get_predictions(logits.detach().float(), data_samples))  # type: ignore

    @contextlib.contextmanager
    def _exit_scores_on(self) -> Iterator[None]:
        self._attach_exit_scores = self.eval_exits and exit_scores_requested()
        try:
            yield
        finally:
            self._attach_exit_scores = False

    def val_step(self, data: Union[tuple, dict, list]) -> list:
        """``ImageClassifier.val_step`` with every exit's scores attached (``eval_exits``)."""
        with self._exit_scores_on():
            return super().val_step(data)

    def test_step(self, data: Union[tuple, dict, list]) -> list:
        """``ImageClassifier.test_step`` with every exit's scores attached (``eval_exits``)."""
        with self._exit_scores_on():
            return super().test_step(data)


def _sample_indices(data_samples: List[DataSample]) -> torch.Tensor:
    """Each data sample's ``sample_idx`` (its index in the data set, set by mmengine's BaseDataset), for PS-KD."""
    missing = [i for i, ds in enumerate(data_samples) if "sample_idx" not in ds]
    if missing:
        raise ValueError(
            "PS-KD (pskd_alpha > 0) needs each data sample's sample_idx: keep 'sample_idx' in PackInputs' meta_keys "
            "(it is there by default)."
        )
    return torch.tensor([int(ds.sample_idx) for ds in data_samples], dtype=torch.long)


def _log_fresh_exits(module: nn.Module, incompatible: Any) -> None:
    """Say so when a checkpoint without exit weights (a plain ImageClassifier's) was loaded."""
    missing = [k for k in incompatible.missing_keys if k.startswith(("exit_necks.", "exit_heads."))]
    if missing:
        print_log(
            f"the checkpoint has no weights for the exits ({len(missing)} tensors under exit_necks./exit_heads. "
            "are missing): the exits start from their initialisation. This is expected when starting from a "
            "plain ImageClassifier checkpoint.",
            logger="current",
            level=logging.WARNING,
        )


@contextlib.contextmanager
def _eval_no_grad(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)
