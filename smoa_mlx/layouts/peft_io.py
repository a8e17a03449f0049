"""PEFT-style adapter directories on disk (`adapter_config.json` + `adapter_model.safetensors`).

The config is parsed once into a typed `PeftConfig` (every field a converter uses,
checked, with one-line errors naming the file and key), so the converters never
re-type dict entries. Only JSON and safetensors are read; a pickle checkpoint
(`adapter_model.bin`, what older PEFT versions and the authors' `save_pretrained`
write) is refused with the one-line command that converts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError, ConfigError, MissingFileError
from ..files import read_config, write_json
from .fields import Fields
from .names import hf_path, pattern_value, peft_key, select_targets, unseen
from .tensors import check_tensors, read_tensors, write_tensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class PeftConfig:
    """The fields of a PEFT adapter config that the layouts here use, typed and checked."""

    path: Path  # the config file, which every error names
    raw: dict  # every key, for the options a converter refuses
    peft_type: str
    r: int
    target_modules: list[str] | str | None  # names, or one regex over the whole path
    target_parameters: list[str] | None  # LoRA on 3-D parameters (MoE experts), by name
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | None
    layers_pattern: list[str] | str | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    lora_alpha: float
    dropout: float  # lora_dropout, or hira_dropout for HiRA
    use_rslora: bool
    num_blocks: int  # SMoA only
    branch_ranks: list[int] | None  # SMoA only
    model_type: str | None  # of the base, whose transformers names the adapter's rules match

    @classmethod
    def parse(cls, raw: dict, path, peft_type: str, model_type: str | None) -> "PeftConfig":
        """Check `raw` (the JSON object in `path`) for an adapter of `peft_type` on a `model_type` base."""
        found = raw.get("peft_type")
        if str(found).upper() != peft_type:
            raise ConfigError(f"{path}: peft_type is {found!r}, expected {peft_type!r}")
        f = Fields(raw, path)
        if raw.get("target_parameters") and peft_type != "LORA":
            raise ConfigError(f"{path}: target_parameters is a LoRA option, which {peft_type} does not have")
        f.require("r", *([] if raw.get("target_parameters") else ["target_modules"]))
        layers = raw.get("layers_to_transform")
        return cls(
            path=Path(path), raw=raw, peft_type=peft_type,
            r=f.number("r", None, int, minimum=1),
            target_modules=f.names("target_modules", regex_ok=True, optional=True),
            target_parameters=f.names("target_parameters", optional=True),
            exclude_modules=f.names("exclude_modules", regex_ok=True, optional=True),
            layers_to_transform=f.ints("layers_to_transform") if not isinstance(layers, int) else [layers],
            layers_pattern=f.names("layers_pattern", regex_ok=True, optional=True, patterns=True),
            rank_pattern=f.pattern("rank_pattern", int, minimum=1),
            alpha_pattern=f.pattern("alpha_pattern", float),
            lora_alpha=f.number("lora_alpha", 8.0, float),
            dropout=f.number("hira_dropout" if peft_type == "HIRA" else "lora_dropout", 0.0, float, minimum=0),
            use_rslora=bool(raw.get("use_rslora")),
            num_blocks=f.number("num_blocks", 2, int, minimum=1),
            branch_ranks=f.ints("branch_ranks"),
            model_type=model_type,
        )

    def targets(self, paths) -> list[str]:
        """The mlx-lm modules among `paths` this adapter adapts, by PEFT's rules on their
        transformers names (none when it only targets parameters)."""
        if self.target_modules is None:
            return []
        hf = {hf_path(p, self.model_type): p for p in paths}
        selected = [hf[p] for p in select_targets(list(hf), self.target_modules, self.exclude_modules,
                                                  self.layers_to_transform, self.layers_pattern)]
        if not selected:
            raise ConfigError(f"{self.path}: target_modules {self.target_modules!r} match no linear "
                              "layer of the base model")
        return selected

    def rank_of(self, path: str) -> int:
        return pattern_value(self.rank_pattern, hf_path(path, self.model_type), self.r)

    def alpha_of(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, hf_path(path, self.model_type), self.lora_alpha)

    def refuse(self, allowed: dict) -> None:
        """Refuse options a converter cannot represent: `allowed` maps key -> accepted values.

        An absent or empty value (None, False, [], {}) counts as None.
        """
        for key, ok in allowed.items():
            value = self.raw.get(key) or None
            if value not in ok:
                raise ConfigError(f"{self.path}: {key}={value!r} is not supported (supported: {ok})")


@dataclass
class PeftDir:
    path: Path
    config: PeftConfig
    tensors: dict[str, np.ndarray]
    dtypes: set[str]  # the float dtypes the weights file held (read as float32)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    def drop_unseen(self) -> int:
        """Leave out the tensors on modules the mlx-lm model lacks (gemma3's vision tower, which
        PEFT's short target names reach too); returns how many."""
        dropped = [k for k in self.tensors if unseen(k, self.config.model_type)]
        for k in dropped:
            del self.tensors[k]
        return len(dropped)

    def check(self, expected: dict, why: dict) -> None:
        """The weights file holds exactly the `expected` tensors (name -> shape)."""
        check_tensors(self.tensors, expected, self.weights_file, why,
                      " (no targeted module or block of the base model)")

    def cast_note(self) -> str | None:
        """What reading cast, or None: adapters are imported in float32, whatever they were saved in."""
        other = sorted(self.dtypes - {"F32"})
        if not other:
            return None
        return (f"note: {self.weights_file} holds {', '.join(other)} tensors; cast to float32, "
                "the dtype the adapter is imported in")


def factor_shapes(paths, shapes: dict, ranks: dict, a_leaf: str, b_leaf: str, model_type) -> tuple[dict, dict]:
    """Expected shapes of each module's A (r, d_in) and B (d_out, r) under PEFT keys, and why."""
    expected, why = {}, {}
    for p in paths:
        (d_out, d_in), r = shapes[p], ranks[p]
        a, b = peft_key(p, a_leaf, model_type), peft_key(p, b_leaf, model_type)
        expected[a], expected[b] = (r, d_in), (d_out, r)
        why[a] = why[b] = f"{p} is {shapes[p]} in the base model, r={r}"
    return expected, why


def _refuse_pickle(path: Path):
    raise AdapterError(
        f"{path}: pickle checkpoints are refused (safetensors only); convert it where you trust it: "
        f"python -c \"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in "
        f"torch.load('{path.name}', map_location='cpu', weights_only=True).items()}}, '{WEIGHTS}')\" "
        "(README: adapters trained with the authors' code)"
    )


def read_peft_dir(src, peft_type: str, model_type: str | None) -> PeftDir:
    """The config and tensors of a PEFT adapter directory whose peft_type must be `peft_type`,
    for a base of `model_type` (whose transformers names its keys use)."""
    src = Path(src)
    if src.is_file():
        if src.suffix in PICKLES:
            _refuse_pickle(src)
        raise AdapterError(f"{src}: expected an adapter directory holding {CONFIG} and {WEIGHTS}")
    if not src.is_dir():
        raise MissingFileError(f"{src}: directory not found")
    if not (src / WEIGHTS).is_file():
        for p in sorted(src.iterdir()):
            if p.suffix in PICKLES:
                _refuse_pickle(p)
        raise MissingFileError(f"{src / WEIGHTS}: file not found")
    config = PeftConfig.parse(read_config(src / CONFIG), src / CONFIG, peft_type, model_type)
    tensors, dtypes = read_tensors(src / WEIGHTS)
    return PeftDir(src, config, tensors, dtypes)


def write_peft_dir(out_dir: Path, config: dict, tensors: dict, extra: dict | None = None) -> None:
    """Write a PEFT adapter (and `extra`: file name -> tensors) into a staged directory."""
    write_tensors(out_dir / WEIGHTS, tensors)
    for name, more in (extra or {}).items():
        write_tensors(out_dir / name, more)
    write_json(out_dir / CONFIG, config)
