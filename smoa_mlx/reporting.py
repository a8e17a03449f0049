"""What a training run tells its user: progress bars (or timed lines in a log) over long
evaluations, the `Iter N: train loss ...` and `val loss` lines with throughput, and on
rank 0 the same numbers as records in `<adapter_path>/metrics.jsonl` and, with
`--report-to wandb|swanlab`, through mlx-lm's own reporting callbacks (`tracking`)."""

from __future__ import annotations

import importlib.util
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from . import checkpoint
from .errors import ConfigError

# Experiment trackers `--report-to` names (mlx-lm's `SUPPORT_CALLBACK`), each its package.
TRACKERS = ("wandb", "swanlab")
# metrics.jsonl's keys that mlx-lm's callbacks name otherwise, so a dashboard reads the
# same keys as for an `mlx_lm.lora` run.
_MLX_LM_KEYS = {"step": "iteration", "peak_memory_gb": "peak_memory"}

# A progress line at most this often (seconds) when stderr is not a terminal (logs).
PROGRESS_SECONDS = 10.0


@contextmanager
def progress(desc: str | None, total: int | None, show: bool = True):
    """Yields `advance()`, called once per batch: a tqdm bar on a terminal; in a log
    (stderr not a terminal), a line every `PROGRESS_SECONDS`, so a long evaluation
    shows it is alive. tqdm is imported only when a bar is drawn."""
    if not show:
        yield lambda: None
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, leave=False, unit="batch") as bar:
            yield bar.update
        return
    start = last = time.perf_counter()
    done = 0

    def advance():
        nonlocal done, last
        done += 1
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS:
            of = f"/{total}" if total is not None else ""
            print(f"{desc}: {done}{of} batches, {now - start:.1f}s", flush=True)
            last = now

    yield advance


def trackers(report_to: str | None) -> list[str]:
    """The services of a `--report-to` value (comma-separated, as mlx-lm's), checked."""
    names = [n.strip().lower() for n in (report_to or "").split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to: {name!r} is not one of {', '.join(TRACKERS)}")
    return names


def require_trackers(report_to: str | None) -> None:
    """A missing tracker package is one line saying what to install (checked before the
    run writes anything)."""
    for name in trackers(report_to):
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: "
                              f"pip install 'smoa-mlx[{name}]' (or pip install {name})")


@contextmanager
def tracking(report_to: str | None, project_name: str | None, log_dir: Path, config: dict,
             main: bool):
    """Yields mlx-lm's reporting callback for `report_to` on rank 0 (`main`), else None;
    the service's run is finished on the way out (mlx-lm leaves that to the process's
    exit, which a Python caller training twice would not reach). The services are
    imported only here: mlx-lm's module imports them (`require_trackers`, which the
    trainer calls before any work, says what a missing one needs)."""
    names = trackers(report_to)
    if not names or not main:
        yield None
        return
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    callback = get_reporting_callbacks(",".join(names), project_name=project_name,
                                       log_dir=str(log_dir), config=config)
    try:
        yield callback
    finally:
        for name in names:
            sys.modules[name].finish()


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _shown(metrics: dict) -> str:
    return "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in metrics.items())


def _zero() -> dict:
    return {"time": 0.0, "tokens": 0.0, "steps": 0}


class Reporter:
    """A run's reports: lines on stdout (every rank prints; `Distributed.quiet` mutes all
    but rank 0) and, from rank 0 (`main`), metrics.jsonl records. Throughput is timed over
    the updates since the last report and over this session (a resumed run's own)."""

    def __init__(self, out: Path, iters: int, main: bool, callback=None):
        self.out, self.iters, self.main, self.callback = out, iters, main, callback
        self.timer, self.session = _zero(), _zero()

    def _record(self, record: dict) -> None:
        """Rank 0: one metrics.jsonl record, and the same values to the tracker."""
        if not self.main:
            return
        checkpoint.append_metrics(self.out, record)
        if self.callback is not None:
            values = {_MLX_LM_KEYS.get(k, k): v for k, v in record.items() if k != "type"}
            report = (self.callback.on_train_loss_report if record["type"] == "train"
                      else self.callback.on_val_loss_report)
            report(values)

    def update(self, seconds: float, tokens: float) -> None:
        """Count one optimizer update of `tokens` tokens that took `seconds`."""
        for t in (self.timer, self.session):
            t["time"] += seconds
            t["tokens"] += tokens
            t["steps"] += 1

    def train(self, step: int, loss: float, lr: float, trained_tokens: float,
              metrics: dict | None = None) -> None:
        """`metrics`: the mode's means beyond the loss (DPO's reward accuracy, margin)."""
        t, s = self.timer, self.session
        metrics = metrics or {}
        peak = mx.get_peak_memory() / 1e9
        eta = (self.iters - step) * s["time"] / s["steps"]
        print(f"Iter {step}/{self.iters}: train loss {loss:.3f}{_shown(metrics)}, lr {lr:.3e}, "
              f"it/s {t['steps'] / t['time']:.3f}, tok/s {t['tokens'] / t['time']:.1f}, "
              f"peak mem {peak:.3f} GB, ETA {fmt_time(eta)}", flush=True)
        self.timer = _zero()
        self._record({
            "type": "train", "step": step, "train_loss": loss, "learning_rate": lr,
            "iterations_per_second": t["steps"] / t["time"],
            "tokens_per_second": t["tokens"] / t["time"],
            "trained_tokens": trained_tokens, "peak_memory_gb": peak,
            **{f"train_{k}": v for k, v in metrics.items()},
        })

    def val(self, step: int, loss: float, took: float, metrics: dict | None = None) -> None:
        metrics = metrics or {}
        print(f"Iter {step}: val loss {loss:.3f}{_shown(metrics)}, val took {took:.1f}s",
              flush=True)
        self._record({"type": "val", "step": step, "val_loss": loss, "val_time": took,
                      **{f"val_{k}": v for k, v in metrics.items()}})

    def throughput(self) -> dict:
        """This session's tokens and updates per second (None before any update)."""
        s = self.session
        return {"tokens_per_second": s["tokens"] / s["time"] if s["time"] else None,
                "iterations_per_second": s["steps"] / s["time"] if s["time"] else None}
