"""Fine-tune an mlx-lm model with SMoA (or HiRA, or mlx-lm's LoRA): `python -m smoa_mlx.train`.

Flags mirror `mlx_lm.lora`. The loop is one `mx.compile`d step (loss, gradient,
optimizer update) over the adapter parameters only; checkpoints carry the
optimizer state, step, data position and RNG key, so `--resume` continues a run
exactly. `train(args)` is the same thing for Python callers.

Launched by `mlx.launch`, it trains data-parallel (`distributed.py`): each process
takes its rows of every global batch of --batch-size, the gradients are summed over
the processes inside the compiled step and normalised by the token count of the whole
group, so N processes compute the update of one process with the same global batch.
Rank 0 logs and writes every file.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from . import checkpoint
from .adapters import smoa_config
from .cli import run
from .data import BUNDLED_DATA, Batcher, load_data
from .distributed import Distributed, array_digest, data_digest, model_digest
from .lr_scale import MODES, default_rate, step_scales
from .patch import (
    DEFAULT_TARGETS, apply_smoa, layer_relative, smoa_layers, summarize, target_paths,
)
from .rank import format_rank_report, rank_report
from .schedule import OPTIMIZERS, build_optimizer, cosine_schedule

DEFAULT_MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
METHODS = ("smoa", "hira", "lora")
# LoRA's default rate; SMoA's and HiRA's (None) depend on the model's width:
# lr_scale.default_rate, set once the model is loaded.
DEFAULT_LR = {"smoa": None, "hira": None, "lora": 2e-4}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEFAULTS = {
    "model": DEFAULT_MODEL, "data": str(BUNDLED_DATA), "train": True, "test": False,
    "test_batches": -1, "method": "smoa", "rank": 8, "num_blocks": None, "alpha": 8.0,
    "dropout": 0.0, "targets": list(DEFAULT_TARGETS), "num_layers": -1, "dtype": "float32",
    "upcast_base": False, "optimizer": "adamw", "learning_rate": None, "lr_scale": "anchor",
    "weight_decay": 0.0,
    "warmup": None, "iters": 200, "batch_size": 4, "grad_accumulation_steps": 1,
    "grad_checkpoint": False, "max_seq_length": 2048, "mask_prompt": None, "val_batches": 25,
    "steps_per_report": 10, "steps_per_eval": 200, "save_every": 100,
    "adapter_path": "adapters", "resume": False, "resume_adapter_file": None, "seed": 0,
    "distributed_timeout": 600.0, "config": None,
}
# Arguments that change which parameters exist: a resumed run must keep them.
STRUCTURAL = ("method", "rank", "num_blocks", "alpha", "targets", "num_layers", "dtype")
# Arguments that describe one invocation, not the run: never inherited on resume.
PER_INVOCATION = ("train", "test", "resume", "resume_adapter_file", "distributed_timeout", "config")
# Options that may differ between the processes of a distributed run (paths on each
# machine); the processes must agree on every other one.
LOCAL_OPTIONS = ("model", "data", "adapter_path", "resume_adapter_file", "distributed_timeout",
                 "config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smoa_mlx.train",
        description="SMoA fine-tuning of an mlx-lm model (flags mirror mlx_lm.lora; "
        "with no arguments: Llama 3.2 1B Instruct 4-bit on the bundled example data).",
    )
    a = p.add_argument
    flag = partial(a, action="store_true", default=None)
    a("--model", help=f"Local model directory or Hugging Face repo (default {DEFAULT_MODEL}).")
    a("--data", help="Directory with train/valid(/test).jsonl (default: the bundled example data).")
    flag("--train", help="Train (the default, unless --test is given alone).")
    flag("--test", help="Report the test-set loss (after training, or of --adapter-path alone).")
    a("--test-batches", type=int, help="Test batches, -1 for the whole test set (default -1).")
    a("--method", choices=METHODS, help="smoa (default), hira (smoa with one block) or lora "
      "(mlx-lm's LoRALinear, saved in mlx-lm's format).")
    a("--rank", type=int, help="Total rank budget r, split over the blocks (default 8).")
    a("--num-blocks", type=int, help="SMoA blocks K (default 2; hira is 1).")
    a("--alpha", type=float, help="scale = alpha / rank, for lora too (default 8).")
    a("--dropout", type=float, help="Dropout on the adapter input (default 0; above 0, SMoA steps "
      "take the per-block path, ~1.25x slower).")
    a("--targets", nargs="+", help=f"Modules to adapt (default {' '.join(DEFAULT_TARGETS)}).")
    a("--num-layers", type=int, help="Adapt the last N decoder layers, -1 for all (default -1).")
    a("--dtype", choices=list(DTYPES), help="dtype of the trainable parameters and their "
      "optimizer state (default float32).")
    flag("--upcast-base", help="Cast the base model's floating-point weights to float32 "
         "(on a CPU, bf16 matmul is ~25x slower than f32).")
    a("--optimizer", choices=OPTIMIZERS, help="adamw (default) or adam, with bias correction.")
    a("--learning-rate", type=float, help="Peak learning rate. Default: 2e-4 for lora; for "
      "smoa/hira 3e-2 * 64 / hidden_size (3e-2, the best rate measured on stories260K, ~1e-3 "
      "at hidden 2048). With --lr-scale anchor SMoA's rate means what LoRA's does "
      "(docs/RESULTS.md).")
    a("--lr-scale", choices=MODES, help="smoa/hira: multiply the step of each B_k by "
      "1/rms(M_k), so the rate means what it means for LoRA on any model (default anchor; "
      "none: plain AdamW, which wants ~1/rms(W0) times the rate). The saved adapter is the same "
      "either way (smoa_mlx/lr_scale.py).")
    a("--weight-decay", type=float, help="AdamW decoupled weight decay (default 0).")
    a("--warmup", type=int, help="Linear warmup updates before the cosine decay "
      "(default iters // 10).")
    a("--iters", type=int, help="Optimizer updates to run (default 200); each consumes "
      "--grad-accumulation-steps batches (mlx-lm counts batches instead).")
    a("--batch-size", type=int, help="Examples per batch (default 4). With several processes "
      "(mlx.launch) it is the global batch, split evenly over them, as in mlx-lm.")
    a("--grad-accumulation-steps", type=int, help="Batches averaged (token-weighted) into "
      "each update (default 1).")
    flag("--grad-checkpoint", help="Recompute decoder-layer activations in the backward pass "
         "(less memory, more time).")
    a("--max-seq-length", type=int, help="Truncate examples to this many tokens (default 2048).")
    a("--mask-prompt", action=argparse.BooleanOptionalAction, default=None, help="Loss on "
      "completions only (prompt/completion, chat and alpaca data). Default: on for the "
      "bundled example data, off otherwise (as in mlx-lm).")
    a("--val-batches", type=int, help="Validation batches, -1 for all (default 25).")
    a("--steps-per-report", type=int, help="Updates between progress lines (default 10).")
    a("--steps-per-eval", type=int, help="Updates between validations (default 200; also "
      "at the start and the end).")
    a("--save-every", type=int, help="Updates between checkpoints (default 100; also at the end).")
    a("--adapter-path", help="Adapter directory to write (default ./adapters).")
    flag("--resume", help="Continue the run checkpointed in --adapter-path exactly "
         "(weights, optimizer, step, data position, RNG).")
    a("--resume-adapter-file", help="Start from this adapters.safetensors; continues exactly "
      "when its training state is beside it, else reuses only the weights.")
    a("--seed", type=int, help="Seed for initialisation, data order and dropout (default 0).")
    a("--distributed-timeout", type=float, help="Under mlx.launch: seconds a process waits for "
      "the others in one exchange before it stops with an error, so a hung process cannot "
      "block the run forever; 0 waits forever (default 600).")
    a("-c", "--config", help="YAML file of options; keys are the flag names with underscores. "
      "Flags override it.")
    return p


def _actions() -> dict:
    return {a.dest: a for a in build_parser()._actions if a.dest not in ("help",)}


def _coerce(key: str, value, action, where: str):
    """Check one YAML value the way argparse would check the flag."""
    bad = ValueError(f"{where}: {key}: invalid value {value!r}")
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise bad
        return value
    if action.nargs == "+":
        value = value.split(",") if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if value is None or isinstance(value, (bool, list, dict)):
        raise bad
    try:
        value = (action.type or str)(value)
    except (TypeError, ValueError):
        raise bad from None
    if action.type is int and isinstance(value, float):
        raise bad
    if action.choices and value not in action.choices:
        raise ValueError(f"{where}: {key}: {value!r} is not one of {', '.join(action.choices)}")
    return value


def load_config(path) -> dict:
    """A YAML options file: keys are flag names (underscores or dashes), checked like flags."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    actions = _actions()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in actions or name == "config":
            raise ValueError(f"{path}: unknown key {key!r} (keys are flag names: learning_rate, ...)")
        out[name] = _coerce(name, value, actions[name], str(path))
    return out


def _validate(args: SimpleNamespace) -> None:
    positive = ("rank", "iters", "batch_size", "grad_accumulation_steps", "steps_per_report",
                "steps_per_eval", "save_every", "max_seq_length")
    for key in positive:
        if (value := getattr(args, key)) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    for key in ("num_layers", "val_batches", "test_batches"):
        value = getattr(args, key)
        if value == 0 or value < -1:
            raise ValueError(f"--{key.replace('_', '-')} must be -1 (all) or positive, got {value}")
    if args.method != "lora" and args.num_blocks < 1:
        raise ValueError(f"--num-blocks must be at least 1, got {args.num_blocks}")
    if args.method == "hira" and args.num_blocks != 1:
        raise ValueError(
            f"--method hira has one block; got --num-blocks {args.num_blocks} (use --method smoa)"
        )
    if (args.learning_rate is not None and not args.learning_rate > 0) or not args.alpha > 0:
        raise ValueError("--learning-rate and --alpha must be positive")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.warmup < args.iters:
        raise ValueError(f"--warmup must be in [0, --iters={args.iters}), got {args.warmup}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not args.distributed_timeout >= 0:
        raise ValueError(f"--distributed-timeout must be >= 0, got {args.distributed_timeout}")


def resolve_args(args) -> tuple[SimpleNamespace, checkpoint.Checkpoint | None]:
    """Flags/keys > YAML config > the resumed run's arguments > defaults; then check them.

    Returns the complete arguments and the checkpoint to resume from (or None).
    """
    given = dict(vars(args) if isinstance(args, (argparse.Namespace, SimpleNamespace)) else args)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}")
    merged = {k: v for k, v in given.items() if v is not None}
    if merged.get("config"):
        merged = {**load_config(merged["config"]), **merged}
    if isinstance(merged.get("targets"), str):
        merged["targets"] = merged["targets"].split(",")
    resume = checkpoint.resume_source(
        merged.get("resume"), merged.get("resume_adapter_file"),
        merged.get("adapter_path", DEFAULTS["adapter_path"]),
    )
    if resume is not None and resume.meta is not None:
        saved = resume.meta["args"]
        for key in STRUCTURAL:
            if key in merged and merged[key] != saved.get(key):
                raise ValueError(
                    f"{resume.source}: the run was trained with {key}={saved.get(key)!r}; "
                    f"resuming needs the same value, got {merged[key]!r}"
                )
        inherited = {k: v for k, v in saved.items() if k in DEFAULTS and k not in PER_INVOCATION}
        inherited.setdefault("lr_scale", "none")  # a run checkpointed before the step scale
        merged = {**inherited, **merged}
    a = SimpleNamespace(**{**DEFAULTS, **merged})
    if a.mask_prompt is None:  # on for the bundled chat data; off otherwise, as in mlx-lm
        a.mask_prompt = Path(a.data).resolve() == BUNDLED_DATA.resolve()
    if a.num_blocks is None:
        a.num_blocks = {"smoa": 2, "hira": 1, "lora": None}[a.method]
    if a.learning_rate is None:
        a.learning_rate = DEFAULT_LR[a.method]
    if a.warmup is None:
        a.warmup = a.iters // 10
    a.data, a.adapter_path = str(a.data), str(a.adapter_path)
    _validate(a)
    return a, resume


# ---------------------------------------------------------------- pure pieces


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Masked mean cross-entropy over the `mask` tokens, and their count.

    A batch without loss tokens (every completion truncated away) gives 0, not NaN.
    """
    logits = model(inputs)
    ntoks = mask.sum()
    ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
    return ce / mx.maximum(ntoks, 1), ntoks


def make_step(model: nn.Module, optimizer, loss=loss_fn, group=None):
    """One compiled function per micro-batch: loss, gradient, and (if `do_update`) the update.

    Gradients are summed weighted by each micro-batch's token count and divided by
    the total at the update, so N accumulated micro-batches give exactly the update
    of one batch holding all their tokens. Over a distributed `group` the same holds
    across processes: the loss and token count returned are those of the micro-batch
    over all ranks (so every rank sees the same loss, and the same NaN), and the
    update divides the summed gradients by the group's token count.
    Returns (loss, tokens, accumulator).
    """
    value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]
    world = group.size() if group is not None else 1

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask, acc, do_update):
        (value, ntoks), grad = value_and_grad(model, inputs, targets, mask)
        grad = tree_map(lambda g: g * ntoks, grad)
        if world > 1:
            stats = mx.distributed.all_sum(mx.stack([value * ntoks, ntoks]), group=group)
            ntoks = stats[1]
            value = stats[0] / mx.maximum(ntoks, 1)
        total = ntoks
        if acc is not None:
            grad = tree_map(mx.add, grad, acc[0])
            total = total + acc[1]
        if do_update:
            # Only the trainable parameters travel, grouped into few all_sums; the mean
            # over ranks of the token-weighted sums over the mean tokens per rank is
            # the mean over every token of the group.
            grad = average_gradients(grad, group=group)
            per_rank = mx.maximum(total, 1) / world
            # Back to each parameter's dtype: a float32 gradient would make the optimizer
            # turn a bfloat16 adapter into float32 (the token weighting promotes it).
            optimizer.update(model, tree_map(lambda g, p: (g / per_rank).astype(p.dtype), grad,
                                             model.trainable_parameters()))
            return value, ntoks, None
        return value, ntoks, (grad, total)

    return step, state


def evaluate(model: nn.Module, batches, loss=loss_fn, dist: Distributed | None = None) -> float:
    """Token-weighted mean loss over `batches` of (inputs, targets, mask); with `dist`,
    over every rank's rows of them."""
    total, ntoks = mx.array(0.0), mx.array(0.0)
    for batch in batches:
        value, n = loss(model, *batch)
        total, ntoks = total + value * n, ntoks + n
        mx.eval(total, ntoks)
    if dist is not None and dist.size > 1:
        total, ntoks = map(mx.array, dist.sum([total.item(), ntoks.item()], "an evaluation"))
    return (total / mx.maximum(ntoks, 1)).item()


def grad_checkpoint(layers) -> None:
    """Recompute these layers' activations in the backward pass instead of storing them.

    Like `mlx_lm.tuner.trainer.grad_checkpoint`, but only the given instances change:
    mlx-lm's rewrites the layer class for every model in the process.
    """
    cls = type(layers[0])
    if "_smoa_checkpoint" not in cls.__dict__:
        plain = cls.__call__

        def call(self, *args, **kwargs):
            if not self._smoa_checkpoint:
                return plain(self, *args, **kwargs)

            def inner(params, *args, **kwargs):
                self.update(params)
                return plain(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        cls.__call__ = call
        cls._smoa_checkpoint = False
    for layer in layers:
        layer._smoa_checkpoint = True


def estimate_memory(model: nn.Module, trainable: int, args, seq: int, batch: int | None = None) -> dict:
    """A rough peak-memory estimate in bytes: weights, adapter training state, activations
    (of `batch` examples; default --batch-size).

    SMoA layers rebuild `W0 + ΔW` (and their anchors in the backward pass) one layer at
    a time: a few float32 buffers the size of the largest adapted weight.
    """
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    size = _float_dtype(model).size
    # parameter + gradient + 2 Adam moments (+ the gradient accumulator)
    adapter = trainable * DTYPES[args.dtype].size * (4 + (args.grad_accumulation_steps > 1))
    adapter += 3 * 4 * max((math.prod(m.shape) for m in smoa_layers(model).values()), default=0)
    cfg, batch, act = getattr(model, "args", None), batch or args.batch_size, 0
    if cfg is not None and hasattr(cfg, "hidden_size"):
        h, n = cfg.hidden_size, cfg.num_hidden_layers
        inter = getattr(cfg, "intermediate_size", 4 * h)
        heads = getattr(cfg, "num_attention_heads", 1)
        # kept for the backward pass per token: ~10 hidden-size and 4 MLP-size vectors, and
        # one row of attention probabilities per head
        per_layer = batch * seq * (10 * h + 4 * inter + heads * seq) * size
        kept = n * batch * seq * h * size + per_layer if args.grad_checkpoint else n * per_layer
        act = kept + 3 * batch * seq * cfg.vocab_size * 4
    total = weights + adapter + act
    return {"weights": weights, "adapter": adapter, "activations": act, "total": total}


# ---------------------------------------------------------------- setup


def load_model(name: str):
    """`mlx_lm.load`, with a one-line error (and the --model hint) when it fails."""
    from mlx_lm.utils import load

    try:
        return load(name)
    except Exception as e:  # hub / network / format errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if Path(name).exists():
            raise ValueError(f"{name}: cannot load the model ({reason})") from None
        raise ValueError(
            f"cannot load model {name!r}: not a local directory, and fetching it from the "
            f"Hugging Face Hub failed ({type(e).__name__}); "
            "pass --model PATH to a local model directory"
        ) from None


def upcast_base(model: nn.Module) -> None:
    """Cast every floating-point parameter (norms, embeddings, quantization scales) to float32."""
    def up(p):
        return p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p

    model.update(tree_map(up, model.parameters()))


def adapt(model: nn.Module, args, resume: checkpoint.Checkpoint | None) -> tuple[list[str], dict]:
    """Freeze the model and add the method's adapter layers (loading resumed tensors).

    Returns the adapted module paths and the trainable-parameter summary.
    """
    if args.num_layers > len(model.layers):
        raise ValueError(
            f"--num-layers {args.num_layers} exceeds the model's {len(model.layers)} layers"
        )
    paths = target_paths(model, args.targets, args.num_layers)
    if args.method == "lora":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        linear_to_lora_layers(model, args.num_layers, lora_parameters(paths, args))
    else:
        orders = None
        if resume is not None:
            orders = checkpoint.smoa_orders(resume.adapter)
            if sorted(orders) != sorted(paths):
                raise ValueError(
                    f"{resume.source}: its adapted modules do not match --targets/--num-layers"
                )
        apply_smoa(model, keys=paths, rank=args.rank, num_blocks=args.num_blocks,
                   alpha=args.alpha, dropout=args.dropout, orders=orders)
    dtype = DTYPES[args.dtype]
    model.update(tree_map(lambda p: p.astype(dtype), model.trainable_parameters()))
    if resume is not None:
        checkpoint.load_into(model, args.method, resume.adapter, resume.source)
    return paths, summarize(model)


def lora_parameters(paths, args) -> dict:
    """mlx-lm's `lora_parameters` for the same modules; its scale is alpha/rank like SMoA's.

    mlx-lm names a decoder-layer module relative to its layer (`self_attn.q_proj`) and
    any other module by its full path.
    """
    keys = sorted({layer_relative(p) for p in paths})
    scale = args.alpha / args.rank
    return {"rank": args.rank, "scale": scale, "dropout": args.dropout, "keys": keys}


def adapter_config(model: nn.Module, args, paths) -> dict:
    """The adapter_config.json: the training arguments plus what loaders need."""
    run_args = {k: v for k, v in vars(args).items() if k != "model"}
    if args.method == "lora":
        lora = {"fine_tune_type": "lora", "lora_parameters": lora_parameters(paths, args)}
        return {**run_args, **lora, "model": args.model}
    return smoa_config(model, base_model=args.model, **run_args)


def _float_dtype(model: nn.Module):
    """The dtype the base model computes in: that of its (never quantized) norm weights."""
    norms = [m.weight.dtype for _, m in model.named_modules() if isinstance(m, nn.RMSNorm)]
    return norms[0] if norms else mx.float32


def describe(model: nn.Module, args, summary: dict) -> str:
    quant = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    dtype = str(_float_dtype(model)).split(".")[-1]
    base = f"{'/'.join(map(str, sorted(quant)))}-bit quantized, {dtype}" if quant else dtype
    blocks = f" K={args.num_blocks}" if args.method != "lora" else ""
    how = f"r={args.rank}{blocks} alpha={args.alpha}"
    return (
        f"Model {args.model} ({len(model.layers)} layers, {base}); method {args.method} {how} "
        f"on {' '.join(args.targets)}, lr {args.learning_rate:g}\n"
        f"Trainable parameters: {summary['percent']:.3f}% "
        f"({summary['trainable'] / 1e6:.3f}M/{summary['total'] / 1e6:.3f}M)"
    )


# ---------------------------------------------------------------- the run


@contextmanager
def _stop_on_sigint(announce: bool = True):
    """The first Ctrl-C asks the loop to stop after the current update (then it saves)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        if announce:
            print("\nCtrl-C: saving a checkpoint after this update (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(args) -> dict:
    """Run a training (or, with only `test`, an evaluation); returns a result summary.

    `args` is an argparse/SimpleNamespace or a dict of option names (missing ones
    take the defaults). All input is checked before anything is written.
    """
    args, resume = resolve_args(args)
    dist = Distributed.init(args.distributed_timeout)
    with dist.quiet():
        return _train(args, resume, dist)


def _batchers(data: dict, args, dist: Distributed, seed: int) -> dict[str, Batcher]:
    """This process's share of every global batch of --batch-size examples."""
    if args.batch_size % dist.size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch; it must be "
                         f"divisible by the {dist.size} processes")
    local = args.batch_size // dist.size
    return {s: Batcher(d, local, args.max_seq_length, seed=seed, rank=dist.rank,
                       world_size=dist.size) for s, d in data.items()}


def _agreement(args, data: dict, fingerprints: dict) -> tuple[dict, dict]:
    """What the processes of a run must share: options, data, and `fingerprints` of the
    model and the starting state."""
    shown = {f"the number of {s} examples": len(d) for s, d in data.items()}
    hashed = {f"--{k.replace('_', '-')}": v for k, v in vars(args).items()
              if k not in LOCAL_OPTIONS}
    hashed.update({f"the {s} data": data_digest(d) for s, d in data.items()})
    return shown, {**hashed, **fingerprints}


def _train(args, resume, dist: Distributed) -> dict:
    mx.reset_peak_memory()
    model, tokenizer = load_model(args.model)
    if not args.train:
        return _test_only(model, tokenizer, args, dist)
    if args.learning_rate is None:
        args.learning_rate = default_rate(model)
    splits = ("train", "valid") + (("test",) if args.test else ())
    data = load_data(args.data, tokenizer, mask_prompt=args.mask_prompt, splits=splits)
    batchers = _batchers(data, args, dist, args.seed)

    mx.random.seed(args.seed)
    if args.upcast_base:
        upcast_base(model)
    base = model_digest(model) if dist.size > 1 else None
    if args.method != "lora" and resume is None:
        print(f"Planning the {args.method} blocks of each adapted weight...", flush=True)
    paths, summary = adapt(model, args, resume)
    if args.grad_checkpoint:
        grad_checkpoint(model.layers)
    schedule = cosine_schedule(args.learning_rate, args.iters, args.warmup)
    scaled = args.method != "lora" and args.lr_scale != "none"
    scales = step_scales(model, args.lr_scale) if scaled else None
    optimizer = build_optimizer(args.optimizer, schedule, args.weight_decay, scales)
    progress = {"step": 0, "micro_step": 0, "window": _empty_window(), "trained_tokens": 0.0}
    if resume is not None and resume.meta is not None:
        checkpoint.restore_optimizer(optimizer, model, resume.optimizer, resume.source)
        progress = {k: resume.meta[k] for k in progress}
        hi, lo = resume.meta["rng"]
        mx.random.seed((hi << 32) | lo)
    else:
        optimizer.init(model.trainable_parameters())
    if dist.size > 1:
        state = {"adapter": checkpoint.model_adapter(model, args.method),
                 "optimizer": optimizer.state}
        dist.check_agreement(*_agreement(args, data, {
            "the base model (config, parameter shapes, sampled weights)": base,
            "the starting adapter and optimizer state (initialisation or checkpoint)":
                [array_digest(state), progress, _rng_key()],
        }))

    # Everything is checked; from here on rank 0 writes the adapter directory.
    out = Path(args.adapter_path)
    longest = min(max(len(e.tokens) for e in data["train"]), args.max_seq_length)
    local = args.batch_size // dist.size
    est = estimate_memory(model, summary["trainable"], args, longest, batch=local)
    truncated = sum(b.truncated for b in batchers.values())
    print(describe(model, args, summary))
    if _float_dtype(model) != mx.float32 and mx.default_device() == mx.cpu:
        print("Note: the base model computes in " + str(_float_dtype(model)).split(".")[-1]
              + " on the CPU, where that is ~25x slower than float32; pass --upcast-base")
    print(f"Data {args.data}: " + ", ".join(f"{len(data[s])} {s}" for s in splits)
          + f" examples; {truncated} truncated to --max-seq-length {args.max_seq_length}")
    gb = {k: f"{v / 1e9:.3f}" for k, v in est.items()}
    print(f"Estimated peak memory (rough): {gb['total']} GB = weights {gb['weights']} + adapter "
          f"training state {gb['adapter']} + activations {gb['activations']} "
          f"(batch {local} x {longest} tokens)", flush=True)
    if dist.size > 1:
        print(f"Distributed: {dist.size} processes, each {local} examples of every global "
              f"batch of {args.batch_size}; rank 0 logs and writes {out}")
    if progress["step"]:
        print(f"Resuming from {resume.source} at step {progress['step']}")
    elif (out / checkpoint.STATE).exists():
        print(f"Note: starting over in {out} (pass --resume to continue the run there)")
    if dist.main:
        checkpoint.rewrite_metrics(out, progress["step"] or None)

    config = adapter_config(model, args, paths)
    result = _Loop(model, optimizer, args, config, batchers, progress, dist).run()
    result.update(trainable=summary["trainable"], memory_estimate_gb=est["total"] / 1e9,
                  world_size=dist.size)
    # The high-rank update is SMoA's point: show it (LoRA's is capped at its rank). The
    # ranks hold the same adapter, so only rank 0 spends the decompositions.
    if dist.main:
        result["rank_report"] = rank_report(model)
        print(format_rank_report(result["rank_report"]))
    if args.test:
        model.eval()
        result["test_loss"] = evaluate(model, batchers["test"].eval_batches(args.test_batches),
                                       dist=dist)
        print(f"Test loss {result['test_loss']:.3f}, Test ppl {math.exp(result['test_loss']):.3f}")
    return result


def _rng_key() -> list[int]:
    return [int(x) for x in mx.random.state[0].tolist()]


def _empty_window() -> dict:
    return {"loss": 0.0, "tokens": 0.0, "steps": 0}


class _Loop:
    """The training loop's state: step, data position, report window, checkpoints."""

    def __init__(self, model, optimizer, args, config, batchers, progress, dist: Distributed):
        self.model, self.optimizer, self.args, self.config = model, optimizer, args, config
        self.dist = dist
        self.train_batches, self.valid = batchers["train"], batchers["valid"]
        self.out = Path(args.adapter_path)
        self.step, self.micro = progress["step"], progress["micro_step"]
        self.window, self.trained_tokens = progress["window"], progress["trained_tokens"]
        self.last_saved = self.step or None
        self.rng = _rng_key()  # at the last update boundary: a resumed run restarts there
        self.timer = {"time": 0.0, "tokens": 0.0, "steps": 0}
        self.session = {"time": 0.0, "tokens": 0.0, "steps": 0}
        self.last_train_loss = None

    def run(self) -> dict:
        args, start = self.args, self.step
        initial = self.validate() if start == 0 else None
        val_loss = initial
        step_fn, state = make_step(self.model, self.optimizer, group=self.dist.group)
        self.model.train()
        with _stop_on_sigint(announce=self.dist.main) as flag:
            try:
                while self.step < args.iters:
                    self.update(step_fn, state)
                    if self.step % args.steps_per_report == 0 or self.step == args.iters:
                        self.report()
                    if self.step % args.steps_per_eval == 0 or self.step == args.iters:
                        val_loss = self.validate()
                    if self.step % args.save_every == 0 or self.step == args.iters:
                        self.save()
                    # Every rank stops after the same update, whichever saw the Ctrl-C.
                    if self.dist.any(flag["stop"], f"the stop check after step {self.step}"):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self.interrupted()
                raise
        if start >= args.iters:
            print(f"Nothing to train: {self.out} is at step {start} >= --iters {args.iters}")
            self.save()  # the adapter files may lag the training state (an interrupted save)
        s = self.session
        return {
            "adapter_path": str(self.out), "steps": self.step, "initial_val_loss": initial,
            "val_loss": val_loss, "train_loss": self.last_train_loss,
            "trained_tokens": self.trained_tokens,
            "tokens_per_second": s["tokens"] / s["time"] if s["time"] else None,
            "iterations_per_second": s["steps"] / s["time"] if s["time"] else None,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }

    def update(self, step_fn, state) -> None:
        """One optimizer update over --grad-accumulation-steps batches."""
        accum = self.args.grad_accumulation_steps
        tic = time.perf_counter()
        acc, loss_sum, tokens = None, 0.0, 0.0
        for i in range(accum):
            batch = self.train_batches.batch(self.micro + i)
            value, ntoks, acc = step_fn(*batch, acc, i == accum - 1)
            with self.dist.wait(f"training step {self.step + 1}"):
                mx.eval(state, value, ntoks, acc)
            value, ntoks = value.item(), ntoks.item()
            if not math.isfinite(value):
                raise ValueError(_diverged(self.step + 1, "the loss", self.last_saved, self.args))
            loss_sum, tokens = loss_sum + value * ntoks, tokens + ntoks
        self.step, self.micro, self.rng = self.step + 1, self.micro + accum, _rng_key()
        dt = time.perf_counter() - tic
        for t in (self.timer, self.session):
            t["time"] += dt
            t["tokens"] += tokens
            t["steps"] += 1
        self.trained_tokens += tokens
        self.window["loss"] += loss_sum
        self.window["tokens"] += tokens
        self.window["steps"] += 1

    def report(self) -> None:
        args, t, s = self.args, self.timer, self.session
        loss = self.window["loss"] / max(self.window["tokens"], 1)
        lr = self.optimizer.learning_rate.item()
        peak = mx.get_peak_memory() / 1e9
        eta = (args.iters - self.step) * s["time"] / s["steps"]
        print(f"Iter {self.step}/{args.iters}: train loss {loss:.3f}, lr {lr:.3e}, "
              f"it/s {t['steps'] / t['time']:.3f}, tok/s {t['tokens'] / t['time']:.1f}, "
              f"peak mem {peak:.3f} GB, ETA {_fmt_time(eta)}", flush=True)
        self.last_train_loss = loss
        self.window = _empty_window()
        self.timer = {"time": 0.0, "tokens": 0.0, "steps": 0}
        if not self.dist.main:
            return
        checkpoint.append_metrics(self.out, {
            "type": "train", "step": self.step, "train_loss": loss, "learning_rate": lr,
            "iterations_per_second": t["steps"] / t["time"],
            "tokens_per_second": t["tokens"] / t["time"],
            "trained_tokens": self.trained_tokens, "peak_memory_gb": peak,
        })

    def validate(self) -> float:
        tic = time.perf_counter()
        self.model.eval()
        loss = evaluate(self.model, self.valid.eval_batches(self.args.val_batches), dist=self.dist)
        self.model.train()
        took = time.perf_counter() - tic
        print(f"Iter {self.step}: val loss {loss:.3f}, val took {took:.1f}s", flush=True)
        if self.dist.main:
            record = {"type": "val", "step": self.step, "val_loss": loss, "val_time": took}
            checkpoint.append_metrics(self.out, record)
        return loss

    def save(self) -> None:
        adapter = checkpoint.model_adapter(self.model, self.args.method)
        if not checkpoint.all_finite(adapter):
            raise ValueError(_diverged(self.step, "the adapter", self.last_saved, self.args))
        meta = {
            "step": self.step, "micro_step": self.micro, "window": self.window,
            "trained_tokens": self.trained_tokens, "rng": self.rng,
            "args": vars(self.args),
        }
        if self.dist.main:
            checkpoint.save(self.out, adapter, self.optimizer.state, self.config, meta)
        self.last_saved = self.step
        print(f"Iter {self.step}: saved {self.out / checkpoint.numbered(self.step)}", flush=True)

    def interrupted(self) -> None:
        """Ctrl-C: save the last completed update, say how to resume."""
        if int(self.optimizer.step.item()) == self.step + 1:
            # Interrupted after the compiled update but before its bookkeeping.
            self.step, self.micro = self.step + 1, self.micro + self.args.grad_accumulation_steps
            self.rng = _rng_key()
        if self.last_saved != self.step:
            self.save()
        if self.dist.main:
            print(f"Interrupted at step {self.step}; checkpoint in {self.out}. Resume with: "
                  f"python -m smoa_mlx.train --resume --adapter-path {self.out}",
                  file=sys.stderr, flush=True)


def _diverged(step: int, what: str, last_saved, args) -> str:
    kept = f"the last good checkpoint (step {last_saved})" if last_saved else "nothing"
    return (
        f"{what} became NaN/inf at step {step}; training stopped, keeping {kept} in "
        f"{args.adapter_path}. "
        f"Try a lower --learning-rate (now {args.learning_rate:g})"
    )


def _test_only(model, tokenizer, args, dist: Distributed) -> dict:
    from .adapters import load_adapter

    data = load_data(args.data, tokenizer, mask_prompt=args.mask_prompt, splits=("test",))
    if args.adapter_path:
        load_adapter(model, args.adapter_path)
    model.eval()
    batcher = _batchers(data, args, dist, seed=0)["test"]
    if dist.size > 1:
        fingerprint = {"the model and adapter (config, shapes, sampled weights)": model_digest(model)}
        dist.check_agreement(*_agreement(args, data, fingerprint))
    loss = evaluate(model, batcher.eval_batches(args.test_batches), dist=dist)
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}")
    return {"adapter_path": args.adapter_path, "test_loss": loss}


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
