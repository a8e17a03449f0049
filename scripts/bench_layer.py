"""Measure the two costs SMoA adds over LoRA: the one-off spectral plan and the
per-step forward+backward of one adapted layer.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_layer.py

(a) `make_plan` (Gram eigen-decomposition, float64) vs a float32 full SVD of the same
weight, and whether both give the same K=2 block membership (SPEC §1 definition).
(b) forward+backward of SMoALinear (K=2, r=8) vs mlx-lm's LoRALinear (r=8) vs the
frozen base alone, float32, medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from smoa_mlx.layer import SMoALinear
from smoa_mlx.plan import make_plan


def blas_report() -> None:
    """Which BLAS MLX's CPU matmuls go through, and how fast a float32 GEMM runs."""
    print(f"mlx {mx.__version__}, device {mx.default_device()}, {platform.system()} {platform.machine()}")
    if platform.system() == "Darwin":
        print("BLAS: Accelerate (macOS)")
    else:
        preload = os.environ.get("LD_PRELOAD", "")
        with open("/proc/self/maps") as f:  # numpy's own libscipy_openblas does not count
            mapped = "/libopenblas" in f.read()
        print(f"BLAS: LD_PRELOAD={preload or '(unset)'}; system OpenBLAS loaded: {mapped}")
        if "openblas" not in preload.lower():
            print(
                "WARNING: OpenBLAS is not preloaded: MLX uses the reference BLAS bundled in its "
                "wheel and float32 matmuls are ~30x slower. Run "
                "`eval \"$(../shared/tools/fast-blas.sh)\"` in this shell first."
            )
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    t = median_time(lambda: a @ a, 5)
    print(f"float32 1024^3 GEMM: {t * 1e3:.1f} ms = {2 * 1024**3 / t / 1e9:.1f} GFLOP/s\n")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def decaying_weight(rng, d_out: int, d_in: int) -> np.ndarray:
    """U diag(s) V^T with s_j = j^-0.5: a spectrum shaped like a trained weight's."""
    q = min(d_out, d_in)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, q), dtype=np.float32))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, q), dtype=np.float32))
    s = np.arange(1, q + 1, dtype=np.float32) ** -0.5
    return ((u * s) @ v.T).astype(np.float32)


def svd_blocks(weight: np.ndarray, k: int):
    """SPEC §1 orders from a float32 full SVD; also returns its time."""
    tic = time.perf_counter()
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    elapsed = time.perf_counter() - tic
    j = np.arange(len(s), dtype=np.float64)
    blocks = []
    for vecs in (u, vt.T):
        energy = np.float64(s) ** 2 * np.float64(vecs) ** 2
        score = energy @ j / np.maximum(energy.sum(axis=1), np.finfo(np.float32).eps)
        blocks.append([set(b.tolist()) for b in np.array_split(np.argsort(score, kind="stable"), k)])
    return blocks, elapsed


def bench_plan(shapes, k: int = 2) -> None:
    print(f"(a) spectral plan, K={k}, weights U diag(j^-0.5) V^T")
    print(f"{'shape':>12} {'make_plan s':>12} {'f32 SVD s':>10} {'ratio':>6}  {'membership vs SVD':<18} boundary gap")
    rng = np.random.default_rng(0)
    for d_out, d_in in shapes:
        w = decaying_weight(rng, d_out, d_in)
        tic = time.perf_counter()
        plan = make_plan(w, k)
        t_plan = time.perf_counter() - tic
        (rows, cols), t_svd = svd_blocks(w, k)
        diff = sum(len(a ^ set(b.tolist())) // 2 for a, b in zip(rows, plan.row_blocks))
        diff += sum(len(a ^ set(b.tolist())) // 2 for a, b in zip(cols, plan.col_blocks))
        same = "identical" if diff == 0 else f"{diff} indices differ"
        print(
            f"{d_out:>5}x{d_in:<6} {t_plan:>12.2f} {t_svd:>10.2f} {t_plan / t_svd:>6.2f}  "
            f"{same:<18} {plan.boundary_gap:.3g}"
        )
    print()


def bench_layer(d: int, tokens: tuple[int, int], repeats: int) -> None:
    print(f"(b) forward+backward, {d}x{d} layer, x of shape {(*tokens, d)}, float32, median of {repeats}")
    mx.random.seed(0)
    base = nn.Linear(d, d, bias=False)
    base.weight = mx.random.normal((d, d)) / d**0.5
    base.freeze()
    smoa = SMoALinear.from_base(base, rank=8, num_blocks=2)
    lora = LoRALinear.from_base(base, r=8)
    # Nonzero B, as after a few training steps.
    smoa.smoa_b = [mx.random.normal(b.shape) * 0.01 for b in smoa.smoa_b]
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.01
    x = mx.random.normal((*tokens, d))
    g = mx.random.normal((*tokens, d))
    mx.eval(base.parameters(), smoa.parameters(), lora.parameters(), x, g)

    def adapter_step(layer):
        def loss(params, x):
            layer.update(params)
            return (layer(x) * g).sum()

        return mx.value_and_grad(loss, argnums=(0, 1)), (layer.trainable_parameters(), x)

    steps = {  # name -> (function, its arguments): grads w.r.t. adapter params and input
        "frozen base (grad x)": (mx.value_and_grad(lambda x: (base(x) * g).sum()), (x,)),
        "LoRALinear r=8": adapter_step(lora),
        "SMoALinear K=2 r=8": adapter_step(smoa),
    }
    variants = {**steps, **{f"{n}, compiled": (mx.compile(f), a) for n, (f, a) in steps.items()}}
    for f, a in variants.values():  # warm up (and compile)
        mx.eval(f(*a))
    times = {n: [] for n in variants}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for n, (f, a) in variants.items():
            tic = time.perf_counter()
            mx.eval(f(*a))
            times[n].append(time.perf_counter() - tic)
    med = {n: float(np.median(t)) for n, t in times.items()}
    print(f"{'variant':<32} {'ms':>9} {'vs base':>8} {'vs LoRA':>8}")
    for n, t in med.items():
        suffix = ", compiled" if n.endswith(", compiled") else ""
        print(
            f"{n:<32} {t * 1e3:>9.1f} {t / med['frozen base (grad x)' + suffix]:>8.2f} "
            f"{t / med['LoRALinear r=8' + suffix]:>8.2f}"
        )
    lora_n, smoa_n = (sum(v.size for _, v in tree_flatten(m.trainable_parameters())) for m in (lora, smoa))
    print(f"trainable parameters: LoRA {lora_n}, SMoA {smoa_n}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="Timed repeats per variant.")
    parser.add_argument("--dim", type=int, default=2048, help="Layer size for (b).")
    parser.add_argument("--skip-plan", action="store_true", help="Skip (a), the spectral plan.")
    args = parser.parse_args(argv)
    blas_report()
    if not args.skip_plan:
        d = args.dim
        bench_plan([(d, d), (d, 4 * d), (4 * d, d)])
    bench_layer(args.dim, (4, 256), args.repeats)


if __name__ == "__main__":
    main()
