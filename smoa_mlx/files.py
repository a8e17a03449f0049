"""Safe file I/O: atomic writes and staged directories, and loading only safetensors and JSON (never pickle)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .errors import AdapterError, ConfigError, MissingFileError, SMoAError


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


def read_json(path):
    """The JSON value in `path`; a missing or unparsable file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_config(path) -> dict:
    """A JSON config file (adapter, PEFT, model), which must hold an object."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a {type(config).__name__}")
    return config


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


@contextmanager
def staged_dir(out):
    """Yield an empty hidden sibling of `out`; on success it replaces `out` in one rename.

    An existing `out` is replaced only if it holds nothing the new output would not
    (so a stray file, or the wrong directory, is never deleted); on any error `out`
    is left untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SMoAError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            stray = sorted(set(os.listdir(out)) - set(os.listdir(tmp)))
            if stray:
                raise SMoAError(
                    f"{out}: holds {stray[0]}, which this command would not write; "
                    "choose a new or empty output directory"
                )
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
