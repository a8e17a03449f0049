"""SMoA (high-rank structured modulation) fine-tuning for mlx-lm models."""

from .adapters import load_adapter, save_adapter
from .layer import SMoALinear
from .patch import DEFAULT_TARGETS, apply_smoa
from .plan import make_plan

__version__ = "0.1.0"


def load(path_or_hf_repo: str, adapter_path=None, **kwargs):
    """`mlx_lm.load` plus an optional adapter (SMoA, or mlx-lm LoRA/DoRA) -> (model, tokenizer)."""
    from mlx_lm.utils import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(path_or_hf_repo, **kwargs)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    model.eval()
    return model, tokenizer


__all__ = [
    "DEFAULT_TARGETS", "SMoALinear", "apply_smoa", "load", "load_adapter", "make_plan",
    "save_adapter", "__version__",
]
