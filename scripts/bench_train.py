"""Training-step time and memory: frozen base, mlx-lm LoRA, SMoA (K=2, 4) and HiRA.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_train.py
  python scripts/bench_train.py --model ~/.cache/smoa-fixtures/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

Models: a generated float32 Llama with Llama-3.2-1B layer shapes (hidden 2048, 32/8
heads, MLP 8192; 4 layers, small vocabulary) and the real stories260K-hf. Each
variant adapts q,k,v,up,down at rank 8 and runs the trainer's compiled step
(`smoa_mlx.train.make_step`: loss, gradient, AdamW update) on a 4 x 256 batch; the
floor is the frozen base's forward+backward w.r.t. the input embeddings only. All
variants live in one process and run interleaved; times are medians.

Memory per variant = what building it left resident (weights, adapter, optimizer
state) + the step's transient peak (MLX peak minus active memory before the step),
so the other variants alive in the process do not count.
`--model` takes any model `smoa_mlx.load` reads (a GGUF too) instead: a quantized one is
benchmarked de-quantized to float32 and as it is (QLoRA-style: both adapters on the
quantized weights), and the SUMMARY covers both.
The last line is the SUMMARY for SMoA r=8 K=2 on the 1B-shaped model.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

import smoa_mlx

from benchlib import STORIES, banner, llama_1b_shaped, load as load_avg, median, table, time_interleaved
from smoa_mlx.patch import DEFAULT_TARGETS, apply_smoa
from smoa_mlx.train import make_step

LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
VARIANTS = ["frozen base (floor)", "LoRA r=8", "SMoA r=8 K=2", "SMoA r=8 K=4", "HiRA r=8 (K=1)"]


def batch(vocab: int, shape) -> tuple[mx.array, mx.array, mx.array]:
    tokens = mx.random.randint(0, vocab, (shape[0], shape[1] + 1))
    return tokens[:, :-1], tokens[:, 1:], mx.ones(shape)


def load(path, to_float: bool = False):
    model, _ = smoa_mlx.load(str(path))
    if to_float:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    return model


def build(path: Path, variant: str, data, to_float: bool = False):
    """The variant's model and a zero-argument step; planning time is returned too."""
    model = load(path, to_float)
    model.freeze()
    tic = time.perf_counter()
    if variant.startswith("frozen"):
        inputs, targets, mask = data
        h = model.model.embed_tokens(inputs)

        def floor_loss(h):
            logits = model(inputs, input_embeddings=h)
            return (nn.losses.cross_entropy(logits, targets) * mask).sum() / mask.sum()

        grad = mx.compile(mx.value_and_grad(floor_loss))
        mx.eval(h)
        return model, lambda: grad(h), 0.0
    if variant.startswith("LoRA"):
        linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 1.0, "dropout": 0.0, "keys": LORA_KEYS})
    else:
        k = 1 if variant.startswith("HiRA") else int(variant.rsplit("=", 1)[1])
        apply_smoa(model, keys=list(DEFAULT_TARGETS), rank=8, num_blocks=k, alpha=8.0)
    planned = time.perf_counter() - tic
    model.train()
    step, state = make_step(model, optim.AdamW(learning_rate=1e-5))
    mx.eval(model.parameters())
    return model, lambda: [step(*data, None, True)[0], state], planned


def bench_model(name: str, path: Path, repeats: int, seq: tuple[int, int], to_float: bool = False) -> dict:
    print(f"== {name}: {path}")
    mx.random.seed(0)
    model = load(path)
    data = batch(model.args.vocab_size, seq)
    mx.eval(*data)
    del model
    steps, resident, plan_time = {}, {}, {}
    for v in VARIANTS:
        gc.collect()
        before = mx.get_active_memory()
        model, step, plan_time[v] = build(path, v, data, to_float)
        mx.eval(step())  # compiles, and creates the optimizer state
        gc.collect()
        resident[v] = mx.get_active_memory() - before
        steps[v] = (model, step)
    transient = {}
    times = time_interleaved({v: steps[v][1] for v in VARIANTS}, repeats, warmup=0, peaks=transient)
    med = {v: median(t) for v, t in times.items()}
    mem = {v: resident[v] + max(transient[v]) for v in VARIANTS}
    rows = []
    for v in VARIANTS:
        rows.append([v, med[v], med[v] / med["frozen base (floor)"], med[v] / med["LoRA r=8"],
                     mem[v] / 2**20, mem[v] / mem["LoRA r=8"], resident[v] / 2**20, plan_time[v]])
    print(f"batch {seq[0]} x {seq[1]}, median of {repeats} interleaved steps; {load_avg()}")
    table(["variant", "step s", "vs floor", "vs LoRA", "peak MiB", "mem vs LoRA", "resident MiB", "adapt s"], rows)
    return {"step": med, "mem": mem}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="A model smoa_mlx.load reads (directory or .gguf); default: the 1B-shaped one.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per variant.")
    parser.add_argument("--layers", type=int, default=4, help="Layers of the 1B-shaped model.")
    parser.add_argument("--seq", type=int, nargs=2, default=[4, 256], help="Batch size and length.")
    parser.add_argument("--work-dir", default="/tmp/smoa_bench", help="Where the generated model goes.")
    args = parser.parse_args(argv)
    banner()
    seq = tuple(args.seq)
    if args.model:
        _, _, config = smoa_mlx.load(args.model, return_config=True)
        runs = {"float_": bench_model("float32", args.model, args.repeats, seq, to_float="quantization" in config)}
        if "quantization" in config:
            runs["quant_"] = bench_model("quantized", args.model, args.repeats, seq)
        print("SUMMARY " + " ".join(summary(prefix, r) for prefix, r in runs.items()))
        return
    if STORIES.exists():
        bench_model("stories260K-hf", STORIES, args.repeats, seq)
    else:
        print(f"(skipping stories260K-hf: {STORIES} is absent)\n")
    big = bench_model("Llama-3.2-1B-shaped", llama_1b_shaped(Path(args.work_dir), args.layers), args.repeats, seq)
    print("SUMMARY " + summary("", big))


def summary(prefix: str, run: dict) -> str:
    s, m = run["step"], run["mem"]
    return (f"{prefix}smoa_vs_lora_step={s['SMoA r=8 K=2'] / s['LoRA r=8']:.3f} "
            f"{prefix}smoa_vs_lora_mem={m['SMoA r=8 K=2'] / m['LoRA r=8']:.3f} "
            f"{prefix}smoa_vs_floor_step={s['SMoA r=8 K=2'] / s['frozen base (floor)']:.3f}")


if __name__ == "__main__":
    main()
