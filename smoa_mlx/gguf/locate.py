"""Which GGUF file a `--model` names, if any: a `.gguf` file, a directory holding exactly one
(as LM Studio keeps them), or `ollama:NAME[:TAG]` (a model Ollama has pulled).

Ollama stores a model as a manifest, `manifests/registry.ollama.ai/library/NAME/TAG` (JSON;
`user/name` sits under `registry.ollama.ai/user/name`), whose layer of mediaType
`application/vnd.ollama.image.model` names the GGUF blob by digest `sha256:<hex>`, stored as
`blobs/sha256-<hex>`; the root is `$OLLAMA_MODELS`, else `~/.ollama/models`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MissingFileError, ModelError

PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
REGISTRY = "registry.ollama.ai"


def gguf_path(name: str) -> Path | None:
    """The GGUF file `name` means, or None when it is not a GGUF reference (a model
    directory or a hub id); a reference that cannot be resolved is one line."""
    if name.startswith(PREFIX):
        return ollama_blob(name[len(PREFIX):])
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise MissingFileError(f"{name}: GGUF file not found")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"), key=lambda p: p.name)
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelError(f"{path}: holds {len(found)} GGUF files ({names}); pass one of them as --model")
        if found:
            return found[0]
    return None


def ollama_root() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def ollama_blob(ref: str) -> Path:
    """The GGUF blob of Ollama's model `ref` ("name", "name:tag", "user/name:tag")."""
    name, _, tag = ref.partition(":")
    if not name or "/" in tag or ".." in name.split("/"):
        raise ModelError(f"ollama:{ref}: not an Ollama model name (ollama:NAME[:TAG])")
    tag = tag or "latest"
    root = ollama_root()
    repo = name if "/" in name else f"library/{name}"
    manifest = root / "manifests" / REGISTRY / repo / tag
    if not manifest.is_file():
        raise MissingFileError(f"ollama:{name}:{tag}: not pulled ({manifest} not found); "
                               f"run `ollama pull {name}:{tag}` first")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (ValueError, KeyError, TypeError, StopIteration):
        raise ModelError(f"{manifest}: not an Ollama manifest with a model layer ({MODEL_LAYER})") from None
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise MissingFileError(f"ollama:{name}:{tag}: blob {blob} is missing; run `ollama pull {name}:{tag}` again")
    return blob
