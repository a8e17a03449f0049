"""The optimizer and its learning-rate schedule, as pure functions of the step count.

The schedule depends only on the optimizer's own `step` counter (part of its
saved state), so a resumed run continues on exactly the same curve. Both steps and
schedules count optimizer updates, as mlx-lm's do.
"""

from __future__ import annotations

import inspect
import math
import numbers

import mlx.core as mx
import mlx.optimizers as optim

from .errors import ConfigError
from .lr_scale import scaled

# mlx-lm's optimizers (mlx_lm.lora), by the names its configs use.
_CLASSES = {"adamw": optim.AdamW, "adam": optim.Adam, "sgd": optim.SGD,
            "adafactor": optim.Adafactor, "muon": getattr(optim, "Muon", None)}
OPTIMIZERS = tuple(k for k, v in _CLASSES.items() if v is not None)
# Shapes after the warmup for `--lr-schedule`; a YAML mapping may name mlx's own instead.
SCHEDULES = ("cosine", "linear", "constant")
MLX_SCHEDULES = ("cosine_decay", "linear_schedule", "exponential_decay", "step_decay")


def warmup_schedule(learning_rate: float, iters: int, warmup: int = 0, shape: str = "cosine"):
    """Learning rate of update k (0-based): linear warmup, then `shape` (cosine or linear
    decay towards 0, or constant).

    Unlike `mlx_lm.tuner.utils.build_schedule`, whose warmup starts at 0, the first
    update already uses `learning_rate / warmup`: no update is wasted at lr 0.
    The decay reaches 0 one update after the last (`iters`), so every update moves.
    """
    if iters < 1:
        raise ConfigError(f"iters must be at least 1, got {iters}")
    if not 0 <= warmup < iters:
        raise ConfigError(f"warmup must be in [0, iters={iters}), got {warmup}")
    if shape not in SCHEDULES:
        raise ConfigError(f"unknown schedule {shape!r}; choose one of {', '.join(SCHEDULES)}")
    decay_steps = iters - warmup

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = learning_rate * (step + 1) / max(warmup, 1)
        t = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        after = {"cosine": lambda: learning_rate * 0.5 * (1.0 + mx.cos(math.pi * t)),
                 "linear": lambda: learning_rate * (1.0 - t),
                 "constant": lambda: mx.full(t.shape, learning_rate)}[shape]()
        return mx.where(step < warmup, warm, after)

    return schedule


def cosine_schedule(learning_rate: float, iters: int, warmup: int = 0):
    return warmup_schedule(learning_rate, iters, warmup, "cosine")


def check_schedule(config: dict, where: str) -> dict:
    """An mlx-lm `lr_schedule` mapping {name, arguments, warmup, warmup_init}, checked
    by building it (so a wrong argument count is an error here, not at step 1)."""
    unknown = sorted(set(config) - {"name", "arguments", "warmup", "warmup_init"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (name, arguments, warmup, "
                          "warmup_init)")
    if config.get("name") not in MLX_SCHEDULES:
        raise ConfigError(f"{where}.name: {config.get('name')!r} is not one of "
                          f"{', '.join(MLX_SCHEDULES)}")
    args = config.get("arguments")
    if not isinstance(args, list) or not args or not all(_number(a) for a in args):
        raise ConfigError(f"{where}.arguments: expected a list of numbers, got {args!r}")
    warmup = config.get("warmup", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"{where}.warmup: expected an integer >= 0, got {warmup!r}")
    if not _number(config.get("warmup_init", 0.0)):
        raise ConfigError(f"{where}.warmup_init: expected a number, got "
                          f"{config['warmup_init']!r}")
    try:
        mx.eval(mlx_lm_schedule(config)(mx.array(0)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {config['name']}{tuple(args)} fails ({e})") from None
    return config


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def mlx_lm_schedule(config: dict):
    """Exactly `mlx_lm.tuner.utils.build_schedule`: mlx's scheduler `name(*arguments)`,
    after `warmup` updates of a linear ramp from `warmup_init` to `arguments[0]`."""
    bound = getattr(optim.schedulers, config["name"])(*config["arguments"])
    warmup = config.get("warmup", 0)
    if not warmup:
        return bound
    ramp = optim.schedulers.linear_schedule(config.get("warmup_init", 0.0),
                                            config["arguments"][0], warmup)
    return optim.schedulers.join_schedules([ramp, bound], [warmup + 1])


def build_schedule(kind, learning_rate: float, iters: int, warmup: int):
    """`kind` is a `SCHEDULES` name or an mlx-lm lr_schedule mapping."""
    if isinstance(kind, dict):
        return mlx_lm_schedule(kind)
    return warmup_schedule(learning_rate, iters, warmup, kind)


def optimizer_class(name: str):
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return _CLASSES[name]


def build_optimizer(name: str, schedule, weight_decay: float = 0.0,
                    config: dict | None = None, step_scales=None) -> optim.Optimizer:
    """mlx's optimizer `name` with `config` (mlx-lm's optimizer_config entry for it).

    Adam and AdamW get bias correction, as in PyTorch, so learning rates from
    PyTorch/PEFT recipes (the SMoA authors' 1e-3) mean the same thing here; the weight
    decay is 0 unless asked for (mlx's AdamW and Muon would use 0.01).
    `step_scales` (a tree like the trainable parameters, `lr_scale.step_scales`)
    multiplies each parameter's step.
    """
    cls = optimizer_class(name)
    if step_scales is not None:
        cls = scaled(cls)
    accepted = inspect.signature(cls).parameters
    kwargs = dict(config or {})
    if "bias_correction" in accepted:
        kwargs.setdefault("bias_correction", True)
    if "weight_decay" in accepted:
        kwargs.setdefault("weight_decay", weight_decay)
    elif weight_decay:
        raise ConfigError(f"--weight-decay needs an optimizer with weight decay, not {name}")
    optimizer = cls(learning_rate=schedule, **kwargs)
    if step_scales is not None:
        optimizer.step_scales = step_scales
    return optimizer
