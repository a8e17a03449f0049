"""SMoA (high-rank structured modulation) fine-tuning for mlx-lm models."""

from .adapters import load_adapter, save_adapter
from .layer import SMoALinear
from .patch import DEFAULT_TARGETS, apply_smoa
from .plan import make_plan

__version__ = "0.1.0"


def load(path_or_hf_repo: str, adapter_path=None, **kwargs):
    """`mlx_lm.load` plus an optional adapter (SMoA, or mlx-lm LoRA/DoRA) -> (model, tokenizer)
    (and the config with `return_config=True`); a bad path is one `ModelError` line."""
    from .loader import load_base

    base = load_base(path_or_hf_repo, adapter_path, **kwargs)
    if kwargs.get("return_config"):
        return base.model, base.tokenizer, base.config
    return base.model, base.tokenizer


__all__ = [
    "DEFAULT_TARGETS", "SMoALinear", "apply_smoa", "load", "load_adapter", "make_plan",
    "save_adapter", "__version__",
]
