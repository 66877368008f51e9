"""timm adapter: :func:`wrap` attaches self-distillation exits to any timm classifier, :func:`unwrap` removes them,
:func:`load_exits` reloads an exit set saved with ``SelfDistillModel.save_exits``."""

from .model import ExitBranch, SelfDistillModel, load_exits, unwrap, wrap

__all__ = ["wrap", "unwrap", "load_exits", "SelfDistillModel", "ExitBranch"]
