"""YAML options files: keys are option names (underscores or dashes), each value checked as
argparse checks its flag; a file may also be an `mlx_lm.lora` config, whose own keys
(`fine_tune_type`, `lora_parameters`, ...) map to SMoA's options (README: "mlx-lm config
files" has the table). Keys such a file leaves out mean what they mean to mlx_lm.lora
(`mlx_lm_defaults`), so it trains what mlx_lm.lora would."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .archs import ALL_LINEAR
from .errors import ConfigError, MissingFileError
from .options import DEFAULTS, FIELDS, METHODS, MLX_LM_METHODS
from .schedule import check_schedule

# mlx_lm.lora's CONFIG_DEFAULTS that describe the invocation, not the training: the bundled
# model and data stay the defaults (a first run needs no download) and training is on
# unless --test comes alone.
_INVOCATION = ("model", "data", "train", "config")


def _coerce(key: str, value, where: str):
    """Check one YAML value the way argparse checks the flag."""
    m = FIELDS[key].metadata
    bad = ConfigError(f"{where}: {key}: invalid value {value!r}")
    if m["kind"] in ("flag", "switch"):
        if not isinstance(value, bool):
            raise bad
        return value
    if m["kind"] == "list":
        value = value.split(",") if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if m["kind"] == "mapping":
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, dict) for v in items):
            raise ConfigError(f"{where}: {key}: expected a mapping (or a list of mappings), "
                              f"got {value!r}")
        return value
    if key == "lr_schedule" and isinstance(value, dict):
        return check_schedule(value, f"{where}: lr_schedule")
    if value is None or isinstance(value, (bool, list, dict)):
        raise bad
    try:
        value = (m["type"] or str)(value)
    except (TypeError, ValueError):
        raise bad from None
    if m["type"] is int and isinstance(value, float):
        raise bad
    if m["choices"] and value not in m["choices"]:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(m['choices'])}")
    return value


def _from_mlx_lm(data: dict, where: str) -> dict:
    """Translate mlx_lm.lora's own keys into option names; refuse what SMoA cannot do."""
    out = dict(data)
    if "fine_tune_type" in out:
        kind = out.pop("fine_tune_type")
        if kind not in METHODS:
            raise ConfigError(f"{where}: fine_tune_type: {kind!r} is not supported here "
                              f"(choose {', '.join(METHODS)}; --method smoa trains SMoA)")
        if out.setdefault("method", kind) != kind:
            raise ConfigError(f"{where}: fine_tune_type {kind!r} contradicts method "
                              f"{out['method']!r}")
    if "lora_parameters" in out:
        lora = out.pop("lora_parameters")
        if not isinstance(lora, dict):
            raise ConfigError(f"{where}: lora_parameters: expected a mapping, got {lora!r}")
        unknown = sorted(set(lora) - {"keys", "rank", "scale", "dropout"})
        if unknown:
            raise ConfigError(f"{where}: lora_parameters.{unknown[0]}: means nothing here "
                              "(keys, rank, scale and dropout map to SMoA's options)")
        mapped = {"targets": lora.get("keys"), "rank": lora.get("rank"),
                  "dropout": lora.get("dropout")}
        if "scale" in lora:
            rank = lora.get("rank", out.get("rank", DEFAULTS["rank"]))
            scale = lora["scale"]
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or \
                    not isinstance(rank, int) or isinstance(rank, bool):
                raise ConfigError(f"{where}: lora_parameters.scale: invalid value {scale!r}")
            mapped["alpha"] = float(scale) * rank
        for key, value in mapped.items():
            if value is None:
                continue
            if key in out and out[key] != value:
                raise ConfigError(f"{where}: lora_parameters sets {key} to {value!r} but "
                                  f"{key} is {out[key]!r}")
            out[key] = value
    # Not an mlx_lm.lora key, though the example config of tests/data carries `normal`.
    if out.get("training_mode", "normal") != "normal":
        raise ConfigError(f"{where}: training_mode: {out['training_mode']!r} is not "
                          "supported here (mlx_lm.lora has no such key; preference training "
                          "is train_mode: dpo or orpo, mlx-lm-lora's key)")
    out.pop("training_mode", None)
    return out


def load_config(path) -> dict:
    """A YAML options file: keys are option names (underscores or dashes), checked like
    flags; an mlx_lm.lora config works too (`_from_mlx_lm`)."""
    return read_config(path)[0]


def read_config(path) -> tuple[dict, bool]:
    """`load_config`'s options, and whether the file is an mlx_lm.lora config (it names
    mlx-lm's adapters, `fine_tune_type: lora|dora`, or their `lora_parameters`): then the
    keys it leaves out take `mlx_lm_defaults`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if data is None:
        return {}, False
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got a "
                          f"{type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    mlx_lm = data.get("fine_tune_type") in MLX_LM_METHODS or "lora_parameters" in data
    out = {}
    for key, value in _from_mlx_lm(data, str(path)).items():
        if key not in FIELDS or (key == "config" and value is not None):
            raise ConfigError(f"{path}: unknown key {key!r} (keys are flag names: "
                              "learning_rate, ...; or mlx_lm.lora's)")
        if value is not None:  # null means not set (mlx-lm writes its unset options so)
            out[key] = _coerce(key, value, str(path))
    return out, mlx_lm


def mlx_lm_defaults(chosen: dict) -> dict:
    """mlx_lm.lora's CONFIG_DEFAULTS as options: what the keys an mlx-lm config leaves out
    mean. `chosen` holds the options set so far: an lr_schedule mapping carries its own
    rate and warmup. (LoRA's scale and the optimizer's defaults: options._as_mlx_lm_builds.)"""
    from mlx_lm.lora import CONFIG_DEFAULTS

    raw = {k: v for k, v in CONFIG_DEFAULTS.items() if k not in _INVOCATION and v is not None}
    raw["lora_parameters"] = {k: v for k, v in raw["lora_parameters"].items() if k != "scale"}
    out = _from_mlx_lm(raw, "mlx_lm.lora's CONFIG_DEFAULTS")
    out["optimizer_config"] = {k: v for k, v in out["optimizer_config"].items() if v}
    # No lr_schedule: the rate stays constant from the first update. No lora_parameters.keys:
    # every linear layer (of the adapted decoder layers, in mlx-lm).
    out.update(lr_schedule="constant", warmup=0, targets=[ALL_LINEAR])
    if isinstance(chosen.get("lr_schedule"), dict):
        del out["learning_rate"], out["warmup"]
    return {k: v for k, v in out.items() if k in FIELDS}


def mlx_lm_settings(o) -> str | None:
    """What an mlx-lm config run trains, in mlx_lm.lora's keys (None for other runs): the
    resolved settings, printed once at the start."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    if not o.config or not read_config(o.config)[1]:
        return None
    own = dict(o.optimizer_config.get(o.optimizer, {}))
    if o.weight_decay:
        own.setdefault("weight_decay", o.weight_decay)
    mapped = {
        "fine_tune_type": o.method, "optimizer_config": own,
        "lora_parameters": {"keys": o.targets, "rank": o.rank, "scale": o.alpha / o.rank,
                            "dropout": o.dropout},
        "lr_schedule": o.lr_schedule if isinstance(o.lr_schedule, dict) or not o.warmup else
        f"{o.lr_schedule} after {o.warmup} warmup updates",
        "iters": f"{o.iters}" + (f" updates of {o.grad_accumulation_steps} batches"
                                 if o.grad_accumulation_steps > 1 else "")
        + (f" ({o.epochs} epochs)" if o.epochs else ""),
    }
    shown = {k: mapped[k] if k in mapped else getattr(o, k) for k in CONFIG_DEFAULTS
             if k in mapped or (k in FIELDS and k not in _INVOCATION)}
    text = ", ".join(f"{k}: {_brief(v)}" for k, v in shown.items() if v is not None)
    # The config's path whole on a line of its own, and no path below split at a hyphen: copyable.
    return (f"mlx-lm config {o.config} (keys it leaves out take mlx_lm.lora's defaults):\n"
            + textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="  ",
                            break_on_hyphens=False))


def _brief(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_brief(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_brief(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _yaml_loader():
    """PyYAML's safe loader reading 1e-5 as a float (YAML 1.1 wants 1.0e-5), as mlx-lm's."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader
