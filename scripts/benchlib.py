"""Shared pieces of the benchmarks: the BLAS/load banner, interleaved timing, tables.

Every benchmark runs its variants in the same process, interleaved repeat by repeat
(so load from other processes hits every variant alike), and reports medians.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from smoa_mlx.blas import REMEDY, describe
from smoa_mlx.synthetic import make_llama

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "stories260K-hf"


def llama_1b_shaped(root: Path, layers: int) -> Path:
    """A generated float32 Llama with Llama-3.2-1B layer shapes (made once under `root`)."""
    path = Path(root) / f"llama-1b-shaped-{layers}l"
    if not (path / "config.json").exists():
        make_llama(path, hidden_size=2048, num_hidden_layers=layers, intermediate_size=8192,
                   num_attention_heads=32, num_key_value_heads=8)
    return path


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def banner() -> None:
    """Which BLAS MLX's CPU matmuls go through, how fast a float32 GEMM runs, and the load."""
    blas = describe()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, {platform.system()} {platform.machine()}")
    print(f"BLAS: {blas}")
    if blas == "reference":
        print(f"WARNING: MLX is on its bundled reference BLAS (~30x slower matmuls): {REMEDY}")
    a = mx.random.normal((1024, 1024))
    t = median(time_interleaved({"gemm": lambda: a @ a}, repeats=5)["gemm"])
    print(f"float32 1024^3 GEMM: {t * 1e3:.1f} ms = {2 * 1024**3 / t / 1e9:.1f} GFLOP/s; {load()}\n")


def time_interleaved(fns: dict, repeats: int, warmup: int = 1, peaks: dict | None = None) -> dict[str, list[float]]:
    """name -> seconds of each of `repeats` calls of `mx.eval(fn())`, variants interleaved.

    With `peaks`, also appends each call's peak memory above the memory active before it.
    """
    for _ in range(warmup):
        for fn in fns.values():
            mx.eval(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = mx.get_active_memory()
            mx.reset_peak_memory()
            tic = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - tic)
            if peaks is not None:
                peaks.setdefault(name, []).append(mx.get_peak_memory() - start)
    return times


def median(values) -> float:
    return float(np.median(values))


def table(headers: list[str], rows: list[list]) -> None:
    """Print a plain fixed-width table; floats with 3 significant digits."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print()
