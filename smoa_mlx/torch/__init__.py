"""Optional PyTorch side: apply an exported `smoa` adapter to a transformers model, unmerged.

Needs the `torch` extra. Training, chat and generation never import this package.
"""

from .smoa import SMoALinear, apply_adapter, merge_and_unload

__all__ = ["SMoALinear", "apply_adapter", "merge_and_unload"]
