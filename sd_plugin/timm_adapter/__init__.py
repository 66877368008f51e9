"""timm adapter: :func:`wrap` attaches self-distillation exits to any timm classifier, :func:`unwrap` removes them."""

from .model import ExitBranch, SelfDistillModel, unwrap, wrap

__all__ = ["wrap", "unwrap", "SelfDistillModel", "ExitBranch"]
