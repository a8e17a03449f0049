"""Data-parallel training over processes and Macs, on MLX's own distributed layer.

`mlx.launch` starts one process per rank (ring backend over TCP, or MPI); here each
process learns its place in the group (`Distributed.init`), checks that every rank
set up the same run (`check_agreement`), and wraps every collective in a watchdog:
a peer that dies closes its sockets and the ring backend fails at once, but a peer
that hangs (stopped, swapping, cut off the network, or a hang inside MLX's ring
itself, ml-explore/mlx#4475) would block the others forever, so a rank that waits
longer than the timeout exits with an error instead, and the run resumes from its
last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import ConfigError, SMoAError

SAME_RUN = "every process must run the same command on the same model, data and checkpoint"
_INT31 = 2**31 - 1  # counts and digests are exchanged as int32
_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE")  # mpirun, nccl


class Watchdog:
    """Exits the process when one `guard`ed wait lasts longer than `timeout` seconds."""

    def __init__(self, timeout: float, rank: str):
        self.timeout, self.rank = timeout, rank
        self._cond = threading.Condition()
        self._deadline, self._what, self._thread = None, None, None

    @contextmanager
    def guard(self, what: str):
        if self.timeout <= 0:
            yield
            return
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True)
                self._thread.start()
            self._deadline, self._what = time.monotonic() + self.timeout, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                elif (left := self._deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                else:
                    # The main thread is stuck inside MLX: no exception can reach it.
                    os.write(2, _no_answer(self.rank, self.timeout, self._what).encode())
                    os._exit(1)


class Distributed:
    """This process's rank in the group, and the few collectives the trainer needs.

    With one process `wait` and `any` do nothing (no thread, no communication); `sum`
    and `check_agreement` are for groups of several.
    """

    def __init__(self, group, timeout: float):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.watchdog = Watchdog(timeout if self.size > 1 else 0, str(self.rank))

    @classmethod
    def init(cls, timeout: float) -> "Distributed":
        """`mx.distributed.init()`, bounded by `timeout` when a launcher started us: the
        ring backend waits for every peer to connect, forever if one never comes."""
        rank = os.environ.get("MLX_RANK")  # set by mlx.launch (ring, jaccl, nccl)
        with _sentinel(timeout if rank else 0, _no_answer(rank, timeout, "the first connection")):
            try:
                group = mx.distributed.init()
            except RuntimeError as e:
                raise ConfigError(f"cannot start MLX distributed training ({e})") from None
        # Without its backend (say, MPI not found) MLX quietly gives every process a group
        # of its own, and each would train alone and write the same files.
        launched = max([int(os.environ.get(v, 1)) for v in _WORLD_SIZE_VARS])
        if group.size() == 1 and launched > 1:
            raise ConfigError(f"launched as one of {launched} processes, but MLX started no "
                             "distributed backend (is MPI installed where MLX looks for it?)")
        return cls(group, timeout)

    @property
    def main(self) -> bool:
        """Rank 0 logs, evaluates to the console and writes every file."""
        return self.rank == 0

    @contextmanager
    def wait(self, what: str):
        """Around the evaluation of a collective: watched, and a lost peer is one clear line."""
        with self.watchdog.guard(what):
            try:
                yield
            except RuntimeError as e:
                if self.size == 1:
                    raise
                raise SMoAError(
                    f"rank {self.rank}: {what} failed, a process of the group stopped "
                    f"({str(e).strip()}); resume from the last checkpoint with --resume"
                ) from None

    def sum(self, values: list, what: str) -> list[float]:
        """Sum scalars over the ranks (one small all_sum)."""
        total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group,
                                       stream=mx.cpu)
        with self.wait(what):
            mx.eval(total)
        return total.tolist()

    def any(self, flag: bool, what: str) -> bool:
        """True on every rank when it is true on one (so all ranks stop at the same update)."""
        return self.sum([float(flag)], what)[0] > 0 if self.size > 1 else flag

    def check_agreement(self, shown: dict[str, int], hashed: dict[str, object]) -> None:
        """A one-line ValueError, on every rank, when the ranks' values differ.

        `shown` are small counts, printed per rank in the error; `hashed` are options
        and fingerprints, compared by a digest.
        """
        local = encode(shown, hashed)
        table = mx.distributed.all_gather(mx.array(local), group=self.group, stream=mx.cpu)
        with self.wait("checking that every process set up the same run"):
            mx.eval(table)
        error = disagreement(shown, hashed, np.array(table).reshape(self.size, -1))
        if error:
            raise ConfigError(error)

    @contextmanager
    def quiet(self):
        """Only rank 0 prints progress (errors still reach stderr from every rank)."""
        if self.main:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _no_answer(rank, timeout: float, what: str) -> str:
    return (f"error: rank {rank}: no answer from the other processes for {timeout:g} s in "
            f"{what}; one of them died or hangs (raise --distributed-timeout if a process "
            "is just slower)\n")


_SENTINEL = ("import os, sys, time; time.sleep(float(sys.argv[1])); "
             "os.write(2, sys.argv[2].encode()); os.kill(int(sys.argv[3]), 9)")


@contextmanager
def _sentinel(timeout: float, message: str):
    """Kill this process with `message` unless the block ends within `timeout` seconds.

    A child process, not a thread: `mx.distributed.init` holds the GIL while it waits.
    """
    if timeout <= 0:
        yield
        return
    child = subprocess.Popen([sys.executable, "-c", _SENTINEL, str(timeout), message,
                              str(os.getpid())], stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        child.kill()
        child.wait()


def digest(*parts) -> int:
    """A 31-bit digest of JSON-able values, strings or bytes (fits the exchanged int32)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return int.from_bytes(h.digest()[:4], "little") & _INT31


def array_digest(tensors: dict[str, mx.array]) -> int:
    """Every byte of every tensor: two ranks agree only on bit-identical state."""
    parts = []
    for name, value in sorted(tree_flatten(tensors), key=lambda kv: kv[0]):
        parts += [name, str(value.dtype), list(value.shape),
                  np.array(value.reshape(-1).view(mx.uint8)).tobytes()]
    return digest(*parts)


def model_digest(model) -> int:
    """The model's config, its parameters' names, shapes and dtypes, and a fixed sample of
    16 entries each (a different checkpoint of the same architecture differs there)."""
    config = vars(model.args) if hasattr(model, "args") else {}
    parts = [{k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list,
                                                                 dict, type(None)))}]
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = value.reshape(-1)
        idx = np.random.default_rng(flat.size).integers(0, flat.size, 16).astype(np.uint32)
        sample = np.array(flat[mx.array(idx)].view(mx.uint8)).tobytes()
        parts += [name, str(value.dtype), list(value.shape), sample]
    return digest(*parts)


def encode(shown: dict[str, int], hashed: dict[str, object]) -> np.ndarray:
    """One rank's row of the agreement table: the counts, then the digests."""
    values = [int(v) for v in shown.values()] + [digest(v) for v in hashed.values()]
    return np.array(values, dtype=np.int32)


def _ranks(ranks) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def disagreement(shown: dict[str, int], hashed: dict[str, object],
                 table: np.ndarray) -> str | None:
    """The error naming every item the ranks (rows of `table`) disagree on, or None."""
    problems = []
    for j, name in enumerate(list(shown) + list(hashed)):
        groups: dict[int, list[int]] = {}
        for r, v in enumerate(table[:, j].tolist()):
            groups.setdefault(v, []).append(r)
        if len(groups) == 1:
            continue
        if name in shown:
            problems.append(f"{name} ({' vs '.join(f'{_ranks(rs)}: {v}' for v, rs in groups.items())})")
        else:
            problems.append(f"{name} ({' vs '.join(_ranks(rs) for rs in groups.values())})")
    if not problems:
        return None
    return f"the {len(table)} processes disagree on {'; '.join(problems)}: {SAME_RUN}"


def data_digest(examples) -> int:
    """Every token and prompt length of a split (tokenized data, so tokenizers are compared
    too); of a preference pair, both of its sequences."""
    examples = [x for e in examples for x in ((e.chosen, e.rejected) if hasattr(e, "chosen") else (e,))]
    lengths = np.array([(len(e.tokens), e.prompt_len) for e in examples], np.int64)
    tokens = np.fromiter((t for e in examples for t in e.tokens), np.int64)
    return digest(lengths.tobytes(), tokens.tobytes())
