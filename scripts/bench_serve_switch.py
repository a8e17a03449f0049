"""How long `serve --adapter-dir` takes to load an adapter the first time and to switch between
loaded ones (the base is loaded once; switching swaps the adapter's modules in place and, on a
float base, merges the activated adapter's layers: `inference.prepare_for_inference`), and
the memory the active adapter's merged weights hold beside the base.

    PYTHONPATH=. python scripts/bench_serve_switch.py [--model DIR]   # default: a synthetic Llama
"""

import argparse
import tempfile

import mlx.core as mx
from pathlib import Path

import smoa_mlx
from smoa_mlx.adapters import smoa_config
from smoa_mlx.serve import Adapters
from smoa_mlx.synthetic import make_llama


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="base model dir (default: hidden 1024 x 8 layers, synthetic)")
    p.add_argument("--adapters", type=int, default=3)
    args = p.parse_args()
    base = args.model or str(make_llama(Path(tempfile.mkdtemp()) / "m", hidden_size=1024, num_hidden_layers=8,
                                        intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4))
    root = Path(tempfile.mkdtemp())
    for i in range(args.adapters):
        model, _ = smoa_mlx.load(base)
        smoa_mlx.apply_smoa(model, rank=8, num_blocks=4, alpha=16.0)
        smoa_mlx.save_adapter(model, root / f"a{i}", smoa_config(model, base_model=base))
    model, _ = smoa_mlx.load(base)
    mx.eval(model.parameters())
    bare = mx.get_active_memory()
    adapters = Adapters(model, "base", None, root)
    loads = [adapters.resolve(f"a{i}").load_seconds for i in range(args.adapters)]
    adapters.activate(adapters.default)
    resident = mx.get_active_memory()
    adapters.activate(adapters.resolve("a0"))
    active = mx.get_active_memory()
    switches = []
    for k in range(30):
        for variant in (adapters.resolve(f"a{k % args.adapters}"), adapters.default):
            adapters.activate(variant)
            switches.append(adapters.switch_seconds)
    switches.sort()
    print(f"{base}: first load {1e3 * min(loads):.1f}-{1e3 * max(loads):.1f} ms; "
          f"switch median {1e3 * switches[len(switches) // 2]:.1f} ms, max {1e3 * switches[-1]:.1f} ms; "
          f"base {bare / 2**20:.0f} MiB, {args.adapters} adapters loaded +{(resident - bare) / 2**20:.0f} MiB, "
          f"one active +{(active - resident) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
