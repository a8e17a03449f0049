"""The training loop: the compiled step, evaluation and checkpoints, for any training mode.

One `mx.compile`d step (loss, gradient, optimizer update) over the adapter parameters
only; `Loop` runs it, reports (`reporting.py`), validates and saves a
`checkpoint.TrainingState` with the optimizer state, so `--resume` continues a run
exactly. What a batch is and what it costs is the `modes.Mode` the loop is given.
Over a distributed group the gradients are summed inside the step and normalised by
the group's token count.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from . import checkpoint
from .adapters import smoa_config
from .card import write_adapter_card
from .distributed import Distributed
from .errors import ConfigError, SMoAError
from .modes import SFT, Mode, loss_fn
from .options import MLX_LM_METHODS
from .patch import apply_smoa, default_keys, layer_relative, smoa_layers, summarize, target_paths
from .reporting import Reporter, progress

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class Diverged(SMoAError):
    """The loss or the adapter became NaN/inf: training stopped at the last good checkpoint."""


def make_step(model: nn.Module, optimizer, loss=loss_fn, group=None):
    """One compiled function per micro-batch, `step(*batch, acc, do_update)`: `loss`'s
    value (a mode's `loss(model, *batch) -> (mean, tokens)`), gradient, and (if
    `do_update`) the update.

    Gradients are summed weighted by each micro-batch's token count and divided by
    the total at the update, so N accumulated micro-batches give exactly the update
    of one batch holding all their tokens. Over a distributed `group` the same holds
    across processes: the loss and token count returned are those of the micro-batch
    over all ranks (so every rank sees the same loss, and the same NaN), and the
    update divides the summed gradients by the group's token count.
    A mode's third output, its dict of batch totals, comes back summed over the group.
    Returns (loss, tokens, sums, accumulator).
    """
    value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]
    world = group.size() if group is not None else 1

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*args):
        *batch, acc, do_update = args
        (value, ntoks, *rest), grad = value_and_grad(model, *batch)
        sums = rest[0] if rest else {}
        grad = tree_map(lambda g: g * ntoks, grad)
        if world > 1:
            keys = sorted(sums)
            stats = mx.distributed.all_sum(
                mx.stack([value * ntoks, ntoks, *(sums[k] for k in keys)]), group=group)
            ntoks = stats[1]
            value = stats[0] / mx.maximum(ntoks, 1)
            sums = {k: stats[2 + i] for i, k in enumerate(keys)}
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
            return value, ntoks, sums, None
        return value, ntoks, sums, (grad, total)

    return step, state


def evaluate(model: nn.Module, batches, loss=loss_fn, dist: Distributed | None = None,
             desc: str | None = None, total: int | None = None) -> float:
    """Token-weighted mean `loss` over `batches` (of the loss's mode); with `dist`,
    over every rank's rows of them. With `desc`, rank 0 shows its progress."""
    return evaluate_sums(model, batches, loss, dist, desc, total)[0]


def evaluate_sums(model: nn.Module, batches, loss=loss_fn, dist: Distributed | None = None,
                  desc: str | None = None, total: int | None = None) -> tuple[float, dict]:
    """`evaluate`, and the totals over `batches` of the loss's weight and its sums
    (what a mode's `metrics` turns into reported means)."""
    show = desc is not None and (dist is None or dist.main)
    totals = {"loss": mx.array(0.0), "weight": mx.array(0.0)}
    with progress(desc, total, show) as advance:
        for batch in batches:
            value, n, *rest = loss(model, *batch)
            for k, v in {"loss": value * n, "weight": n, **(rest[0] if rest else {})}.items():
                totals[k] = totals.get(k, 0.0) + v
            mx.eval(totals)
            advance()
    keys = sorted(totals)
    values = [totals[k].item() for k in keys]
    if dist is not None and dist.size > 1:
        values = dist.sum(values, "an evaluation")
    totals = dict(zip(keys, values))
    return totals["loss"] / max(totals["weight"], 1), totals


def eval_total(batcher, num_batches: int) -> int:
    """How many batches `batcher.eval_batches(num_batches)` yields."""
    return batcher.num_batches if num_batches < 0 else min(num_batches, batcher.num_batches)


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


def upcast_base(model: nn.Module) -> None:
    """Cast every floating-point parameter (norms, embeddings, quantization scales) to float32."""
    def up(p):
        return p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p

    model.update(tree_map(up, model.parameters()))


def adapt(model: nn.Module, args, resume: checkpoint.Checkpoint | None,
          progress: bool = True) -> tuple[list[str], dict]:
    """Freeze the model and add the method's adapter layers (loading resumed tensors).

    Returns the adapted module paths and the trainable-parameter summary.
    """
    if args.num_layers > len(model.layers):
        raise ConfigError(
            f"--num-layers {args.num_layers} exceeds the model's {len(model.layers)} layers"
        )
    paths = target_paths(model, args.targets, args.num_layers)
    if args.targets is None:
        args.targets = default_keys(model)
    if args.method in MLX_LM_METHODS:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        linear_to_lora_layers(model, args.num_layers, lora_parameters(paths, args),
                              use_dora=args.method == "dora")
    else:
        orders = None
        if resume is not None:
            orders = checkpoint.smoa_orders(resume.adapter)
            if sorted(orders) != sorted(paths):
                raise ConfigError(
                    f"{resume.source}: its adapted modules do not match --targets/--num-layers"
                )
        apply_smoa(model, keys=paths, rank=args.rank, num_blocks=args.num_blocks,
                   alpha=args.alpha, dropout=args.dropout, orders=orders, progress=progress)
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
    if args.method in MLX_LM_METHODS:
        lora = {"fine_tune_type": args.method, "lora_parameters": lora_parameters(paths, args)}
        return {**run_args, **lora, "model": args.model}
    return smoa_config(model, base_model=args.model, **run_args)


def _mode_text(args) -> str:
    mode = getattr(args, "train_mode", "sft")
    if mode == "sft":
        return ""
    kind = f" {args.dpo_cpo_loss_type}" if mode == "dpo" else ""
    return f"; {mode}{kind} beta {args.beta:g}"


def _float_dtype(model: nn.Module):
    """The dtype the base model computes in: that of its (never quantized) norm weights."""
    norms = [m.weight.dtype for _, m in model.named_modules() if isinstance(m, nn.RMSNorm)]
    return norms[0] if norms else mx.float32


def describe(model: nn.Module, args, summary: dict) -> str:
    quant = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    dtype = str(_float_dtype(model)).split(".")[-1]
    base = f"{'/'.join(map(str, sorted(quant)))}-bit quantized, {dtype}" if quant else dtype
    blocks = f" K={args.num_blocks}" if args.method not in MLX_LM_METHODS else ""
    how = f"r={args.rank}{blocks} alpha={args.alpha}"
    return (
        f"Model {args.model} ({len(model.layers)} layers, {base}); method {args.method} {how} "
        f"on {' '.join(args.targets)}, lr {args.learning_rate:g}{_mode_text(args)}\n"
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


def _rng_key() -> list[int]:
    return [int(x) for x in mx.random.state[0].tolist()]


class Loop:
    """The training loop over one `checkpoint.TrainingState`: updates, reports,
    validations, checkpoints; a Ctrl-C or a NaN stops it at a saved update. `batchers`
    are `mode`'s, and `mode.loss` is what the steps and validations compute; `callback`
    (mlx-lm's reporting callback, `reporting.tracking`) gets rank 0's reports too."""

    def __init__(self, model, optimizer, args, config, batchers, state, dist: Distributed,
                 mode: Mode = SFT(), callback=None):
        self.model, self.optimizer, self.args, self.config = model, optimizer, args, config
        self.dist, self.state, self.mode = dist, state, mode
        self.train_batches, self.valid = batchers["train"], batchers.get("valid")
        self.out = Path(args.adapter_path)
        self.last_saved = state.step or None
        state.rng = _rng_key()  # at the last update boundary: a resumed run restarts there
        state.args = vars(args)
        self.reporter = Reporter(self.out, args.iters, dist.main, callback)
        self.last_train_loss = None

    def run(self) -> dict:
        args, start = self.args, self.state.step
        initial = self.validate() if start == 0 else None
        val_loss = initial
        step_fn, compiled_state = make_step(self.model, self.optimizer, self.mode.loss,
                                            group=self.dist.group)
        self.model.train()
        with _stop_on_sigint(announce=self.dist.main) as flag:
            try:
                while self.state.step < args.iters:
                    self.update(step_fn, compiled_state)
                    step = self.state.step
                    if step % args.steps_per_report == 0 or step == args.iters:
                        self.report()
                    if step % args.steps_per_eval == 0 or step == args.iters:
                        val_loss = self.validate()
                    if step % args.save_every == 0 or step == args.iters:
                        self.save()
                    # Every rank stops after the same update, whichever saw the Ctrl-C.
                    if self.dist.any(flag["stop"], f"the stop check after step {step}"):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self.interrupted()
                raise
        if start >= args.iters:
            print(f"Nothing to train: {self.out} is at step {start} >= --iters {args.iters}")
            self.save()  # the adapter files may lag the training state (an interrupted save)
        return {
            "adapter_path": str(self.out), "steps": self.state.step, "initial_val_loss": initial,
            "val_loss": val_loss, "train_loss": self.last_train_loss,
            "trained_tokens": self.state.trained_tokens, **self.reporter.throughput(),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }

    def update(self, step_fn, compiled_state) -> None:
        """One optimizer update over --grad-accumulation-steps batches."""
        accum, st = self.args.grad_accumulation_steps, self.state
        tic = time.perf_counter()
        acc, loss_sum, weight_sum, tokens, extra = None, 0.0, 0.0, 0.0, {}
        for i in range(accum):
            batch = self.train_batches.batch(st.micro_step + i)
            value, weight, sums, acc = step_fn(*batch, acc, i == accum - 1)
            with self.dist.wait(f"training step {st.step + 1}"):
                mx.eval(compiled_state, value, weight, sums, acc)
            value, weight = value.item(), weight.item()
            if not math.isfinite(value):
                raise Diverged(_diverged(st.step + 1, "the loss", self.last_saved, self.args))
            sums = {k: v.item() for k, v in sums.items()}
            tokens += sums.pop("tokens", weight)  # SFT's weight is its token count
            loss_sum, weight_sum = loss_sum + value * weight, weight_sum + weight
            for k, v in sums.items():
                extra[k] = extra.get(k, 0.0) + v
        st.step, st.micro_step, st.rng = st.step + 1, st.micro_step + accum, _rng_key()
        if self.args.clear_cache_threshold and \
                mx.get_cache_memory() > self.args.clear_cache_threshold:
            mx.clear_cache()
        self.reporter.update(time.perf_counter() - tic, tokens)
        st.trained_tokens += tokens
        st.window["loss"] += loss_sum
        st.window["weight"] += weight_sum
        st.window["steps"] += 1
        for k, v in extra.items():  # the mode's sums (DPO's rewards), reported with the loss
            st.window[k] = st.window.get(k, 0.0) + v

    def report(self) -> None:
        st = self.state
        loss = st.window["loss"] / max(st.window["weight"], 1)
        self.reporter.train(st.step, loss, self.optimizer.learning_rate.item(), st.trained_tokens,
                            self.mode.metrics(st.window))
        self.last_train_loss = loss
        st.window = checkpoint.empty_window()

    def validate(self) -> float | None:
        if self.valid is None:  # no valid split: trained without validation, as mlx-lm
            return None
        tic = time.perf_counter()
        self.model.eval()
        n = self.args.val_batches
        loss, sums = evaluate_sums(self.model, self.valid.eval_batches(n), self.mode.loss,
                                   dist=self.dist, desc="Validating", total=eval_total(self.valid, n))
        self.model.train()
        self.reporter.val(self.state.step, loss, time.perf_counter() - tic, self.mode.metrics(sums))
        return loss

    def save(self) -> None:
        adapter = checkpoint.model_adapter(self.model, self.args.method)
        if not checkpoint.all_finite(adapter):
            raise Diverged(_diverged(self.state.step, "the adapter", self.last_saved, self.args))
        if self.dist.main:
            checkpoint.save(self.out, adapter, self.optimizer.state, self.config, self.state)
            write_adapter_card(self.out)  # the model card travels with the files
        self.last_saved = self.state.step
        print(f"Iter {self.state.step}: saved {self.out / checkpoint.numbered(self.state.step)}",
              flush=True)

    def interrupted(self) -> None:
        """Ctrl-C: save the last completed update, say how to resume."""
        st = self.state
        if int(self.optimizer.step.item()) == st.step + 1:
            # Interrupted after the compiled update but before its bookkeeping.
            st.step, st.micro_step = st.step + 1, st.micro_step + self.args.grad_accumulation_steps
            st.rng = _rng_key()
        if self.last_saved != st.step:
            self.save()
        if self.dist.main:
            print(f"Interrupted at step {st.step}; checkpoint in {self.out}. Resume with: "
                  f"python -m smoa_mlx.train --resume --adapter-path {self.out}",
                  file=sys.stderr, flush=True)


def _diverged(step: int, what: str, last_saved, args) -> str:
    kept = f"the last good checkpoint (step {last_saved})" if last_saved else "nothing"
    return (
        f"{what} became NaN/inf at step {step}; training stopped, keeping {kept} in "
        f"{args.adapter_path}. "
        f"Try a lower --learning-rate (now {args.learning_rate:g})"
    )


