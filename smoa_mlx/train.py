"""Fine-tune an mlx-lm model with SMoA (or HiRA, or mlx-lm's LoRA): `python -m smoa_mlx.train`.

Flags mirror `mlx_lm.lora` (the option table is `options.TrainOptions`; a YAML config
may be an mlx_lm.lora one). This module sets a run up (model, data, adapter layers,
optimizer, resumed state) and hands it to `trainer.Loop`; `train(args)` is the same
thing for Python callers.

Launched by `mlx.launch`, it trains data-parallel (`distributed.py`): each process
takes its rows of every global batch of --batch-size, the gradients are summed over
the processes inside the compiled step and normalised by the token count of the whole
group, so N processes compute the update of one process with the same global batch.
Rank 0 logs and writes every file.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from . import checkpoint
from .card import write_adapter_card
from .cli import run
from .data import FEATURES, Batcher, load_data, warn
from .distributed import Distributed, array_digest, data_digest, model_digest
from .errors import ConfigError
from .hub import adapter_files, upload_folder
from .loader import load_base, load_model
from .lr_scale import default_rate, step_scales
from .modes import SFT, loss_fn, make_mode
from .config_file import load_config, mlx_lm_settings
from .options import (
    BUNDLED_MODEL, DEFAULT_LR, DEFAULTS, LOCAL_OPTIONS, METHODS, MLX_LM_METHODS, PER_INVOCATION,
    REAL_MODEL, STRUCTURAL, build_parser, resolve, resolve_length,
)
from .rank import format_rank_report, rank_report
from .reporting import require_trackers, tracking
from .schedule import build_optimizer, build_schedule
from .trainer import (
    DTYPES, Loop, adapt, adapter_config, describe, estimate_memory, eval_total, evaluate,
    grad_checkpoint, make_step, upcast_base, _float_dtype, _rng_key,
)

__all__ = [
    "BUNDLED_MODEL", "DEFAULTS", "DEFAULT_LR", "DTYPES", "LOCAL_OPTIONS", "METHODS",
    "PER_INVOCATION", "STRUCTURAL", "build_parser", "evaluate", "load_config", "load_model",
    "loss_fn", "main", "make_step", "resolve_args", "train",
]
resolve_args = resolve

def train(args) -> dict:
    """Run a training (or, with only `test`, an evaluation); returns a result summary.

    `args` is an argparse/SimpleNamespace or a dict of option names (missing ones
    take the defaults). All input is checked before anything is written.
    """
    args, resume = resolve(args)
    dist = Distributed.init(args.distributed_timeout)
    with dist.quiet():
        return _train(args, resume, dist)


def _batchers(data: dict, args, dist: Distributed, seed: int, mode=SFT()) -> dict[str, Batcher]:
    """This process's share of every global batch of --batch-size examples, as `mode` batches."""
    if args.batch_size % dist.size:
        raise ConfigError(f"--batch-size {args.batch_size} is the global batch; it must be "
                         f"divisible by the {dist.size} processes")
    local = args.batch_size // dist.size
    batchers = {s: mode.batcher(d, local, args.max_seq_length, seed=seed, rank=dist.rank,
                                world_size=dist.size) for s, d in data.items() if d}
    if mode.record_kind == "preference" and dist.main:
        _warn_cut_pairs(batchers, args)
    return batchers


def _warn_cut_pairs(batchers: dict, args) -> None:
    """Pairs longer than --max-seq-length lose reply tokens, and a preference loss compares
    the replies' log-probabilities: the loss changes with no error, so say it once."""
    cut = sum(b.truncated for b in batchers.values())
    if not cut:
        return
    total = sum(len(b.examples) for b in batchers.values())
    empty = sum(b.fully_masked for b in batchers.values())
    dropped = f" ({empty} keep no reply token and count for nothing)" if empty else ""
    warn(f"{cut} of {total} preference pairs are longer than --max-seq-length "
         f"{args.max_seq_length}: their replies are cut{dropped}, which changes their "
         f"{args.train_mode.upper()} loss; raise --max-seq-length to keep them whole")


def _agreement(args, data: dict, fingerprints: dict) -> tuple[dict, dict]:
    """What the processes of a run must share: options, data, and `fingerprints` of the
    model and the starting state."""
    shown = {f"the number of {s} examples": len(d) for s, d in data.items()}
    hashed = {f"--{k.replace('_', '-')}": v for k, v in vars(args).items()
              if k not in LOCAL_OPTIONS}
    hashed.update({f"the {s} data": data_digest(d) for s, d in data.items()})
    return shown, {**hashed, **fingerprints}


def _train(args, resume, dist: Distributed) -> dict:
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    maybe_set_recommended_wired_limit()  # as mlx_lm.lora: keep the model resident on Metal; no-op elsewhere
    mx.reset_peak_memory()
    mode = make_mode(args)  # what a batch is and its loss (modes.py)
    if dist.main and args.train:
        require_trackers(args.report_to)  # a missing wandb / swanlab before any work
    model, tokenizer, _, _ = load_base(args.model, trust_remote_code=args.trust_remote_code)
    if not args.train:
        return _test_only(model, tokenizer, args, dist, mode)
    if args.learning_rate is None:  # smoa/hira: follows the width (lr_scale.default_rate)
        args.learning_rate = default_rate(model)
    splits = ("train", "valid") + (("test",) if args.test else ())
    data = _load_data(args, tokenizer, splits, mode.record_kind)
    batchers = _batchers(data, args, dist, args.seed, mode)
    resolve_length(args, batchers["train"].num_batches)  # --epochs as updates

    mx.random.seed(args.seed)
    if args.upcast_base:
        upcast_base(model)
    base = model_digest(model) if dist.size > 1 else None
    if args.method not in MLX_LM_METHODS and resume is None:
        print(f"Planning the {args.method} blocks of each adapted weight...", flush=True)
    paths, summary = adapt(model, args, resume, progress=dist.main)
    if args.grad_checkpoint:
        grad_checkpoint(model.layers)
    schedule = build_schedule(args.lr_schedule, args.learning_rate, args.iters, args.warmup)
    scales = None if args.method in MLX_LM_METHODS or args.lr_scale == "none" else step_scales(model, args.lr_scale)
    optimizer = build_optimizer(args.optimizer, schedule, args.weight_decay,
                                args.optimizer_config.get(args.optimizer), scales)
    state = checkpoint.TrainingState()
    if resume is not None and resume.state is not None:
        checkpoint.restore_optimizer(optimizer, model, resume.optimizer, resume.source)
        state = resume.state
        hi, lo = state.rng
        mx.random.seed((hi << 32) | lo)
    else:
        optimizer.init(model.trainable_parameters())
    if dist.size > 1:
        tensors = {"adapter": checkpoint.model_adapter(model, args.method),
                   "optimizer": optimizer.state}
        position = [state.step, state.micro_step, state.window, state.trained_tokens]
        dist.check_agreement(*_agreement(args, data, {
            "the base model (config, parameter shapes, sampled weights)": base,
            "the starting adapter and optimizer state (initialisation or checkpoint)":
                [array_digest(tensors), position, _rng_key()],
        }))

    # Everything is checked; from here on rank 0 writes the adapter directory.
    out = Path(args.adapter_path)
    longest = min(max(len(e.tokens) for e in data["train"]), args.max_seq_length)
    local = args.batch_size // dist.size
    rows = local * (2 if mode.record_kind == "preference" else 1)  # chosen + rejected rows
    est = estimate_memory(model, summary["trainable"], args, longest, batch=rows)
    truncated = sum(b.truncated for b in batchers.values())
    print(describe(model, args, summary))
    settings = mlx_lm_settings(args)
    if settings:
        print(settings)
    if _float_dtype(model) != mx.float32 and mx.default_device() == mx.cpu:
        print("Note: the base model computes in " + str(_float_dtype(model)).split(".")[-1]
              + " on the CPU, where that is ~25x slower than float32; pass --upcast-base")
    print(f"Data {args.data}: " + ", ".join(f"{len(data[s])} {s}" for s in splits)
          + f" examples; {truncated} truncated to --max-seq-length {args.max_seq_length}")
    if args.epochs:
        print(f"{args.epochs} epochs of {batchers['train'].num_batches} batches of "
              f"{args.batch_size} = {args.iters} updates of {args.grad_accumulation_steps} "
              f"batch{'es' if args.grad_accumulation_steps > 1 else ''}")
    gb = {k: f"{v / 1e9:.3f}" for k, v in est.items()}
    print(f"Estimated peak memory (rough): {gb['total']} GB = weights {gb['weights']} + adapter "
          f"training state {gb['adapter']} + activations {gb['activations']} "
          f"(batch {rows} x {longest} tokens)", flush=True)
    if dist.size > 1:
        print(f"Distributed: {dist.size} processes, each {local} examples of every global "
              f"batch of {args.batch_size}; rank 0 logs and writes {out}")
    if state.step:
        print(f"Resuming from {resume.source} at step {state.step}")
    elif (out / checkpoint.STATE).exists():
        print(f"Note: starting over in {out} (pass --resume to continue the run there)")
    if dist.main:
        checkpoint.rewrite_metrics(out, state.step or None)
        checkpoint.remove_stale_temps(out)

    config = adapter_config(model, args, paths)
    with tracking(args.report_to, args.project_name, out, vars(args), dist.main) as callback:
        result = Loop(model, optimizer, args, config, batchers, state, dist, mode, callback).run()
    result.update(trainable=summary["trainable"], memory_estimate_gb=est["total"] / 1e9,
                  world_size=dist.size)
    # The high-rank update is SMoA's point: show it (LoRA's is capped at its rank). The
    # ranks hold the same adapter, so only rank 0 spends the decompositions.
    if dist.main:
        result["rank_report"] = rank_report(model)
        print(format_rank_report(result["rank_report"]))
    if args.test:
        model.eval()
        result["test_loss"] = _test_loss(model, batchers["test"], args, dist, mode)
    if dist.main:
        write_adapter_card(out, metrics={**result, "data": args.data})
        if args.upload_repo:
            upload_folder(out, args.upload_repo, files=adapter_files(out),
                          private=args.upload_private)
    if args.model == str(BUNDLED_MODEL) and dist.main:
        print(f"Adapter saved in {out}. That was the tiny bundled model (a smoke test); to "
              f"fine-tune a real one: python -m smoa_mlx.train --model {REAL_MODEL}")
    return result


def _load_data(args, tokenizer, splits, kind: str = "sft") -> dict:
    """Local directories and hub datasets (`data`), or mlx-lm's `hf_dataset` config, as
    `kind` records (SFT examples or preference pairs)."""
    spec = args.data if args.hf_dataset is None else args.hf_dataset
    features = {k: getattr(args, k) for k in FEATURES if getattr(args, k) is not None}
    return load_data(spec, tokenizer, mask_prompt=args.mask_prompt, splits=splits, kind=kind,
                     **features)


def _test_loss(model, batcher, args, dist, mode) -> float:
    loss = evaluate(model, batcher.eval_batches(args.test_batches), mode.loss, dist=dist,
                    desc="Testing", total=eval_total(batcher, args.test_batches))
    ppl = f", Test ppl {math.exp(loss):.3f}" if mode.record_kind == "sft" else ""
    print(f"Test loss {loss:.3f}{ppl}")
    return loss


def _test_only(model, tokenizer, args, dist: Distributed, mode) -> dict:
    from .adapters import load_adapter

    data = _load_data(args, tokenizer, ("test",), mode.record_kind)
    if args.adapter_path:
        load_adapter(model, args.adapter_path)
    model.eval()
    batcher = _batchers(data, args, dist, seed=0, mode=mode)["test"]
    if dist.size > 1:
        fingerprint = {"the model and adapter (config, shapes, sampled weights)": model_digest(model)}
        dist.check_agreement(*_agreement(args, data, fingerprint))
    return {"adapter_path": args.adapter_path, "test_loss": _test_loss(model, batcher, args, dist, mode)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.test and not args.train:  # as in mlx-lm: --test alone evaluates --adapter-path
        args.train = False
    try:
        train(args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    run(main)
