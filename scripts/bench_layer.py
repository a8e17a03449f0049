"""Forward+backward of one adapted layer: SMoALinear vs mlx-lm's LoRALinear vs the frozen base.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_layer.py

float32, gradients w.r.t. the adapter parameters and the input (the frozen base:
input only), plain and `mx.compile`d, medians of interleaved repeats; `--bits 4`
puts every variant on a 4-bit quantized base (QLoRA). The FLOP column counts the
matmuls: base 2·N·d_in·d_out per pass (forward, input gradient), SMoA adds the
per-block weight gradient, 1/K of one pass, and builds W0 + ΔW (2·R·d_in·d_out per
pass); see docs/PERFORMANCE.md.

`--decode` times one token instead (no gradients) on the Llama-1B projection shapes
(`--smollm2`: SmolLM2-135M's): the base, SMoALinear as training leaves it (its folded
path: one matmul of W0 with 1 + R rows, factors rebuilt per call), SMoALinear prepared
for inference (`prepare`: a float base merged; a quantized one in the format it times
fastest, `picked`, and in each of `layer.PREPARED_FORMATS` forced; `... MiB` is what each
holds), and, for comparison, the factored update `sum_r B_k[:, r] ⊙ ((x_k ⊙ A_k[r]) M_k^T)`
next to the base matmul with the anchors M_k stored, or rebuilt (de-quantized) on each
call. `ops` counts the nodes of each variant's graph for one call (`mx.export_to_dot`).
"""

from __future__ import annotations

import argparse
import io

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from benchlib import banner, median, table, time_interleaved
from smoa_mlx.layer import PREPARED_FORMATS, SMoALinear, _anchors, _join, base_weight

DECODE_SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]  # (d_out, d_in)
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def graph_nodes(out: mx.array) -> int:
    """Operations in the (unevaluated) graph that computes `out`."""
    f = io.StringIO()
    mx.export_to_dot(f, out)
    return f.getvalue().count("shape=rectangle")


def matmul_flops(n: int, d: int, k: int | None, rank: int) -> float:
    """GFLOP of one step: base fwd + dx, plus SMoA's 3 block passes or LoRA's thin ones."""
    base = 2 * 2 * n * d * d
    if k is None:
        return base / 1e9
    if k == 0:  # LoRA: x A^T, (xA^T) B^T and their backward
        return (base + 3 * 2 * 2 * n * d * rank) / 1e9
    return (base + 2 * n * d * d / k + 2 * 2 * rank * d * d) / 1e9


def factored(layer: SMoALinear, x: mx.array, anchors: list[mx.array]) -> mx.array:
    """Base output plus the update through the K anchors (the pre-folding decode path)."""
    z = []
    for a, b, m, c in zip(layer.smoa_a, layer.smoa_b, anchors, layer._blocks.cols):
        xa = mx.take(x, c, axis=-1)[..., None, :] * a  # (..., r_k, in_k)
        z.append(((xa @ m.T) * (layer.scale * b.T)).sum(axis=-2))
    return layer.linear(x) + _join(z, layer._blocks.row_slot)


def decode(args) -> None:
    quantized = f", {args.bits}-bit base" if args.bits else ""
    print(f"one token through one layer{quantized}, float32 x, r={args.rank} K=2, "
          f"median of {args.repeats * 10} interleaved calls (ms)")
    rows = []
    for d_out, d_in in SMOLLM2_SHAPES if args.smollm2 else DECODE_SHAPES:
        base = nn.Linear(d_in, d_out, bias=False)
        if args.bits:
            base = nn.QuantizedLinear.from_linear(base, 64 if d_in % 64 == 0 else 32, args.bits)
        layer = SMoALinear.from_base(base, rank=args.rank, num_blocks=2)
        layer.smoa_b = [mx.random.normal(b.shape) * 0.01 for b in layer.smoa_b]
        # a float base prepares one way (merged); a quantized one in each format, and the
        # one `prepare` picks by timing
        formats = [None] + (list(PREPARED_FORMATS) if args.bits else [])
        prepared = {f: SMoALinear.from_base(base, rank=args.rank, num_blocks=2) for f in formats}
        for f, p in prepared.items():
            p.update(layer.parameters())
            p.prepare(f)
        stored = _anchors(base_weight(base), layer._blocks)
        x = mx.random.normal((1, 1, d_in))
        mx.eval(x, stored, layer.parameters())
        variants = {
            "base": lambda: base(x),
            "SMoA (folded)": lambda: layer(x),
            **{f"prepared {f or ''}".strip(): (lambda p=p: p(x)) for f, p in prepared.items()},
            "anchors stored": lambda: factored(layer, x, stored),
            "anchors rebuilt": lambda: factored(layer, x, _anchors(base_weight(base), layer._blocks)),
        }
        t = {n: median(v) for n, v in time_interleaved(variants, args.repeats * 10).items()}
        rows.append([f"{d_out}x{d_in}"] + [t[n] * 1e3 for n in variants]
                    + [t[n] / t["base"] for n in variants if n != "base"]
                    + [prepared[None].prepared_format, sum(a.nbytes for a in stored) / 2**20]
                    + [p.prepared_nbytes / 2**20 for p in prepared.values()]
                    + ["/".join(str(graph_nodes(variants[n]())) for n in list(variants)[:3])])
    table(["shape", *variants, *[f"{n}/base" for n in variants if n != "base"], "picked",
           "stored MiB", *[f"{n} MiB" for n in variants if n.startswith("prepared")],
           "ops base/folded/prepared"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="Timed repeats per variant.")
    parser.add_argument("--dim", type=int, default=2048, help="Layer size d (a d x d layer).")
    parser.add_argument("--tokens", type=int, nargs=2, default=[4, 256], help="Batch and length.")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-blocks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--bits", type=int, choices=[4, 8], help="Quantize the base (group size 64).")
    parser.add_argument("--decode", action="store_true", help="Time one token per call (decoding).")
    parser.add_argument("--smollm2", action="store_true", help="--decode on SmolLM2-135M's shapes.")
    args = parser.parse_args(argv)
    banner()
    if args.decode:
        return decode(args)
    d, n = args.dim, args.tokens[0] * args.tokens[1]
    mx.random.seed(0)
    base = nn.Linear(d, d, bias=False)
    base.weight = mx.random.normal((d, d)) / d**0.5
    if args.bits:
        base = nn.QuantizedLinear.from_linear(base, 64, args.bits)
    base.freeze()
    x = mx.random.normal((*args.tokens, d))
    g = mx.random.normal((*args.tokens, d))

    def adapter_step(layer):
        def loss(params, x):
            layer.update(params)
            return (layer(x) * g).sum()

        f = mx.value_and_grad(loss, argnums=(0, 1))
        params = layer.trainable_parameters()
        return lambda: f(params, x)

    lora = LoRALinear.from_base(base, r=args.rank)
    layers = {"LoRALinear": (lora, 0)}
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.01  # nonzero B, as after training
    for k in args.num_blocks:
        smoa = SMoALinear.from_base(base, rank=args.rank, num_blocks=k)
        smoa.smoa_b = [mx.random.normal(b.shape) * 0.01 for b in smoa.smoa_b]
        layers[f"SMoALinear K={k}"] = (smoa, k)
    mx.eval(x, g, *(m.parameters() for m, _ in layers.values()))

    base_grad = mx.value_and_grad(lambda x: (base(x) * g).sum())
    steps = {"frozen base (grad x)": (lambda: base_grad(x), None)}
    steps.update({name: (adapter_step(m), k) for name, (m, k) in layers.items()})
    compiled_base = mx.compile(base_grad)
    variants = {**{n: f for n, (f, _) in steps.items()}, "frozen base (grad x), compiled": lambda: compiled_base(x)}
    for name, (m, _) in layers.items():
        def loss(params, x, m=m):
            m.update(params)
            return (m(x) * g).sum()

        f = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
        variants[f"{name}, compiled"] = lambda f=f, p=m.trainable_parameters(): f(p, x)
    quantized = f", {args.bits}-bit base" if args.bits else ""
    print(f"forward+backward, {d}x{d} layer{quantized}, x {(*args.tokens, d)} float32, r={args.rank}, "
          f"median of {args.repeats} interleaved repeats")
    times = {name: median(t) for name, t in time_interleaved(variants, args.repeats).items()}
    rows = []
    for name, t in times.items():
        plain = name.removesuffix(", compiled")
        suffix = name[len(plain):]
        k = steps[plain][1]
        flops = matmul_flops(n, d, k, args.rank)
        rows.append([name, t * 1e3, t / times["frozen base (grad x)" + suffix],
                     t / times["LoRALinear" + suffix], flops, flops / t])
    table(["variant", "ms", "vs base", "vs LoRA", "GFLOP", "GFLOP/s"], rows)
    counts = {name: sum(v.size for _, v in tree_flatten(m.trainable_parameters())) for name, (m, _) in layers.items()}
    print("trainable parameters: " + ", ".join(f"{n} {c}" for n, c in counts.items()))


if __name__ == "__main__":
    main()
