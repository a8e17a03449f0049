"""Spectral plan time vs a float32 full SVD, and whether both give the same blocks.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_plan.py

`make_plan` scores rows and columns from the float64 eigen-decomposition of the
smaller Gram matrix (SPEC §1 note); the baseline is NumPy's float32 full SVD of the
weight (the SPEC's definition, without even its scoring), with MLX's CPU SVD shown
too. Weights are U diag(j^-0.5) V^T, a spectrum shaped like a trained weight's.
Membership: the K = 2 and K = 4 blocks of rows and columns from the plan and from
the SVD scores must be the same sets. "cached" is a second plan of the same weight
through smoa_mlx.plan_cache (hash + read). Medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mlx.core as mx
import numpy as np

from benchlib import banner, load, median, table, time_interleaved
from smoa_mlx import plan_cache
from smoa_mlx.plan import EPS, make_plan

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]


def decaying_weight(d_out: int, d_in: int) -> np.ndarray:
    """U diag(j^-0.5) V^T with random orthonormal U, V (MLX's QR: NumPy's is slow under load)."""
    q = min(d_out, d_in)
    u, _ = mx.linalg.qr(mx.random.normal((d_out, q)), stream=mx.cpu)
    v, _ = mx.linalg.qr(mx.random.normal((d_in, q)), stream=mx.cpu)
    return np.array((u * mx.arange(1, q + 1) ** -0.5) @ v.T)


def svd_blocks(u, s, vt, k: int) -> list[set]:
    """SPEC §1 steps 2-4 from an SVD: row blocks then column blocks, as sets."""
    j = np.arange(len(s), dtype=np.float64)
    blocks = []
    for vecs in (u, vt.T):
        energy = np.float64(s) ** 2 * np.float64(vecs) ** 2
        score = energy @ j / np.maximum(energy.sum(axis=1), EPS)
        blocks += [set(b.tolist()) for b in np.array_split(np.argsort(score, kind="stable"), k)]
    return blocks


def differing(plan, blocks) -> int:
    """Indices whose block differs between the plan and the SVD."""
    mine = [set(b.tolist()) for b in plan.row_blocks + plan.col_blocks]
    return sum(len(a ^ b) for a, b in zip(mine, blocks)) // 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="Timed repeats per variant.")
    args = parser.parse_args(argv)
    banner()
    mx.random.seed(0)
    rows, speedups, identical = [], [], True
    print(f"seconds, median of {args.repeats} interleaved repeats")
    for d_out, d_in in SHAPES:
        w = decaying_weight(d_out, d_in)
        wm = mx.array(w)
        svd = []
        with tempfile.TemporaryDirectory() as cache:
            os.environ["SMOA_MLX_CACHE"] = cache
            plan_cache.cached_plan(w, 2)  # fill the cache for the "cached" timing
            times = time_interleaved({
                "plan": lambda: make_plan(w, 2).row_order,
                "cached": lambda: plan_cache.cached_plan(w, 2).row_order,
                "numpy svd": lambda: svd.append(np.linalg.svd(w, full_matrices=False)) or svd[-1][1],
                "mlx svd": lambda: mx.linalg.svd(wm, stream=mx.cpu),
            }, args.repeats, warmup=0)
            # Membership from the cached scores, which are make_plan's bit for bit.
            diff = {k: differing(plan_cache.cached_plan(w, k), svd_blocks(*svd[-1], k)) for k in (2, 4)}
            gap = plan_cache.cached_plan(w, 2).boundary_gap
        med = {n: median(t) for n, t in times.items()}
        identical &= not any(diff.values())
        speedups.append(med["numpy svd"] / med["plan"])
        rows.append([f"{d_out}x{d_in}", med["plan"], med["cached"], med["numpy svd"], med["mlx svd"],
                     speedups[-1], med["mlx svd"] / med["plan"],
                     "identical" if not any(diff.values()) else f"{diff} differ", gap])
        print(f"  {d_out}x{d_in} done; {load()}", flush=True)
    os.environ.pop("SMOA_MLX_CACHE")
    table(["shape", "plan s", "cached s", "f32 SVD s", "mlx SVD s", "speedup", "vs mlx SVD",
           "K=2,4 blocks vs SVD", "K=2 boundary gap"], rows)
    print(f"SUMMARY plan_speedup_min={min(speedups):.2f} membership_identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
