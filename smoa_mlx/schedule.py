"""The optimizer and its learning-rate schedule, as pure functions of the step count.

The schedule depends only on the optimizer's own `step` counter (part of its
saved state), so a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from .lr_scale import scaled

OPTIMIZERS = ("adamw", "adam")


def cosine_schedule(learning_rate: float, iters: int, warmup: int = 0):
    """Learning rate of update k (0-based): linear warmup, then cosine decay towards 0.

    Unlike `mlx_lm.tuner.utils.build_schedule`, whose warmup starts at 0, the first
    update already uses `learning_rate / warmup`: no update is wasted at lr 0.
    The decay reaches 0 one update after the last (`iters`), so every update moves.
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if not 0 <= warmup < iters:
        raise ValueError(f"warmup must be in [0, iters={iters}), got {warmup}")
    decay_steps = iters - warmup

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = learning_rate * (step + 1) / max(warmup, 1)
        t = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = learning_rate * 0.5 * (1.0 + mx.cos(math.pi * t))
        return mx.where(step < warmup, warm, cosine)

    return schedule


def build_optimizer(name: str, schedule, weight_decay: float = 0.0,
                    step_scales=None) -> optim.Optimizer:
    """AdamW (or Adam) with bias correction, as in PyTorch, so learning rates from
    PyTorch/PEFT recipes (the SMoA authors' 1e-3) mean the same thing here.

    `step_scales` (a tree like the trainable parameters, `lr_scale.step_scales`)
    multiplies each parameter's step."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "adam" and weight_decay:
        raise ValueError("--weight-decay needs --optimizer adamw")
    cls = {"adamw": optim.AdamW, "adam": optim.Adam}[name]
    if step_scales is not None:
        cls = scaled(cls)
    extra = {"weight_decay": weight_decay} if name == "adamw" else {}
    optimizer = cls(learning_rate=schedule, bias_correction=True, **extra)
    if step_scales is not None:
        optimizer.step_scales = step_scales
    return optimizer
