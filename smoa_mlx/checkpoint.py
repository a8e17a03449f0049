"""Training checkpoints: what `--resume` needs to continue a run exactly.

An adapter directory being trained holds:
- `adapters.safetensors` + `adapter_config.json`: the adapter as every loader reads it
  (SMoA format via `adapters.adapter_tensors`, or mlx-lm's own LoRA format);
- `{step:07d}_adapters.safetensors`: numbered copies, as mlx-lm writes them;
- `training_state.safetensors`: the adapter tensors again plus the optimizer state
  (`optimizer.<flattened path>`), with the step, data position, RNG key and run
  arguments as JSON metadata. It is self-contained, so one atomic rename makes a
  checkpoint resumable: a crash between files leaves every file a complete
  checkpoint, at most one save behind the others;
- `metrics.jsonl`: one JSON object per progress report or validation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from .adapters import CONFIG, WEIGHTS, adapter_tensors
from .errors import AdapterError, ConfigError, MissingFileError
from .files import atomic_write, load_safetensors, save_safetensors, write_json
from .layouts.tensors import check_tensors
from .options import MLX_LM_METHODS

STATE = "training_state.safetensors"
METRICS = "metrics.jsonl"
_META_KEY = "smoa_mlx_training_state"


def numbered(step: int) -> str:
    return f"{step:07d}_{WEIGHTS}"


def empty_window() -> dict:
    """The unreported updates' weighted loss sum, weight (SFT: tokens; DPO: pairs) and
    count; a mode's own sums (`modes.Mode.sums_keys`) join it as they come."""
    return {"loss": 0.0, "weight": 0.0, "steps": 0}


@dataclass
class TrainingState:
    """Where a run stands, besides its tensors: the JSON metadata of a training state.

    The loop updates one of these and saves it as it is; `--resume` reads it back.
    """

    step: int = 0
    micro_step: int = 0  # batches consumed: the data position
    window: dict = field(default_factory=empty_window)  # the unreported updates' loss
    trained_tokens: float = 0.0
    rng: list = field(default_factory=list)  # MLX's key at the last update boundary
    args: dict = field(default_factory=dict)  # the run's options

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, where) -> "TrainingState":
        """Checked field by field: a damaged or foreign file is one line naming it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{where}: damaged training state metadata ({e.msg})") from None
        if not isinstance(data, dict):
            raise AdapterError(f"{where}: damaged training state metadata (not a mapping)")
        kinds = {"step": int, "micro_step": int, "window": dict, "trained_tokens": (int, float),
                 "rng": list, "args": dict}
        for key, kind in kinds.items():
            if key not in data:
                raise AdapterError(f"{where}: the training state metadata has no {key!r}")
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise AdapterError(f"{where}: the training state's {key!r} is "
                                   f"{data[key]!r}, not a {kind}")
        window, rng = data["window"], data["rng"]
        if "tokens" in window and "weight" not in window:  # saved before the modes
            window["weight"] = window.pop("tokens")
        if not set(empty_window()) <= set(window) or len(rng) != 2 or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                        for x in window.values()) or \
                not all(isinstance(x, int) for x in rng):
            raise AdapterError(f"{where}: the training state's window or rng is damaged")
        return cls(**{k: data[k] for k in kinds})


@dataclass
class Checkpoint:
    """Adapter tensors, and for a full checkpoint the optimizer state and training state."""

    adapter: dict[str, mx.array]
    optimizer: dict[str, mx.array] | None
    state: TrainingState | None
    source: Path

    @property
    def meta(self) -> dict | None:
        """The training state as the JSON dict it is saved as."""
        return None if self.state is None else asdict(self.state)


def model_adapter(model: nn.Module, method: str) -> dict[str, mx.array]:
    """The tensors an adapter file holds: SMoA's blocks and orders, or LoRA's/DoRA's trainables."""
    if method in MLX_LM_METHODS:
        return dict(tree_flatten(model.trainable_parameters()))
    return adapter_tensors(model)


def all_finite(tensors: dict[str, mx.array]) -> bool:
    floats = [v for v in tensors.values() if mx.issubdtype(v.dtype, mx.floating)]
    checks = [mx.all(mx.isfinite(v)) for v in floats]
    return bool(mx.all(mx.stack(checks)).item()) if checks else True


def save(adapter_path, adapter: dict, optimizer_state: dict, config: dict,
         state: TrainingState) -> Path:
    """Write one checkpoint, every file atomically: resumable state first, then the
    numbered copy, then the adapter file and config that loaders read."""
    adapter_path = Path(adapter_path)
    tensors = {f"adapter.{k}": v for k, v in adapter.items()}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer_state)})
    save_safetensors(adapter_path / STATE, tensors, {_META_KEY: state.to_json()})
    save_safetensors(adapter_path / numbered(state.step), adapter)
    save_safetensors(adapter_path / WEIGHTS, adapter)
    write_json(adapter_path / CONFIG, config)
    return adapter_path


def load(path) -> Checkpoint:
    """Read a `training_state.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX reports a truncated or foreign file deep inside its loader
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
    if _META_KEY not in metadata:
        raise AdapterError(f"{path}: not a smoa_mlx training state (no {_META_KEY} metadata)")
    split = {"adapter": {}, "optimizer": {}}
    for name, value in tensors.items():
        kind, _, key = name.partition(".")
        if kind not in split:
            raise AdapterError(f"{path}: unexpected tensor {name}")
        split[kind][key] = value
    state = TrainingState.from_json(metadata[_META_KEY], path)
    return Checkpoint(split["adapter"], split["optimizer"], state, path)


def resume_source(resume: bool, resume_adapter_file, adapter_path) -> Checkpoint | None:
    """The checkpoint to continue from: `--resume` reads `adapter_path`'s training state;
    `--resume-adapter-file F` reads F, and continues exactly when the training state
    beside F holds the same adapter (else only the weights are reused, as mlx-lm does)."""
    if resume and resume_adapter_file:
        raise ConfigError("pass either --resume or --resume-adapter-file, not both")
    if resume:
        state = Path(adapter_path) / STATE
        if not state.is_file():
            raise MissingFileError(
                f"{adapter_path}: no {STATE} to resume from (train without --resume first)"
            )
        return load(state)
    if not resume_adapter_file:
        return None
    path = Path(resume_adapter_file)
    weights = load_safetensors(path)
    state = path.parent / STATE
    if state.is_file():
        full = load(state)
        same = set(full.adapter) == set(weights) and all(
            full.adapter[k].shape == v.shape and mx.array_equal(full.adapter[k], v).item()
            for k, v in weights.items()
        )
        if same:
            return full
    return Checkpoint(weights, None, None, path)


def restore_optimizer(optimizer, model: nn.Module, flat: dict[str, mx.array], where) -> None:
    """Put saved optimizer state (step, learning rate, moments) into `optimizer`."""
    optimizer.init(model.trainable_parameters())
    # Named as the state file stores them (`optimizer.<path>`), so errors name the tensor.
    expected = {f"optimizer.{k}": v.shape for k, v in tree_flatten(optimizer.state)}
    check_tensors({f"optimizer.{k}": v for k, v in flat.items()}, expected, where,
                  unexpected=" (the optimizer state of another model or optimizer?)")
    optimizer.state = tree_map_with_path(lambda p, _: flat[p], optimizer.state)
    optimizer.init(model.trainable_parameters())


def smoa_orders(tensors: dict[str, mx.array]) -> dict:
    """Module path -> (row_order, col_order) saved in an SMoA adapter: resuming never re-plans."""
    orders = {}
    for name, rows in tensors.items():
        path = name.removesuffix(".row_order")
        if path != name and f"{path}.col_order" in tensors:
            orders[path] = (np.array(rows), np.array(tensors[f"{path}.col_order"]))
    return orders


def load_into(model: nn.Module, method: str, tensors: dict[str, mx.array], where) -> None:
    """Load adapter tensors into an adapted model, naming any tensor that does not fit."""
    expected = {k: v.shape for k, v in model_adapter(model, method).items()}
    check_tensors(tensors, expected, where, unexpected=f" for --method {method} here")
    model.load_weights(list(tensors.items()), strict=False)
    mx.eval(model.parameters())


def rewrite_metrics(adapter_path, upto_step: int | None) -> None:
    """Keep only records up to `upto_step` (resume), or none (fresh run). A line that
    does not parse (the half-written last line of a killed run) is dropped."""
    path = Path(adapter_path) / METRICS
    keep = []
    if upto_step is not None and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) \
                    and record["step"] <= upto_step:
                keep.append(line)
    atomic_write(path, lambda t: t.write_text("".join(line + "\n" for line in keep)))


def remove_stale_temps(adapter_path) -> None:
    """Temp files a killed save left behind (`files.atomic_write` names them `.<stem>.<pid>.tmp*`)."""
    for p in Path(adapter_path).glob(".*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def append_metrics(adapter_path, record: dict) -> None:
    with open(Path(adapter_path) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
