"""Data-parallel training with mx.distributed: two local processes on the ring backend.

Runs go through `mlx.launch`, or, where a test must signal one rank or give the
ranks different arguments, through what `mlx.launch` itself does for the ring
backend: one process per rank with MLX_RANK and a MLX_HOSTFILE of their addresses.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from smoa_mlx import checkpoint, files
from smoa_mlx.distributed import SAME_RUN, Distributed, data_digest, disagreement, encode
from smoa_mlx.train import _batchers, train

LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
TIMEOUT = 240  # a cold MLX kernel cache makes the first distributed step take ~45 s here


def _port_pair() -> int:
    """A base port p with p and p + 1 free (mlx.launch gives rank r the port p + r)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for p in (base, base + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}


def _kill(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def launch(flags, timeout=TIMEOUT):
    """`mlx.launch -n 2 --backend ring -- python -m smoa_mlx.train FLAGS` -> (stdout, stderr).

    mlx.launch exits 0 even when a rank fails, so callers check what the ranks wrote.
    """
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(_port_pair()), "--",
           sys.executable, "-m", "smoa_mlx.train", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"mlx.launch did not finish in {timeout} s")


class Ranks:
    """Rank processes started by hand, each with its own flags, stdout and stderr files."""

    def __init__(self, tmp: Path, flags_per_rank):
        base = _port_pair()
        hostfile = tmp / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(len(flags_per_rank))]))
        self.logs = [(tmp / f"rank{r}.out", tmp / f"rank{r}.err") for r in range(len(flags_per_rank))]
        self.procs = []
        for r, flags in enumerate(flags_per_rank):
            out, err = (open(p, "w") for p in self.logs[r])
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "smoa_mlx.train", *flags], stdout=out, stderr=err,
                env={**_env(), "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                start_new_session=True))
            out.close()
            err.close()

    def wait(self, rank, timeout) -> int:
        try:
            return self.procs[rank].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {rank} still runs after {timeout} s:\n{self.stderr(rank)}")

    def wait_for_steps(self, out: Path, n: int) -> None:
        """Until rank 0 has logged `n` updates (complete lines of metrics.jsonl)."""
        deadline = time.time() + TIMEOUT
        while True:
            path = out / checkpoint.METRICS
            lines = path.read_text().split("\n")[:-1] if path.is_file() else []
            if sum(json.loads(x)["type"] == "train" for x in lines) >= n:
                return
            assert time.time() < deadline and self.procs[0].poll() is None, self.stderr(0) + self.stderr(1)
            time.sleep(0.02)

    def signal(self, rank, sig) -> None:
        os.kill(self.procs[rank].pid, sig)

    def stderr(self, rank) -> str:
        return self.logs[rank][1].read_text()

    def errors(self, rank) -> list[str]:
        return [x for x in self.stderr(rank).splitlines() if x.startswith("error:")]

    def close(self) -> None:
        for p in self.procs:
            _kill(p)


@pytest.fixture
def ranks(tmp_path):
    started = []

    def start(flags_per_rank):
        started.append(Ranks(tmp_path, flags_per_rank))
        return started[-1]

    yield start
    for r in started:
        r.close()


@pytest.fixture(scope="module")
def ring():
    """Skip unless two local processes can all_sum over MLX's ring backend here."""
    if LAUNCH is None or not mx.distributed.is_available():
        pytest.skip("mlx.launch or MLX's distributed backends are not available")
    probe = "import mlx.core as mx; print(mx.distributed.all_sum(mx.array([1.0])).item())"
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(_port_pair()), "--",
           sys.executable, "-c", probe]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    except subprocess.TimeoutExpired:
        pytest.skip("the ring backend did not connect two local processes in 120 s")
    if proc.stdout.split() != ["2.0", "2.0"]:
        pytest.skip(f"the ring backend does not work here: {proc.stderr.strip()[-300:]}")


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Arithmetic text records of varied lengths: train 30 (not a multiple of the global
    batch, so one batch holds empty rows), valid 6, test 6."""
    d = tmp_path_factory.mktemp("arith")
    rng = random.Random(1)
    for split, n in (("train", 30), ("valid", 6), ("test", 6)):
        rows = [{"text": f"Question: what is {a} plus {b}? Answer: The answer is {a + b}." + "!" * (a % 4)}
                for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


# Gradient accumulation, warmup, mid-run validation and saves: everything a rank could
# get out of step on. No dropout: its masks are drawn per process batch, so two processes
# draw other masks than one.
OPTIONS = {"iters": 10, "batch_size": 4, "grad_accumulation_steps": 2, "learning_rate": 5e-2,
           "warmup": 2, "steps_per_report": 1, "steps_per_eval": 5, "save_every": 5,
           "val_batches": -1}


def options(model, data, out, **kw) -> dict:
    return {"model": str(model), "data": str(data), "adapter_path": str(out), **OPTIONS, **kw}


def flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def records(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / checkpoint.METRICS).read_text().splitlines()]


def by_step(out, kind, key) -> dict:
    return {r["step"]: r[key] for r in records(out) if r["type"] == kind}


def assert_same_run(got, expected):
    """Same per-step train losses, val losses and final adapter, and the same token counts
    (those of every process: reported tokens/s is computed from them)."""
    for kind, key in (("train", "train_loss"), ("val", "val_loss"), ("train", "trained_tokens")):
        a, b = by_step(got, kind, key), by_step(expected, kind, key)
        assert sorted(a) == sorted(b), (kind, a, b)
        np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)],
                                   rtol=1e-5, atol=1e-6, err_msg=f"{kind} {key}")
    a, b = (files.load_safetensors(Path(o) / "adapters.safetensors") for o in (got, expected))
    assert set(a) == set(b)
    for k in a:
        if "order" in k:  # the spectral plan: identical on every rank
            assert mx.array_equal(a[k], b[k]).item(), k
        else:  # summation order differs; Adam turns that into ~5e-5 of the tensor's scale
            scale = np.abs(np.array(b[k])).max()
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=2e-4 * scale, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory) -> Path:
    """The reference: one process, the same global batch."""
    out = tmp_path_factory.mktemp("single") / "a"
    train(options(tiny_model_dir, data, out))
    return out


@pytest.fixture(scope="module")
def two(ring, tiny_model_dir, data, tmp_path_factory):
    """The same run over two processes with mlx.launch (this also warms MLX's kernel cache)."""
    out = tmp_path_factory.mktemp("two") / "a"
    stdout, stderr = launch(flags(options(tiny_model_dir, data, out, train=True, test=True)))
    return SimpleNamespace(out=out, stdout=stdout, stderr=stderr)


def test_two_processes_train_like_one_with_the_same_global_batch(two, single):
    assert "[WARN]" not in two.stderr and "error:" not in two.stderr, two.stderr
    assert_same_run(two.out, single)
    # Rank 0 alone logs and writes: one copy of each line and record.
    assert two.stdout.count("Iter 10: saved") == 1 and two.stdout.count("Test loss") == 1
    assert "Distributed: 2 processes, each 2 examples of every global batch of 4" in two.stdout
    assert len(records(two.out)) == len(records(single)) == 10 + 3
    assert {p.name for p in two.out.iterdir()} == {p.name for p in single.iterdir()}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Preference pairs of varied lengths: train 14 (one global batch of 4 holds empty
    rows), valid 6."""
    d = tmp_path_factory.mktemp("pairs")
    rng = random.Random(2)
    for split, n in (("train", 14), ("valid", 6)):
        rows = [{"prompt": f"what is {a} plus {b}?" + "?" * (a % 5), "chosen": f"It is {a + b}.",
                 "rejected": f"It is {a + b + rng.randint(1, 9)}, I think."}
                for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_dpo_over_two_processes_trains_like_one(ring, tiny_model_dir, pairs, tmp_path):
    """DPO's loss is a mean over pairs: the group sums its pairs and reward totals like tokens."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(options(tiny_model_dir, pairs, one, train_mode="dpo"))
    stdout, stderr = launch(flags(options(tiny_model_dir, pairs, two, train_mode="dpo")))
    assert "error:" not in stderr, stderr
    assert_same_run(two, one)
    for kind in ("train", "val"):
        for key in ("reward_accuracy", "reward_margin", "chosen_reward"):
            a, b = by_step(two, kind, f"{kind}_{key}"), by_step(one, kind, f"{kind}_{key}")
            np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)],
                                       rtol=1e-5, atol=1e-6, err_msg=f"{kind} {key}")
    assert by_step(one, "train", "train_reward_margin")[10] > 0  # it learned something


def test_ctrl_c_on_one_rank_stops_both_then_resume_reproduces_the_run(two, single, tiny_model_dir, data, tmp_path, ranks):
    """Ctrl-C reaches only rank 1 while rank 0 is frozen mid-run: both stop after the same
    update, rank 0 saves, and a 2-process --resume ends where the straight run does."""
    out = tmp_path / "a"
    run = ranks([flags(options(tiny_model_dir, data, out))] * 2)
    run.wait_for_steps(out, 1)
    run.signal(0, signal.SIGSTOP)
    run.signal(1, signal.SIGINT)
    time.sleep(0.5)
    run.signal(0, signal.SIGCONT)
    assert run.wait(0, 60) == 130 and run.wait(1, 60) == 130, run.stderr(0) + run.stderr(1)
    step = checkpoint.load(out / checkpoint.STATE).meta["step"]
    assert 1 <= step < OPTIONS["iters"]
    assert f"Interrupted at step {step}" in run.stderr(0) and "Interrupted" not in run.stderr(1)
    assert max(by_step(out, "train", "train_loss")) == step

    stdout, stderr = launch(["--adapter-path", str(out), "--resume"])
    assert f"Resuming from {out / checkpoint.STATE} at step {step}" in stdout, stderr
    assert_same_run(out, single)


def test_a_killed_rank_stops_the_other_with_an_error(two, tiny_model_dir, data, tmp_path, ranks):
    out = tmp_path / "a"
    run = ranks([flags(options(tiny_model_dir, data, out, iters=100000, save_every=2))] * 2)
    run.wait_for_steps(out, 3)
    run.signal(1, signal.SIGKILL)
    assert run.wait(0, 60) == 1
    [line] = run.errors(0)
    assert re.match(r"error: rank 0: .+ failed, a process of the group stopped \(.+\); "
                    r"resume from the last checkpoint with --resume$", line), line
    assert checkpoint.load(out / checkpoint.STATE).meta["step"] >= 2  # a resumable checkpoint


def test_a_hung_rank_trips_the_watchdog(two, tiny_model_dir, data, tmp_path, ranks):
    """A stopped peer keeps its sockets open, so MLX would wait forever: the watchdog
    ends rank 0 after --distributed-timeout; rank 1, continued, finds rank 0 gone."""
    out = tmp_path / "a"
    run = ranks([flags(options(tiny_model_dir, data, out, iters=100000, distributed_timeout=4))] * 2)
    run.wait_for_steps(out, 3)
    run.signal(1, signal.SIGSTOP)
    stopped = time.time()
    assert run.wait(0, 60) == 1
    assert time.time() - stopped >= 3.5
    [line] = run.errors(0)
    assert line.startswith("error: rank 0: no answer from the other processes for 4 s in ")
    assert "--distributed-timeout" in line
    run.signal(1, signal.SIGCONT)  # its own wait outlived the timeout too, or rank 0 is gone
    assert run.wait(1, 60) == 1
    [line] = run.errors(1)
    assert "no answer from the other processes" in line or "a process of the group stopped" in line


def test_a_missing_peer_at_start_trips_the_watchdog(ring, tiny_model_dir, data, tmp_path):
    """Rank 1 never starts: rank 0 waits --distributed-timeout to connect, then stops."""
    port = _port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    opts = options(tiny_model_dir, data, tmp_path / "a", distributed_timeout=2)
    proc = subprocess.run([sys.executable, "-m", "smoa_mlx.train", *flags(opts)],
                          capture_output=True, text=True, timeout=120,
                          env={**_env(), "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)})
    assert proc.returncode != 0, proc.stderr
    assert "error: rank 0: no answer from the other processes for 2 s in the first connection" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_ranks_that_disagree_stop_before_training(ring, tiny_model_dir, data, tmp_path, ranks):
    """Rank 1 has another --rank and a train split with one example less."""
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        lines = (data / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (other / f"{split}.jsonl").write_text("".join(lines[:-1] if split == "train" else lines))
    out = tmp_path / "a"
    run = ranks([flags(options(tiny_model_dir, data, out)),
                 flags(options(tiny_model_dir, other, out, rank=4))])
    for r in (0, 1):
        assert run.wait(r, TIMEOUT) == 1, run.stderr(r)
        [line] = run.errors(r)
        assert line.startswith("error: the 2 processes disagree on ") and line.endswith(SAME_RUN)
        assert "the number of train examples (rank 0: 30 vs rank 1: 29)" in line
        assert "--rank (rank 0 vs rank 1)" in line and "the train data (rank 0 vs rank 1)" in line
        assert "base model" not in line and "valid" not in line  # only what differs is named
    assert not out.exists()


# ---------------------------------------------------------------- pure pieces


def test_disagreement_names_each_item_and_the_ranks_that_differ():
    shown, hashed = {"the number of train examples": 30}, {"--rank": 8, "the train data": [1, 2]}
    same = np.stack([encode(shown, hashed)] * 3)
    assert disagreement(shown, hashed, same) is None
    table = same.copy()
    table[1] = encode({"the number of train examples": 29}, {"--rank": 4, "the train data": [1, 2]})
    msg = disagreement(shown, hashed, table)
    assert msg == ("the 3 processes disagree on the number of train examples (ranks 0, 2: 30 vs "
                   "rank 1: 29); --rank (ranks 0, 2 vs rank 1): " + SAME_RUN)


def test_the_data_digest_covers_both_replies_of_a_pair():
    from smoa_mlx.data import Example, Pair

    a = Pair(Example([1, 2, 3, 4, 5], 3), Example([1, 2, 3, 6], 3))
    b = Pair(Example([1, 2, 3, 4, 5], 3), Example([1, 2, 3, 7], 3))  # only the shorter differs
    assert data_digest([a]) != data_digest([b])
    assert data_digest([a]) == data_digest([Pair(Example([1, 2, 3, 4, 5], 3), Example([1, 2, 3, 6], 3))])


def test_the_global_batch_is_split_over_the_processes():
    examples = {"train": [SimpleNamespace(tokens=[1] * (i + 2), prompt_len=0) for i in range(12)]}
    args = SimpleNamespace(batch_size=4, max_seq_length=64)
    one = _batchers(examples, args, SimpleNamespace(rank=0, size=1), seed=3)["train"]
    parts = [_batchers(examples, args, SimpleNamespace(rank=r, size=2), seed=3)["train"] for r in (0, 1)]
    for step in range(5):
        whole = one.batch(step)
        halves = [p.batch(step) for p in parts]
        for i in range(3):  # inputs, targets, mask: rank r holds rows r, r + 2
            assert halves[0][i].shape == halves[1][i].shape == (2, whole[i].shape[1])
            assert mx.array_equal(halves[0][i], whole[i][0::2]) and mx.array_equal(halves[1][i], whole[i][1::2])
    with pytest.raises(ValueError, match="--batch-size 4 is the global batch; it must be divisible by the 3"):
        _batchers(examples, args, SimpleNamespace(rank=0, size=3), seed=3)


def test_a_launch_without_a_working_backend_is_refused(monkeypatch):
    """MLX gives each process a group of its own when the launcher's backend is missing:
    they would all train alone and write the same files."""
    monkeypatch.setenv("MLX_WORLD_SIZE", "2")  # what mlx.launch --backend nccl sets
    with pytest.raises(ValueError, match="launched as one of 2 processes, but MLX started no"):
        Distributed.init(0)
