"""The one way every command loads a base model: `load_base(path_or_repo, adapter_path)`.

A local directory, a Hugging Face repo id (downloaded by mlx-lm's own hub code), or a GGUF
model (a `.gguf` file, a directory holding one, `ollama:NAME[:TAG]`: `gguf.locate`),
converted once into a cached MLX directory (`gguf.model.mlx_dir`) and loaded from there.
Everything mlx-lm would trip over deep inside (no directory, no config.json, an
unknown model_type, no weights, an unreachable hub) is checked first and reported
as one line naming the path, so train, generate, chat, serve, evaluate, convert and
fuse all say the same thing about the same bad `--model`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import NamedTuple

from .errors import MissingFileError, ModelError

# What a Hugging Face repo id looks like ("name" or "owner/name"); anything else that
# does not exist locally is a missing path, never a hub request.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HINT = "pass --model PATH to a local model directory or .gguf file"


class Base(NamedTuple):
    """A loaded base model; unpacks as (model, tokenizer, config, path)."""

    model: object
    tokenizer: object
    config: dict
    path: Path


def model_dir(path_or_repo, revision: str | None = None) -> Path:
    """The local directory of a model: the path itself, the hub snapshot (downloaded
    by mlx-lm when missing) or a GGUF's converted directory, checked to hold a model
    mlx-lm can build."""
    from .gguf.locate import gguf_path

    name = str(path_or_repo)
    gguf = gguf_path(name)
    if gguf is not None:
        from .gguf.model import mlx_dir

        return mlx_dir(gguf)
    path = Path(name).expanduser()
    if not path.exists():
        if not _REPO_ID.match(name) or name.startswith(".") or ".." in name:
            raise MissingFileError(f"{name}: model directory not found ({_HINT}, "
                                   "or a Hugging Face repo id)")
        path = _download(name, revision)
    if not path.is_dir():
        raise ModelError(f"{path}: not a model directory ({_HINT})")
    _check_config(path)
    if not any(path.glob("model*.safetensors")):
        raise ModelError(f"{path}: no model*.safetensors weights in the model directory")
    return path


def _download(repo: str, revision) -> Path:
    from mlx_lm.utils import _download as download

    try:
        return Path(download(repo, revision=revision))
    except Exception as e:  # hub, network and auth errors come in many types
        reason = (str(e).strip().splitlines() or [""])[0]
        kind = type(e).__name__ + (f": {reason}" if reason and len(reason) < 160 else "")
        raise ModelError(
            f"cannot load model {repo!r}: not a local directory, and fetching it from the "
            f"Hugging Face Hub failed ({kind}); {_HINT}"
        ) from None


def _check_config(path: Path) -> dict:
    from mlx_lm.utils import MODEL_REMAPPING

    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{file}: no model_type (not an mlx-lm / transformers model config)")
    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    if importlib.util.find_spec(f"mlx_lm.models.{model_type}") is None:
        raise ModelError(f"{file}: model_type {config['model_type']!r} is not supported by "
                         "this mlx-lm (upgrade mlx-lm, or pick a supported model)")
    return config


def load_base(path_or_repo, adapter_path=None, **kwargs) -> Base:
    """(model, tokenizer, config, local dir): mlx-lm's model in eval mode, with the
    adapter (SMoA, or mlx-lm LoRA/DoRA) at `adapter_path` applied when given.

    `kwargs` go to `mlx_lm.utils.load` (lazy, revision, tokenizer_config, ...).
    """
    from mlx_lm.utils import load

    kwargs.pop("return_config", None)
    path = model_dir(path_or_repo, kwargs.get("revision"))
    if adapter_path is not None and not Path(adapter_path).is_dir():
        raise MissingFileError(f"{adapter_path}: adapter directory not found")
    try:
        model, tokenizer, config = load(str(path), return_config=True, **kwargs)
    except (ValueError, FileNotFoundError, KeyError, TypeError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path}: cannot load the model ({reason})") from None
    if adapter_path is not None:
        from .adapters import load_adapter

        load_adapter(model, adapter_path)
    model.eval()
    return Base(model, tokenizer, config, path)


def load_model(path_or_repo, adapter_path=None, inference: bool = False):
    """(model, tokenizer): what train, generate, chat, serve and evaluate load. With
    `inference`, the adapter is prepared to decode at the base's speed and can no
    longer be trained (`inference.prepare_for_inference`)."""
    base = load_base(path_or_repo, adapter_path)
    if inference and adapter_path is not None:
        from .inference import prepare_for_inference

        prepare_for_inference(base.model)
    return base.model, base.tokenizer
