"""Aggregation: runs at a rate over seeds, comparisons in units of the seed spread."""

from __future__ import annotations

import math

import numpy as np

from .protocol import DEFAULT_RATE

# (method, reference, what the comparison isolates)
PAIRS = (
    ("SMoA r=8 K=2", "LoRA r=8", "the paper's claim: SMoA with half of LoRA's parameters"),
    ("SMoA r=8 K=2", "LoRA r=4", "equal parameters: high rank vs low rank"),
    ("HiRA r=8", "LoRA r=8", "equal parameters; one block, K = 1"),
    ("SMoA r=16 K=4", "SMoA r=8 K=2", "equal parameters, more blocks"),
    ("SMoA r=8 K=2", "SMoA r=8 K=2, plain Adam", "the anchor step scale vs plain Adam"),
)


def rate(results, it: int, ds: str, label: str, which: str = "best") -> float | None:
    """The method's best rate (lowest final validation loss, seed 0) or its default."""
    if which == "default":
        return results.get("defaults", DEFAULT_RATE)[label]
    return results["best"].get((it, ds, label))


def finals(results, it: int, ds: str, label: str, which: str = "best") -> list[dict]:
    """The measured runs at the method's best (or default) rate, one per seed."""
    lr = rate(results, it, ds, label, which)
    return [r for r in results["runs"]
            if (r["iters"], r["dataset"], r["method"], r["lr"]) == (it, ds, label, lr)
            and not r["diverged"] and "test_loss" in r]


def sweep(results, it: int, ds: str, label: str) -> list[dict]:
    """The first seed's run at every rate tried, by rate."""
    first = min((r["seed"] for r in results["runs"]), default=0)
    return sorted((r for r in results["runs"] if (r["iters"], r["dataset"], r["method"], r["seed"])
                   == (it, ds, label, first)), key=lambda r: r["lr"])


def mean_std(values) -> tuple[float, float | None]:
    values = np.array([v for v in values if v is not None], dtype=np.float64)
    if values.size == 0:
        return math.nan, None
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else None


def pm(values, digits=3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def held_out(results, it, ds, label, which="best") -> float:
    return mean_std(r["test_loss"] for r in finals(results, it, ds, label, which))[0]


def compare(results, it: int, ds: str, a: str, b: str, which: str = "best",
            which_b: str | None = None) -> dict | None:
    """Held-out loss of method `a` minus `b` (`a` at its `which` rate, `b` at its
    `which_b`, by default the same), and the gap in units of the pooled seed std."""
    ra, rb = finals(results, it, ds, a, which), finals(results, it, ds, b, which_b or which)
    if not ra or not rb:
        return None
    (ma, sa), (mb, sb) = mean_std(r["test_loss"] for r in ra), mean_std(r["test_loss"] for r in rb)
    pooled = math.sqrt((sa ** 2 + sb ** 2) / 2) if sa is not None and sb is not None else None
    return {"a": ma, "b": mb, "gap": ma - mb, "stds": abs(ma - mb) / pooled if pooled else None}


def clear(c: dict) -> bool:
    """A gap of at least 2 pooled seed stds (as printed, to one decimal)."""
    return c["stds"] is not None and round(c["stds"], 1) >= 2


def verdict(c: dict) -> str:
    word = "lower (better)" if c["gap"] < 0 else "higher (worse)"
    if c["stds"] is None:
        return f"{word} by {abs(c['gap']):.4f} (one seed: no noise estimate)"
    strength = ("a clear gap" if clear(c) else "within seed noise" if c["stds"] < 1
                else "a small gap")
    return f"{word} by {abs(c['gap']):.4f}, {c['stds']:.1f}x the seed std: {strength}"


def default_cost(results, it, ds, label) -> float | None:
    """How much worse the default rate's held-out loss is than the best rate's, in percent."""
    best, default = held_out(results, it, ds, label), held_out(results, it, ds, label, "default")
    if math.isnan(best) or math.isnan(default):
        return None
    return 100 * (default / best - 1)
