"""Training modes: what a batch is and what loss it gives, as one object the loop takes.

`trainer.Loop` knows nothing of the method it trains: it asks its mode for batchers
(`batcher`, a pure function of (seed, step) like `data.Batcher`, so resume stays exact)
and for the loss of a batch (`loss(model, *batch) -> (mean loss, weight[, sums])`: the
loop accumulates gradients, reports and validates weighted by `weight`; `sums`, a dict
of the batch's totals named in `sums_keys`, are added up over the report window and
turned into the reported metrics by `metrics(sums)`).
  SFT        next-token cross-entropy on completion tokens (weight: tokens)
  DPO        Rafailov et al.: the reference is the same model with its adapter swapped
             out (`layer.adapters_off`), in the same step (weight: pairs)
  ORPO       Hong et al.: NLL of the chosen reply plus an odds-ratio term, no reference
The preference losses are written as mlx-lm-lora's `dpo_loss` / `orpo_loss` and TRL's
define them, per pair (tests/test_modes.py checks them against float64 NumPy).
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import Batcher, PairBatcher
from .layer import adapters_off

DPO_LOSSES = ("sigmoid", "hinge", "ipo")


class Mode(Protocol):
    record_kind: str  # what `data.load_data` builds: "sft" or "preference"
    sums_keys: tuple  # the totals `loss` returns beside the mean

    def batcher(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                rank: int = 0, world_size: int = 1): ...

    def loss(self, model: nn.Module, *batch) -> tuple: ...

    def metrics(self, sums: dict) -> dict: ...


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

    record_kind, sums_keys = "sft", ()

    def batcher(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> Batcher:
        return Batcher(examples, batch_size, max_seq_length, seed=seed, rank=rank,
                       world_size=world_size)

    loss = staticmethod(loss_fn)

    def metrics(self, sums: dict) -> dict:
        return {}


# ---------------------------------------------------------------- the preference losses


def dpo_losses(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid"):
    """Per-pair DPO losses and the implicit rewards `beta * (log pi - log pi_ref)` of the
    chosen and rejected replies, from the policy's (`pc`, `pr`) and the reference's
    (`rc`, `rr`) reply log-probabilities (summed; token means for "ipo", as TRL)."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, beta * (pc - rc), beta * (pr - rr)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def orpo_losses(lc, lr, beta: float):
    """Per-pair ORPO losses from the mean per-token log-probabilities of the chosen (`lc`)
    and rejected (`lr`) replies: NLL of the chosen minus beta * log sigmoid(log odds
    ratio); rewards `beta * lc`, `beta * lr` (as TRL and mlx-lm-lora)."""
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    return -lc - beta * nn.log_sigmoid(log_odds), beta * lc, beta * lr


def sequence_logps(logits, targets, mask):
    """Each row's summed log-probability of its `mask` tokens, and their count."""
    token = -nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    return token.sum(-1), mask.sum(-1)


def pair_logps(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """The summed reply log-probabilities of the chosen and of the rejected reply of each
    pair in `batches` (`PairBatcher` batches; a pair with no reply token left is dropped).
    Held-out preference accuracy is the share with chosen above rejected; the same under
    `adapters_off` gives the reference, hence DPO's implicit rewards."""
    chosen, rejected = [], []
    for inputs, targets, mask in batches:
        logps, counts = (np.array(x) for x in sequence_logps(model(inputs), targets, mask))
        n = len(logps) // 2
        keep = (counts[:n] > 0) & (counts[n:] > 0)
        chosen.append(logps[:n][keep])
        rejected.append(logps[n:][keep])
    return np.concatenate(chosen), np.concatenate(rejected)


class _Preference:
    """Batches of chosen/rejected pairs (`data.PairBatcher`: the chosen rows, then the
    rejected rows); the mean loss over the pairs of the batch, weighted by their count.
    A pair with no reply tokens left in either sequence (truncated away, or an empty row)
    counts for nothing."""

    record_kind = "preference"
    sums_keys = ("tokens", "correct", "margin", "chosen_reward", "rejected_reward")

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def batcher(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> PairBatcher:
        return PairBatcher(examples, batch_size, max_seq_length, seed=seed, rank=rank,
                           world_size=world_size)

    def loss(self, model, inputs, targets, mask):
        n = inputs.shape[0] // 2
        losses, chosen, rejected, counts = self.pair_losses(model, inputs, targets, mask)
        valid = ((counts[:n] > 0) & (counts[n:] > 0)).astype(mx.float32)
        pairs = valid.sum()
        sums = {"tokens": mask.sum(), "correct": ((chosen > rejected) * valid).sum(),
                "margin": ((chosen - rejected) * valid).sum(),
                "chosen_reward": (chosen * valid).sum(),
                "rejected_reward": (rejected * valid).sum()}
        return (losses * valid).sum() / mx.maximum(pairs, 1), pairs, sums

    def metrics(self, sums: dict) -> dict:
        """Means over the pairs (the loss weight): the share ranked right by the implicit
        rewards (TRL's rewards/accuracies), the reward margin and each reward."""
        pairs = max(sums["weight"], 1)
        return {"reward_accuracy": sums["correct"] / pairs, "reward_margin": sums["margin"] / pairs,
                "chosen_reward": sums["chosen_reward"] / pairs,
                "rejected_reward": sums["rejected_reward"] / pairs}


class DPO(_Preference):
    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid"):
        super().__init__(beta)
        self.loss_type = loss_type

    def pair_losses(self, model, inputs, targets, mask):
        n = inputs.shape[0] // 2
        policy, counts = sequence_logps(model(inputs), targets, mask)
        with adapters_off(model):
            reference = mx.stop_gradient(sequence_logps(model(inputs), targets, mask)[0])
        if self.loss_type == "ipo":
            policy, reference = (x / mx.maximum(counts, 1) for x in (policy, reference))
        losses, chosen, rejected = dpo_losses(policy[:n], policy[n:], reference[:n],
                                              reference[n:], self.beta, self.loss_type)
        return losses, chosen, rejected, counts


class ORPO(_Preference):
    def pair_losses(self, model, inputs, targets, mask):
        n = inputs.shape[0] // 2
        total, counts = sequence_logps(model(inputs), targets, mask)
        mean = total / mx.maximum(counts, 1)
        losses, chosen, rejected = orpo_losses(mean[:n], mean[n:], self.beta)
        return losses, chosen, rejected, counts


def make_mode(args) -> Mode:
    """The mode `--train-mode` names, with its options."""
    if args.train_mode == "dpo":
        return DPO(args.beta, args.dpo_cpo_loss_type)
    if args.train_mode == "orpo":
        return ORPO(args.beta)
    return SFT()
