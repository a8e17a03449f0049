"""Decoding speed: the base vs the base with an adapter, LoRA and SMoA, unfused and fused.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_generate.py --model ~/.cache/smoa-fixtures/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  python scripts/bench_generate.py          # the generated Llama-3.2-1B-shaped model [--bits 4]

Greedy decoding with mlx-lm's `generate_step` (KV cache, no early stop at EOS) of a
fixed number of tokens after a short prompt. Adapters are r=8 on q,k,v,up,down with
nonzero B. Rows:
- base;
- mlx-lm LoRA, unfused (`LoRALinear`, as `mlx_lm.load(..., adapter_path=)` gives it);
- SMoA K=2 as training leaves it (every call rebuilds from A, B: the old inference path);
- SMoA prepared with the base kept (`serve --adapter-dir`: `prepare_for_inference(keep_base=True)`);
- SMoA prepared for generate/chat (`prepare_for_inference()`: a float layer is fused, a
  quantized one adds its update in the format timed fastest here, `layer.PREPARED_FORMATS`);
- quantized models only, SMoA prepared in each of those formats, forced;
- SMoA fused (`fuse_layers`; a quantized base is re-quantized, which can lose the update).
Each row also times prefill: one forward pass over a `--prefill`-token prompt.
`--model` takes any model `smoa_mlx.load` reads (a GGUF too): a quantized model is
measured as it is and de-quantized to float32, so the SUMMARY covers both. Decode
tokens/s excludes the prompt; medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

import smoa_mlx
from benchlib import STORIES, banner, llama_1b_shaped, load as load_avg, median, table
from smoa_mlx.fuse import fuse_layers
from smoa_mlx.inference import prepare_for_inference
from smoa_mlx.layer import PREPARED_FORMATS
from smoa_mlx.patch import DEFAULT_TARGETS, apply_smoa, smoa_layers

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
         "with her dog, and every evening her mother told her a story about the stars. ")
VARIANTS = ["base", "LoRA unfused", "SMoA unprepared", "SMoA keep-base", "SMoA prepared", "SMoA fused"]
FORCED = {f"SMoA prepared {f}": f for f in PREPARED_FORMATS}  # quantized models only
SHORT = {"LoRA unfused": "lora", "SMoA unprepared": "smoa_old", "SMoA keep-base": "smoa_keep",
         "SMoA prepared": "smoa", "SMoA fused": "fused"} | {v: f"smoa_{f}" for v, f in FORCED.items()}


def build(path: Path, variant: str, bits: int | None, to_float: bool):
    model, tokenizer = smoa_mlx.load(str(path))
    if to_float:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.random.seed(1)
    if variant.startswith("LoRA"):
        keys = [p for p, _ in model.layers[0].named_modules() if p.split(".")[-1] in DEFAULT_TARGETS]
        linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 1.0, "dropout": 0.0,
                                                         "keys": keys})
        loras = [m for _, m in model.named_modules() if "lora_b" in m]
        assert len(loras) == len(keys) * len(model.layers)
        for m in loras:
            m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    elif variant != "base":
        apply_smoa(model, rank=8, num_blocks=2, alpha=8.0)
        for layer in smoa_layers(model).values():
            layer.smoa_b = [0.01 * mx.random.normal(b.shape) for b in layer.smoa_b]
        if variant == "SMoA fused":
            fuse_layers(model)
        elif variant in FORCED:
            for layer in smoa_layers(model).values():
                layer.prepare(FORCED[variant])
        elif variant != "SMoA unprepared":
            prepare_for_inference(model, keep_base=variant == "SMoA keep-base")
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


def prefill_tps(model, prompt: mx.array) -> float:
    """Prompt tokens per second of one forward pass over the whole prompt (a fresh cache)."""
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    mx.eval(model(prompt[None], cache=cache))
    return prompt.size / (time.perf_counter() - tic)


def bench_model(name: str, path: Path, tokens: int, repeats: int, bits=None, to_float=False,
                prefill: int = 256, quantized: bool = False) -> dict:
    print(f"== {name}: {path}" + (f", quantized to {bits} bits" if bits else "")
          + (", de-quantized to float32" if to_float else ""))
    variants = VARIANTS + (list(FORCED) if quantized else [])
    models = {v: build(path, v, bits, to_float) for v in variants}
    tokenizer = models["base"][1]
    prompt = mx.array(tokenizer.encode("Once upon a time, there was a little"))
    long = mx.array((tokenizer.encode(STORY) * prefill)[:prefill])
    tps = {v: [] for v in variants}
    pre = {v: [] for v in variants}
    for i in range(repeats + 1):  # the first round warms up
        for v, (model, _) in models.items():
            t, p = decode_tps(model, prompt, tokens), prefill_tps(model, long)
            if i:
                tps[v].append(t)
                pre[v].append(p)
    med = {v: median(t) for v, t in tps.items()}
    mpre = {v: median(t) for v, t in pre.items()}
    print(f"decode: {tokens} tokens after a {prompt.size}-token prompt; prefill: a {long.size}-token "
          f"prompt; medians of {repeats}; {load_avg()}")
    table(["variant", "decode tok/s", "vs base", "prefill tok/s", "vs base", "prepared MiB", "formats"],
          [[v, med[v], med[v] / med["base"], mpre[v], mpre[v] / mpre["base"], *prepared(models[v][0])]
           for v in variants])
    print()
    ratios = {SHORT[v]: med[v] / med["base"] for v in variants[1:]}
    return ratios | {f"{SHORT[v]}_prefill": mpre[v] / mpre["base"] for v in variants[1:]}


def prepared(model) -> tuple[float, str]:
    """MiB the SMoA layers' prepared arrays add, and their formats with counts."""
    layers = list(smoa_layers(model).values())
    formats = Counter(str(m.prepared_format) for m in layers)
    return (sum(m.prepared_nbytes for m in layers) / 2**20,
            " ".join(f"{f}:{n}" for f, n in sorted(formats.items())) or "-")


def summary(prefix: str, ratios: dict) -> str:
    return " ".join(f"{prefix}{k}_vs_base={r:.3f}" for k, r in ratios.items())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="A model smoa_mlx.load reads (directory or .gguf); default: the 1B-shaped one.")
    parser.add_argument("--tokens", type=int, default=32, help="Tokens generated per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per variant.")
    parser.add_argument("--prefill", type=int, default=256, help="Prompt tokens of the prefill timing.")
    parser.add_argument("--layers", type=int, default=4, help="Layers of the 1B-shaped model.")
    parser.add_argument("--work-dir", default="/tmp/smoa_bench", help="Where the generated model goes.")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="Quantize the 1B-shaped base (group size 64).")
    args = parser.parse_args(argv)
    banner()
    if args.model:
        model, _, config = smoa_mlx.load(args.model, return_config=True)
        quantized = "quantization" in config
        del model
        parts = [summary("float_", bench_model("float32", args.model, args.tokens, args.repeats,
                                               to_float=quantized, prefill=args.prefill))]
        if quantized:
            parts.append(summary("quant_", bench_model("quantized", args.model, args.tokens, args.repeats,
                                                         prefill=args.prefill, quantized=True)))
        print("SUMMARY " + " ".join(parts))
        return
    if args.bits:  # stories260K's MLP width (172) has no quantization group size
        print("(stories260K-hf is not quantizable: skipped)\n")
    elif STORIES.exists():
        bench_model("stories260K-hf", STORIES, args.tokens, args.repeats, prefill=args.prefill)
    big = bench_model("Llama-3.2-1B-shaped", llama_1b_shaped(Path(args.work_dir), args.layers),
                      args.tokens, args.repeats, args.bits, prefill=args.prefill,
                      quantized=bool(args.bits))
    print("SUMMARY " + summary("", big))


if __name__ == "__main__":
    main()
