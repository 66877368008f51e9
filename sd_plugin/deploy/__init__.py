"""Using the exits after training: early-exit inference, calibration, truncation, stripping, ONNX.

Everything works on any :class:`~sd_plugin.core.MultiExitModel` (``sd_plugin.wrap(...)``,
MMPretrain's ``SelfDistillClassifier``) in plain torch. ``exit_costs`` needs mmengine and
``export_onnx`` needs onnx/onnxruntime; they are imported when called. ``measure_speedup`` times early exit
against the plain model (eager, and on ONNX Runtime when installed).
"""

from .calibrate import ExitLogits, calibrate, collect_exit_logits, evaluate_policy
from .early_exit import EarlyExitModel, EarlyExitOutput, all_exit_logits
from .ensemble import EnsembleModel
from .flops import ExitCosts, exit_costs
from .onnx import check_onnx, export_onnx
from .onnx_cascade import CascadeOutput, OnnxCascade, export_cascade
from .policy import ExitPolicy
from .speed import measure_speedup
from .strip import plain_state_dict, strip_checkpoint, strip_state_dict
from .truncate import TruncatedModel, truncate

__all__ = [
    "EarlyExitModel",
    "EarlyExitOutput",
    "EnsembleModel",
    "all_exit_logits",
    "ExitPolicy",
    "ExitLogits",
    "collect_exit_logits",
    "evaluate_policy",
    "calibrate",
    "ExitCosts",
    "exit_costs",
    "TruncatedModel",
    "truncate",
    "export_onnx",
    "check_onnx",
    "export_cascade",
    "OnnxCascade",
    "CascadeOutput",
    "measure_speedup",
    "strip_state_dict",
    "strip_checkpoint",
    "plain_state_dict",
]
