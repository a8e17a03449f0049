"""Decoding speed: base model vs base + unfused SMoA adapter vs the fused model.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_generate.py

Greedy decoding with mlx-lm's `generate_step` (KV cache, no early stop at EOS) of a
fixed number of tokens after a short prompt, on the generated Llama-3.2-1B-shaped
float32 model and on stories260K-hf. The adapter is SMoA r=8 K=2 on q,k,v,up,down
with nonzero B; "unfused" is the model as `smoa_mlx.load(..., adapter_path=...)`
returns it, "fused" merges W0 + ΔW into plain layers (`smoa_mlx.fuse.fuse_layers`).
`--bits 4` quantizes the base first (group size 64; fused layers are re-quantized).
Decode tokens/s excludes the prompt; medians of interleaved repeats. The last line
is the SUMMARY on the 1B-shaped model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.utils import load

from benchlib import STORIES, banner, llama_1b_shaped, load as load_avg, median, table
from smoa_mlx.fuse import fuse_layers
from smoa_mlx.patch import apply_smoa, smoa_layers

VARIANTS = ["base", "unfused SMoA", "fused SMoA"]


def build(path: Path, variant: str, bits: int | None):
    model, tokenizer = load(str(path))
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    if variant != "base":
        apply_smoa(model, rank=8, num_blocks=2, alpha=8.0)
        mx.random.seed(1)
        for layer in smoa_layers(model).values():
            layer.smoa_b = [0.01 * mx.random.normal(b.shape) for b in layer.smoa_b]
        if variant.startswith("fused"):
            fuse_layers(model)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def decode_tps(model, prompt: mx.array, tokens: int) -> float:
    """Tokens per second after the first generated token (the prompt is excluded)."""
    steps = generate_step(prompt, model, max_tokens=tokens)
    mx.eval(next(steps)[0])
    tic = time.perf_counter()
    n = sum(1 for _ in steps)
    return n / (time.perf_counter() - tic)


def bench_model(name: str, path: Path, tokens: int, repeats: int, bits: int | None) -> dict:
    print(f"== {name}: {path}" + (f", quantized to {bits} bits" if bits else ""))
    models = {v: build(path, v, bits) for v in VARIANTS}
    prompt = mx.array(models["base"][1].encode("Once upon a time, there was a little"))
    tps = {v: [] for v in VARIANTS}
    for i in range(repeats + 1):  # the first round warms up
        for v, (model, _) in models.items():
            t = decode_tps(model, prompt, tokens)
            if i:
                tps[v].append(t)
    med = {v: median(t) for v, t in tps.items()}
    print(f"{tokens} tokens after a {prompt.size}-token prompt, median of {repeats}; {load_avg()}")
    table(["variant", "tokens/s", "vs base"], [[v, med[v], med[v] / med["base"]] for v in VARIANTS])
    return med


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="Tokens generated per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per variant.")
    parser.add_argument("--layers", type=int, default=4, help="Layers of the 1B-shaped model.")
    parser.add_argument("--work-dir", default="/tmp/smoa_bench", help="Where the generated model goes.")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="Quantize the base (group size 64).")
    args = parser.parse_args(argv)
    banner()
    if args.bits:  # stories260K's MLP width (172) has no quantization group size
        print("(stories260K-hf is not quantizable: skipped)\n")
    elif STORIES.exists():
        bench_model("stories260K-hf", STORIES, args.tokens, args.repeats, args.bits)
    big = bench_model("Llama-3.2-1B-shaped", llama_1b_shaped(Path(args.work_dir), args.layers),
                      args.tokens, args.repeats, args.bits)
    print(f"SUMMARY unfused_vs_base={big['unfused SMoA'] / big['base']:.3f} "
          f"fused_vs_base={big['fused SMoA'] / big['base']:.3f}")


if __name__ == "__main__":
    main()
