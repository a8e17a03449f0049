"""Safe file I/O: atomic writes, and loading only safetensors and JSON (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from .errors import AdapterError, ConfigError, MissingFileError


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it into place.

    A crash or Ctrl-C mid-write leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda t: t.write_text(json.dumps(obj, indent=2) + "\n"))


def save_safetensors(path, arrays: dict, metadata: dict | None = None) -> Path:
    return atomic_write(path, lambda t: mx.save_safetensors(str(t), arrays, metadata or {}))


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_safetensors(path) -> dict[str, mx.array]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: only .safetensors files are loaded (never pickles)")
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX reports a corrupt file deep inside its loader
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
