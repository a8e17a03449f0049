"""Training modes: what a batch is and what loss it gives, as one object the loop takes.

`trainer.Loop` knows nothing of supervised fine-tuning: it asks its mode for batchers
(`batcher`, a pure function of (seed, step) like `data.Batcher`, so resume stays exact)
and for the loss of a batch (`loss(model, *batch) -> (mean loss, weight)`: the loop
accumulates gradients, reports and validates weighted by `weight`). A new mode (DPO,
ORPO: batches of chosen/rejected pairs, a preference loss) is a new class here, not a
branch through the loop. The loop reports the loss alone: metrics beyond it (DPO's
reward margins) would be a third output of `loss`, summed like it by the step and kept
in the training state's report window.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from .data import Batcher


class Mode(Protocol):
    def batcher(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                rank: int = 0, world_size: int = 1): ...

    def loss(self, model: nn.Module, *batch) -> tuple[mx.array, mx.array]: ...


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Masked mean cross-entropy over the `mask` tokens, and their count.

    A batch without loss tokens (every completion truncated away) gives 0, not NaN.
    """
    logits = model(inputs)
    ntoks = mask.sum()
    ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
    return ce / mx.maximum(ntoks, 1), ntoks


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on the completion tokens of
    `data.Example`s (the prompt masked when the example says so)."""

    def batcher(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> Batcher:
        return Batcher(examples, batch_size, max_seq_length, seed=seed, rank=rank,
                       world_size=world_size)

    loss = staticmethod(loss_fn)
