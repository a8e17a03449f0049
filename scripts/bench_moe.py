"""One training step of an MoE block: SMoA on the experts vs mlx-lm's LoRASwitchLinear.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_moe.py [--bits 4]

A SwitchGLU (mlx-lm's expert MLP, Qwen3-MoE/Mixtral style) with `--experts` experts
and top-`--top-k` routing of `--tokens` tokens; up_proj and down_proj are adapted
(the default targets), gate_proj stays frozen. One step = forward, the gradients of
the adapter parameters and of the input, `mx.compile`d; float32; medians of interleaved repeats in
one process. The last line is the SUMMARY ratio SMoA / LoRA.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.tuner.lora import LoRASwitchLinear

from benchlib import banner, median, table, time_interleaved
from smoa_mlx.switch import SMoASwitchLinear


def block(args, kind: str) -> SwitchGLU:
    mx.random.seed(0)
    glu = SwitchGLU(args.hidden, args.inter, args.experts)
    if args.bits:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(glu, name, getattr(glu, name).to_quantized(group_size=64, bits=args.bits))
    glu.freeze()
    for name in ("up_proj", "down_proj"):
        base = getattr(glu, name)
        if kind == "lora":
            setattr(glu, name, LoRASwitchLinear.from_base(base, r=args.rank, scale=1.0))
        elif kind == "smoa":
            setattr(glu, name, SMoASwitchLinear.from_base(base, rank=args.rank, num_blocks=args.num_blocks,
                                                          alpha=args.rank))
    mx.eval(glu.parameters())
    return glu


def step_fn(glu: SwitchGLU, idx, probe):
    """Gradients of the adapter parameters and of the block's input (which the layers
    below need in a real model), compiled."""

    def loss(params, x):
        glu.update(params)
        return (glu(x, idx) * probe).sum()

    grad = mx.grad(loss, argnums=(0, 1))
    state = [glu.state]
    return mx.compile(lambda x: grad(glu.trainable_parameters(), x), inputs=state, outputs=state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512, help="Expert (moe_intermediate) size.")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--bits", type=int, default=0, help="Quantize the experts (4 or 8), 0: float32.")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    banner()
    rng = np.random.default_rng(0)
    idx = mx.array(np.argsort(rng.random((1, args.tokens, args.experts)), axis=-1)[..., : args.top_k])
    x = mx.random.normal((1, args.tokens, args.hidden))
    probe = mx.random.normal((1, args.tokens, args.top_k, args.hidden))
    steps, counts = {}, {}
    for kind in ("base", "lora", "smoa"):
        glu = block(args, kind)
        counts[kind] = sum(v.size for _, v in tree_flatten(glu.trainable_parameters()))
        steps[kind] = step_fn(glu, idx, probe)
    times = time_interleaved({k: (lambda f=f: f(x)) for k, f in steps.items()}, repeats=args.repeats)
    base = args.bits and f"{args.bits}-bit" or "float32"
    print(f"SwitchGLU {args.experts} experts {args.hidden}->{args.inter}, top-{args.top_k}, "
          f"{args.tokens} tokens, {base} experts, up+down adapted, r={args.rank} "
          f"(SMoA K={args.num_blocks}); compiled forward+backward, median of {args.repeats}")
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    table(["variant", "trainable", "ms/step", "x base"],
          [[k, counts[k], ms[k], ms[k] / ms["base"]] for k in steps])
    print(f"SUMMARY smoa/lora step time ratio {ms['smoa'] / ms['lora']:.2f} "
          f"(smoa {ms['smoa']:.1f} ms, lora {ms['lora']:.1f} ms, base {ms['base']:.1f} ms; "
          f"{counts['smoa']} vs {counts['lora']} trainable)")


if __name__ == "__main__":
    main()
