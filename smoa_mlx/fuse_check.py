"""Did fusing keep the adapter? (mlx-lm #1564: re-quantizing a fused quantized base can round
the update away.) Logits on a few tokens, before and after fusing, against the bare base."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

PROBE = "Once upon a time, the quick brown fox answered: 2 + 3 = 5."
MIN_KEPT = 0.5  # below this share of the adapter's effect, suggest --de-quantize


def _logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([tokens])).astype(mx.float32), np.float64)


class FuseCheck:
    """Logits of the adapted model and of its bare base, taken before `fuse_layers`."""

    def __init__(self, model, tokenizer, max_tokens: int = 16):
        self.tokens = list(tokenizer.encode(PROBE))[:max_tokens]
        self.adapted = _logits(model, self.tokens)
        layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten([(n, m.linear) for n, m in layers]))
        try:
            self.base = _logits(model, self.tokens)
        finally:
            model.update_modules(tree_unflatten(layers))

    def measure(self, fused_model) -> dict:
        """max |fused - unfused|, the adapter's own effect max |unfused - base|, and the share
        of that effect the fused model keeps: 1 - ||fused - unfused|| / ||unfused - base||."""
        fused = _logits(fused_model, self.tokens)
        effect = float(np.linalg.norm(self.adapted - self.base))
        err = float(np.linalg.norm(fused - self.adapted))
        return {"tokens": len(self.tokens), "max_abs_diff": float(np.abs(fused - self.adapted).max()),
                "adapter_effect": float(np.abs(self.adapted - self.base).max()),
                "kept": 1.0 - err / effect if effect > 0 else None}


def describe(result: dict, requantized: bool) -> tuple[str, bool]:
    """(the line to print, whether it is a warning)."""
    kept = result["kept"]
    line = (f"fuse check on {result['tokens']} tokens: fused vs unfused logits max |diff| "
            f"{result['max_abs_diff']:.3g}; the adapter moves them by up to {result['adapter_effect']:.3g}")
    if kept is None:
        return line + " (the adapter changes nothing)", False
    line += f"; {kept:.0%} of its effect kept"
    if kept < MIN_KEPT:
        hint = (" Re-quantizing rounded the update away: fuse again with --de-quantize."
                if requantized else "")
        return f"warning: {line}.{hint}", True
    return line, False
