"""Token batches: `Batcher`, length-sorted padded batches as a pure function of (seed,
step), so a resumed run only needs the step to continue on the exact same data."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, DataError

PAD_MULTIPLE = 8


class Batcher:
    """Length-sorted, padded batches as a pure function of (seed, step).

    Examples are sorted by length and cut into groups of `batch_size * world_size`;
    each epoch visits every group once in an order drawn from
    `np.random.default_rng((seed, epoch))`, and rank r takes rows r, r + world_size, ...
    of the group. When the examples do not divide evenly, the group of the shortest
    ones is filled with empty rows (mask 0), so each epoch covers every example exactly
    once and every batch has the same number of rows. `max_seq_length` bounds the
    positions the model sees: an example keeps at most `max_seq_length + 1` tokens.
    """

    def __init__(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or max_seq_length < 1:
            raise ConfigError(f"batch_size ({batch_size}) and max_seq_length ({max_seq_length}) "
                             "must be at least 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        size = batch_size * world_size
        if size > len(examples):
            workers = f" x {world_size} workers" if world_size > 1 else ""
            raise DataError(f"batch size {batch_size}{workers} needs at least {size} examples, "
                             f"but the dataset has only {len(examples)}")
        self.examples = list(examples)
        self.batch_size, self.max_seq_length, self.seed = batch_size, max_seq_length, seed
        self.rank, self.world_size = rank, world_size
        order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i].tokens))
        short = len(order) % size or size
        order = order[:short] + [-1] * (size - short) + order[short:]
        self._groups = [order[i:i + size] for i in range(0, len(order), size)]
        self.num_batches = len(self._groups)
        self.truncated = sum(len(e.tokens) - 1 > max_seq_length for e in self.examples)
        # Examples whose whole completion is cut away: they add no loss tokens.
        self.fully_masked = sum(e.prompt_len > max_seq_length for e in self.examples)
        self._epoch, self._perm = None, None

    def group(self, step: int) -> list[int]:
        """Example indices of the global batch at `step` (-1 = an empty row)."""
        epoch, i = divmod(step, self.num_batches)
        if epoch != self._epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_batches)
            self._epoch = epoch
        return self._groups[self._perm[i]]

    def batch(self, step: int) -> tuple[mx.array, mx.array, mx.array]:
        """(inputs, targets, mask), each (batch_size, L): this rank's rows of the step's batch."""
        group = self.group(step)
        rows = [self.examples[i] if i >= 0 else None for i in group[self.rank::self.world_size]]
        return self._arrays(rows, self._width(group))

    def _width(self, group) -> int:
        longest = max(min(len(self.examples[i].tokens) - 1, self.max_seq_length)
                      for i in group if i >= 0)
        return min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, self.max_seq_length)

    def _arrays(self, rows, width: int) -> tuple[mx.array, mx.array, mx.array]:
        """Padded (inputs, targets, mask) of `Example`s (None: an empty row)."""
        inputs = np.zeros((len(rows), width), np.int32)
        targets = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.float32)
        for r, example in enumerate(rows):
            if example is None:
                continue
            tokens = example.tokens[: self.max_seq_length + 1]
            n = len(tokens) - 1
            inputs[r, :n] = tokens[:-1]
            targets[r, :n] = tokens[1:]
            # targets[j] is tokens[j + 1]: in the loss when j + 1 >= prompt_len.
            mask[r, max(example.prompt_len - 1, 0):n] = 1.0
        return mx.array(inputs), mx.array(targets), mx.array(mask)

    def eval_batches(self, num_batches: int = -1):
        """The first `num_batches` batches (all when -1) of epoch 0's order: fixed, and a
        mix of lengths (the sorted order would only sample the shortest examples)."""
        n = self.num_batches if num_batches < 0 else min(num_batches, self.num_batches)
        for step in range(n):
            yield self.batch(step)


class PairBatcher(Batcher):
    """Batches of preference `Pair`s, grouped and ordered exactly as `Batcher` groups
    examples (by the longer reply): (inputs, targets, mask) of 2 * batch_size rows, the
    chosen sequences then the rejected ones at one width, so one forward pass scores
    both (row i and row batch_size + i are one pair)."""

    def batch(self, step: int) -> tuple[mx.array, mx.array, mx.array]:
        group = self.group(step)
        pairs = [self.examples[i] if i >= 0 else None for i in group[self.rank::self.world_size]]
        rows = [p and p.chosen for p in pairs] + [p and p.rejected for p in pairs]
        return self._arrays(rows, self._width(group))
