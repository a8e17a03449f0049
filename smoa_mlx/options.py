"""Every training option once: `TrainOptions`, a dataclass whose fields carry the
default, type, help and resume/distributed behaviour. The argparse parser, the YAML
checks (`config_file.py`), the resume rules and the validation are all derived from it.

Precedence: flags (or keys of a `train({...})` dict) > the YAML config > the resumed
run's options > the defaults. A YAML file may also be an `mlx_lm.lora` config: its own
keys (`fine_tune_type`, `lora_parameters`, ...) map to SMoA's (README: "mlx-lm config
files" has the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

from .data import BUNDLED_DATA, BUNDLED_MODEL  # the default: a first run needs no download
from .errors import ConfigError
from .patch import DEFAULT_TARGETS
from .lr_scale import MODES
from .modes import DPO_LOSSES
from .schedule import OPTIMIZERS, SCHEDULES, optimizer_class

REAL_MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
METHODS = ("smoa", "hira", "lora", "dora")
# Methods delegated to mlx-lm's own layers (LoRALinear, DoRALinear), saved in its format.
MLX_LM_METHODS = ("lora", "dora")
TRAIN_MODES = ("sft", "dpo", "orpo")
DTYPES = ("float32", "bfloat16", "float16")
# LoRA's default rate; SMoA's and HiRA's (None) follow the model's width
# (lr_scale.default_rate, set once the model is loaded; docs/RESULTS.md).
# DoRA takes mlx-lm's LoRA rate (mlx_lm.lora has one default for both).
DEFAULT_LR = {"smoa": None, "hira": None, "lora": 2e-4, "dora": 2e-4}
DEFAULT_BLOCKS = {"smoa": 2, "hira": 1, "lora": None, "dora": None}

# Range checks, by name: (test, what the message says).
_CHECKS = {
    "at_least_1": (lambda v: v >= 1, "must be at least 1"),
    "all_or_positive": (lambda v: v == -1 or v >= 1, "must be -1 (all) or positive"),
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
}


def _size(value) -> int:
    """A byte count: an integer, or mlx-lm's "2GB" / "500M" form."""
    from decimal import Decimal, InvalidOperation

    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    digits = text.rstrip("BMG ")
    unit = text[len(digits):].strip()
    sizes = {"": 1, "B": 1, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    try:
        return int(Decimal(digits) * sizes[unit])
    except (InvalidOperation, KeyError):
        raise ValueError(value) from None


def opt(default, help: str, *, type=None, choices=None, kind: str = "value", cli: bool = True,
        check: str | None = None, structural: bool = False, per_invocation: bool = False,
        local: bool = False, shown: str | None = None, flags: tuple = ()):
    """A `TrainOptions` field.

    kind: "value" (one typed value), "list" (one or more strings), "flag" (store_true),
    "switch" (--x/--no-x), "mapping" (YAML only: a dict, or a list of dicts).
    structural: changes which parameters exist, so a resumed run must keep it.
    per_invocation: describes this invocation, not the run: never inherited on resume.
    local: may differ between the processes of a distributed run (paths on each machine).
    shown: the default as the help prints it, when it is computed from other options.
    """
    meta = dict(help=help, type=type, choices=choices, kind=kind, cli=cli, check=check,
                structural=structural, per_invocation=per_invocation, local=local,
                shown=shown, flags=flags)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value):
    return list(value) if isinstance(value, list) else dict(value)


@dataclass
class TrainOptions:
    model: str = opt(str(BUNDLED_MODEL), "Local model directory or Hugging Face repo.", local=True,
                     shown=f"the bundled stories260K; a real one: {REAL_MODEL}")
    data: str = opt(str(BUNDLED_DATA), "Directory with train/valid(/test).jsonl, or a Hugging "
                    "Face dataset id.", local=True,
                    shown="the bundled example data")
    hf_dataset: object = opt(None, "Hugging Face dataset(s), as mlx-lm's hf_dataset: one "
                             "mapping or a list (passed to the data layer as is).",
                             kind="mapping", cli=False)
    prompt_feature: str = opt(None, "Column holding the prompt (mlx-lm's key; default prompt).")
    completion_feature: str = opt(None, "Column holding the completion (default completion).")
    chat_feature: str = opt(None, "Column holding the chat messages (default messages).")
    text_feature: str = opt(None, "Column holding the text (default text).")
    train: bool = opt(True, "Train (the default, unless --test is given alone).", kind="flag",
                      per_invocation=True)
    test: bool = opt(False, "Report the test-set loss (after training, or of --adapter-path "
                     "alone).", kind="flag", per_invocation=True)
    test_batches: int = opt(-1, "Test batches, -1 for the whole test set.", type=int,
                            check="all_or_positive")
    train_mode: str = opt("sft", "sft, or preference training on chosen/rejected pairs: dpo "
                          "(reference: the model with its adapter off) or orpo "
                          "(mlx-lm-lora's name).", choices=TRAIN_MODES, structural=True)
    beta: float = opt(0.1, "dpo/orpo: the preference term's temperature (DPO's beta, "
                      "ORPO's lambda).", type=float, check="positive")
    dpo_cpo_loss_type: str = opt("sigmoid", "dpo: sigmoid (the paper's), hinge or ipo "
                                 "(mlx-lm-lora's name).", choices=DPO_LOSSES)
    method: str = opt("smoa", "smoa, hira (smoa with one block), lora or dora (mlx-lm's "
                      "LoRALinear / DoRALinear, saved in mlx-lm's format). YAML: fine_tune_type "
                      "too.", choices=METHODS,
                      structural=True)
    rank: int = opt(8, "Total rank budget r, split over the blocks.", type=int,
                    check="at_least_1", structural=True)
    num_blocks: int = opt(None, "SMoA blocks K.", type=int, structural=True,
                          shown=", ".join(f"{m} {k}" for m, k in DEFAULT_BLOCKS.items() if k))
    alpha: float = opt(8.0, "scale = alpha / rank, for lora and dora too.", type=float, check="positive",
                       structural=True)
    dropout: float = opt(0.0, "Dropout on the adapter input (above 0, SMoA steps take the "
                         "per-block path, ~1.25x slower).", type=float, check="fraction")
    targets: list = opt(None, "Modules to adapt, or all-linear.", kind="list", structural=True,
                        shown=f"the architecture's, e.g. {' '.join(DEFAULT_TARGETS)}")
    num_layers: int = opt(-1, "Adapt the last N decoder layers, -1 for all.", type=int,
                          check="all_or_positive", structural=True)
    dtype: str = opt("float32", "dtype of the trainable parameters and their optimizer state.",
                     choices=DTYPES, structural=True)
    upcast_base: bool = opt(False, "Cast the base model's floating-point weights to float32 "
                            "(on a CPU, bf16 matmul is ~25x slower than f32).", kind="flag")
    optimizer: str = opt("adamw", "Optimizer; adam and adamw with bias correction, as in "
                         "PyTorch. YAML: optimizer_config too.", choices=OPTIMIZERS)
    optimizer_config: dict = opt({}, "Keyword arguments per optimizer, as mlx-lm's "
                                 "optimizer_config ({adamw: {betas: [0.9, 0.98]}, ...}).",
                                 kind="mapping", cli=False)
    learning_rate: float = opt(None, "Peak learning rate. With --lr-scale anchor SMoA's rate "
                               "means what LoRA's does (docs/RESULTS.md).", type=float,
                               check="positive", shown="lora/dora 2e-4; smoa/hira 3e-2 * "
                               "sqrt(64 / hidden_size) (the best measured: 3e-2 on stories260K, "
                               "1e-2 on SmolLM2-135M; 5.3e-3 at hidden 2048)")
    lr_scale: str = opt("anchor", "smoa/hira: multiply the step of each B_k by 1/rms(M_k), so "
                        "the rate means what it means for LoRA on any model; row: by each "
                        "row's rms; none: plain optimizer steps, which want ~1/rms(W0) times "
                        "the rate. The saved adapter is the same either way.", choices=MODES)
    lr_schedule: object = opt("cosine", "Learning-rate shape after --warmup: cosine (to 0), "
                              "linear (to 0) or constant. YAML: also mlx-lm's mapping {name, "
                              "warmup, warmup_init, arguments}.", choices=SCHEDULES)
    weight_decay: float = opt(0.0, "Decoupled weight decay (adamw, sgd, adafactor, muon).",
                              type=float, check="non_negative")
    warmup: int = opt(None, "Linear warmup updates before the schedule.", type=int,
                      shown="iters // 10")
    iters: int = opt(200, "Optimizer updates to run; each consumes --grad-accumulation-steps "
                     "batches (mlx-lm counts batches instead). Or --epochs.", type=int,
                     check="at_least_1")
    epochs: int = opt(None, "Whole passes over the training set instead of --iters: "
                      "ceil(epochs * batches per pass / --grad-accumulation-steps) updates, a "
                      "batch being --batch-size examples over all processes. The last update "
                      "may start the next pass.", type=int, check="at_least_1",
                      shown="off: --iters counts")
    batch_size: int = opt(4, "Examples per batch. With several processes (mlx.launch) it is "
                          "the global batch, split evenly over them, as in mlx-lm.", type=int,
                          check="at_least_1")
    grad_accumulation_steps: int = opt(1, "Batches averaged (token-weighted) into each update.",
                                       type=int, check="at_least_1")
    grad_checkpoint: bool = opt(False, "Recompute decoder-layer activations in the backward "
                                "pass (less memory, more time).", kind="flag")
    max_seq_length: int = opt(2048, "Truncate examples to this many tokens.", type=int,
                              check="at_least_1")
    mask_prompt: bool = opt(None, "Loss on completions only (prompt/completion, chat and "
                            "alpaca data).", kind="switch",
                            shown="on for the bundled example data, off otherwise (as in mlx-lm)")
    val_batches: int = opt(25, "Validation batches, -1 for all.", type=int,
                           check="all_or_positive")
    steps_per_report: int = opt(10, "Updates between progress lines.", type=int,
                                check="at_least_1")
    steps_per_eval: int = opt(200, "Updates between validations (also at the start and the "
                              "end).", type=int, check="at_least_1")
    save_every: int = opt(100, "Updates between checkpoints (also at the end).", type=int,
                          check="at_least_1")
    clear_cache_threshold: int = opt(0, "Clear MLX's buffer cache after an update when it "
                                     "holds more than this many bytes (\"2GB\" works; 0 never).",
                                     type=_size, check="non_negative")
    adapter_path: str = opt("adapters", "Adapter directory to write.", local=True)
    resume: bool = opt(False, "Continue the run checkpointed in --adapter-path exactly "
                       "(weights, optimizer, step, data position, RNG).", kind="flag",
                       per_invocation=True)
    resume_adapter_file: str = opt(None, "Start from this adapters.safetensors; continues "
                                   "exactly when its training state is beside it, else reuses "
                                   "only the weights.", per_invocation=True, local=True)
    upload_repo: str = opt(None, "Upload the adapter (config, weights, model card) to this "
                           "Hugging Face repo at the end, created if missing (user/name).",
                           per_invocation=True, local=True)
    upload_private: bool = opt(False, "Create the --upload-repo repo as private.", kind="flag",
                               per_invocation=True, local=True)
    report_to: str = opt(None, "Also log the train and validation losses, learning rate, "
                         "tokens/s and peak memory, and these options, to wandb or swanlab "
                         "(comma-separated for both), through mlx-lm's reporting callbacks, "
                         "from rank 0. Needs pip install 'smoa-mlx[wandb]' (or [swanlab]).",
                         shown="metrics.jsonl only")
    project_name: str = opt(None, "--report-to's project (wandb's / swanlab's default when "
                            "unset); the run is named after --adapter-path.")
    seed: int = opt(0, "Seed for initialisation, data order and dropout.", type=int)
    trust_remote_code: bool = opt(False, "Let the tokenizer run code from the model "
                                  "repository (as mlx-lm's flag).", kind="flag")
    distributed_timeout: float = opt(600.0, "Under mlx.launch: seconds a process waits for "
                                     "the others in one exchange before it stops with an "
                                     "error, so a hung process cannot block the run forever; "
                                     "0 waits forever.", type=float, check="non_negative",
                                     per_invocation=True, local=True)
    config: str = opt(None, "YAML file of options; keys are the flag names with underscores, "
                      "or an mlx_lm.lora config. Flags override it.", per_invocation=True,
                      local=True, flags=("-c",))


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}
DEFAULTS = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in FIELDS.values()}
STRUCTURAL = tuple(k for k, f in FIELDS.items() if f.metadata["structural"])
PER_INVOCATION = tuple(k for k, f in FIELDS.items() if f.metadata["per_invocation"])
LOCAL_OPTIONS = tuple(k for k, f in FIELDS.items() if f.metadata["local"])


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(f) -> str:
    m = f.metadata
    if m["shown"]:
        return m["shown"]
    value = DEFAULTS[f.name]
    if m["kind"] in ("flag", "switch"):
        return "on" if value else "off"
    return " ".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(
        value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smoa_mlx.train",
        description="SMoA fine-tuning of an mlx-lm model (flags mirror mlx_lm.lora; with no "
        "arguments: the bundled tiny stories260K model on the bundled example data). "
        "A YAML config (-c) may also carry lr_schedule, optimizer_config, hf_dataset and "
        "mlx_lm.lora's keys (README: 'mlx-lm config files').",
    )
    for name, f in FIELDS.items():
        m = f.metadata
        if not m["cli"]:
            continue
        help_text = f"{m['help']} (default: {_shown(f)})"
        kw = {"dest": name, "default": None, "help": help_text}
        if m["kind"] == "flag":
            kw["action"] = "store_true"
        elif m["kind"] == "switch":
            kw["action"] = argparse.BooleanOptionalAction
        elif m["kind"] == "list":
            kw["nargs"] = "+"
        else:
            kw.update(type=m["type"] or str, choices=m["choices"])
        p.add_argument(*m["flags"], flag_name(name), **kw)
    return p


def _check(o: TrainOptions) -> None:
    """Every option's own range, then the rules between options."""
    for name, f in FIELDS.items():
        value, check = getattr(o, name), f.metadata["check"]
        if check and value is not None and not _CHECKS[check][0](value):
            raise ConfigError(f"{flag_name(name)} {_CHECKS[check][1]}, got {value}")
    from .reporting import trackers  # reporting -> checkpoint -> options

    trackers(o.report_to)
    if o.method not in MLX_LM_METHODS and o.num_blocks < 1:
        raise ConfigError(f"--num-blocks must be at least 1, got {o.num_blocks}")
    if o.method == "hira" and o.num_blocks != 1:
        raise ConfigError(
            f"--method hira has one block; got --num-blocks {o.num_blocks} (use --method smoa)"
        )
    if o.weight_decay and "weight_decay" not in inspect.signature(
            optimizer_class(o.optimizer)).parameters:
        raise ConfigError(f"--weight-decay needs an optimizer with weight decay, not {o.optimizer}")
    _check_optimizer_config(o.optimizer_config)
    decay = o.optimizer_config.get(o.optimizer, {}).get("weight_decay")
    if o.weight_decay and decay is not None and decay != o.weight_decay:
        raise ConfigError(f"--weight-decay {o.weight_decay:g} contradicts optimizer_config."
                          f"{o.optimizer}.weight_decay {decay:g}")
    if isinstance(o.lr_schedule, dict):
        first = float(o.lr_schedule["arguments"][0])
        if o.warmup:
            raise ConfigError("--warmup applies to the named schedules; an lr_schedule "
                              "mapping has its own warmup key")
        if o.learning_rate != first:
            raise ConfigError(f"--learning-rate {o.learning_rate:g} contradicts lr_schedule."
                              f"arguments[0] {first:g} (the rate the schedule starts from)")


def _check_optimizer_config(config: dict) -> None:
    for name, kwargs in config.items():
        if name not in OPTIMIZERS:
            raise ConfigError(f"optimizer_config.{name}: unknown optimizer (one of "
                              f"{', '.join(OPTIMIZERS)})")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"optimizer_config.{name}: expected a mapping, got {kwargs!r}")
        accepted = set(inspect.signature(optimizer_class(name)).parameters) - {"learning_rate"}
        for key in kwargs:
            if key not in accepted:
                raise ConfigError(f"optimizer_config.{name}.{key}: not an argument of "
                                  f"{name} (it takes {', '.join(sorted(accepted))})")


def resolve(given) -> tuple[TrainOptions, dict | None]:
    """Merge `given` (a namespace or dict of options), the YAML config and the resumed run;
    then check everything. Returns the options and the checkpoint to resume (or None).

    With --epochs the number of updates waits for the data: `resolve_length`."""
    from . import checkpoint
    from .config_file import mlx_lm_defaults, read_config  # they read the option table here

    given = dict(vars(given) if not isinstance(given, dict) else given)
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}")
    merged = _one_length({k: v for k, v in given.items() if v is not None}, "")
    mlx_lm = False
    if merged.get("config"):
        values, mlx_lm = read_config(merged["config"])
        merged = _over(merged, _one_length(values, f"{merged['config']}: "))
    if isinstance(merged.get("targets"), str):
        merged["targets"] = merged["targets"].split(",")
    resume = checkpoint.resume_source(
        merged.get("resume"), merged.get("resume_adapter_file"),
        merged.get("adapter_path", DEFAULTS["adapter_path"]),
    )
    if resume is not None and resume.state is not None:
        saved = {"train_mode": "sft", **resume.state.args}  # runs saved before the modes
        for key in STRUCTURAL:
            if key in merged and merged[key] != saved.get(key):
                raise ConfigError(
                    f"{resume.source}: the run was trained with {key}={saved.get(key)!r}; "
                    f"resuming needs the same value, got {merged[key]!r}"
                )
        inherited = {k: v for k, v in saved.items() if k in FIELDS and k not in PER_INVOCATION
                     and v is not None}
        inherited.setdefault("lr_scale", "none")  # a run checkpointed before the step scale
        merged = _over(merged, inherited)  # its --iters is the count its --epochs resolved to
    explicit = set(merged)
    if mlx_lm:
        merged = _over(merged, mlx_lm_defaults(merged))
    if merged.get("epochs") is not None:
        merged.setdefault("iters", None)  # counted once the data is batched
    o = TrainOptions(**merged)
    if mlx_lm:
        _as_mlx_lm_builds(o, explicit)
    if o.mask_prompt is None:
        o.mask_prompt = Path(o.data).resolve() == BUNDLED_DATA.resolve()
    if o.num_blocks is None:
        o.num_blocks = DEFAULT_BLOCKS[o.method]
    if isinstance(o.lr_schedule, dict) and o.learning_rate is None:
        o.learning_rate = float(o.lr_schedule["arguments"][0])
    if o.learning_rate is None:
        o.learning_rate = DEFAULT_LR[o.method]
    o.data, o.adapter_path, o.model = str(o.data), str(o.adapter_path), str(o.model)
    _check(o)
    if o.learning_rate is not None and not math.isfinite(o.learning_rate):
        raise ConfigError(f"--learning-rate must be finite, got {o.learning_rate}")
    if o.iters is not None:
        _resolve_warmup(o)
    return o, resume


# The run's length is one setting given either way: a layer of options (flags, the YAML, the
# resumed run, mlx-lm's defaults) that names either replaces both of every layer below it.
LENGTH = ("iters", "epochs")


def _over(high: dict, low: dict) -> dict:
    if any(high.get(k) is not None for k in LENGTH):
        low = {k: v for k, v in low.items() if k not in LENGTH}
    return {**low, **high}


def _one_length(layer: dict, where: str) -> dict:
    if all(layer.get(k) is not None for k in LENGTH):
        names = "iters and epochs" if where else "--iters and --epochs"
        raise ConfigError(f"{where}{names} both given; the run's length is one or the other")
    return layer


def epoch_updates(epochs: int, batches_per_epoch: int, grad_accumulation_steps: int) -> int:
    """Updates for `epochs` whole passes of `batches_per_epoch` global batches each, every
    update taking `grad_accumulation_steps` of them (rounded up: no example left unseen)."""
    return math.ceil(epochs * batches_per_epoch / grad_accumulation_steps)


def resolve_length(o: TrainOptions, batches_per_epoch: int) -> None:
    """--epochs as a number of updates, once the training set is batched (`train.py`): from
    then on --iters is the count, for the schedule, the progress and a resumed run."""
    if o.iters is None:
        o.iters = epoch_updates(o.epochs, batches_per_epoch, o.grad_accumulation_steps)
        _resolve_warmup(o)


def _resolve_warmup(o: TrainOptions) -> None:
    """--warmup's default (a tenth of the updates) and range, which need the count."""
    if o.warmup is None:
        o.warmup = 0 if isinstance(o.lr_schedule, dict) else o.iters // 10
    if not 0 <= o.warmup < o.iters:
        count = f"--iters={o.iters}" if o.epochs is None else \
            f"{o.iters} updates (--epochs {o.epochs})"
        raise ConfigError(f"--warmup must be in [0, {count}), got {o.warmup}")


def _as_mlx_lm_builds(o: TrainOptions, explicit: set) -> None:
    """What mlx_lm.lora does with an mlx-lm config's missing keys that no default above can
    say: LoRA's scale stays 20 whatever the rank, and the optimizer takes mlx's own
    defaults (no bias correction; AdamW's and Muon's weight decay 0.01), not the PyTorch-like
    ones `schedule.build_optimizer` gives the other runs."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    if "alpha" not in explicit:
        o.alpha = float(CONFIG_DEFAULTS["lora_parameters"]["scale"]) * o.rank
    accepted = inspect.signature(optimizer_class(o.optimizer)).parameters
    own = dict(o.optimizer_config.get(o.optimizer, {}))
    if "bias_correction" in accepted:
        own.setdefault("bias_correction", accepted["bias_correction"].default)
    if "weight_decay" in accepted and "weight_decay" not in explicit:
        o.weight_decay = own.get("weight_decay", accepted["weight_decay"].default)
    o.optimizer_config = {**o.optimizer_config, o.optimizer: own}
