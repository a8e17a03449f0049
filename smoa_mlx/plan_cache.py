"""On-disk cache of spectral scores, so planning a base model a second time is instant.

Planning one Llama-3.2-1B projection takes about a second here and a model has 80
of them; the scores depend only on the weight, so they are cached by a SHA-256 of
the float32 weight bytes (and its shape). Scores rather than orders are stored
because they do not depend on K: one scoring serves every `num_blocks` and gives
the same `Plan` (orders and reported gaps) as `make_plan`, bit for bit.

Location: `$SMOA_MLX_CACHE`, else `$XDG_CACHE_HOME/smoa_mlx`, else
`~/.cache/smoa_mlx`; `SMOA_MLX_CACHE=0` (or off/false/no) disables it. Files are
safetensors (`plans/<hash>.safetensors`) written atomically; a missing, corrupt or
mismatched file is recomputed and rewritten, an unwritable cache only warns.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from .files import load_safetensors, save_safetensors
from .plan import Plan, check_blocks, plan_from_scores, spectral_scores

# Part of every key: bump it when the score definition changes.
VERSION = 1
DISABLED = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is disabled."""
    env = os.environ.get("SMOA_MLX_CACHE")
    if env is not None:
        return None if env.strip().lower() in DISABLED else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smoa_mlx"


def weight_key(weight: np.ndarray) -> str:
    """SHA-256 of the float32 weight's bytes and shape (and the cache version)."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    h = hashlib.sha256(f"smoa-plan-v{VERSION} {w.shape}".encode())
    h.update(memoryview(w).cast("B"))
    return h.hexdigest()


def _path(root: Path, key: str) -> Path:
    return root / "plans" / f"{key}.safetensors"


def _read(path: Path, shape) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        tensors = load_safetensors(path)
        # float64 is stored as its raw bits (safetensors in MLX has no float64).
        scores = tuple(np.array(tensors[k]).view(np.float64) for k in ("row_score", "col_score"))
    except (ValueError, KeyError, TypeError):
        return None
    if tuple(len(s) for s in scores) != tuple(shape) or not all(np.isfinite(s).all() for s in scores):
        return None
    return scores


def _write(path: Path, scores) -> None:
    bits = {k: mx.array(np.ascontiguousarray(s, np.float64).view(np.uint32))
            for k, s in zip(("row_score", "col_score"), scores)}
    try:
        save_safetensors(path, bits, {"format": f"smoa-plan-v{VERSION}"})
    except OSError as e:
        _warn_once(f"warning: cannot write the SMoA plan cache ({e}); set SMOA_MLX_CACHE=0 to disable it")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def cached_scores(weight) -> tuple[np.ndarray, np.ndarray]:
    """`spectral_scores` of the float32 `weight`, from the cache when it was scored before."""
    w = np.asarray(weight, dtype=np.float32)
    root = cache_dir()
    if root is None or w.ndim != 2:
        return spectral_scores(w)
    path = _path(root, weight_key(w))
    scores = _read(path, w.shape)
    if scores is None:
        scores = spectral_scores(w)
        _write(path, scores)
    return scores


def cached_plan(weight, num_blocks: int) -> Plan:
    """`make_plan(weight, num_blocks)` of a float32 weight, through the score cache."""
    check_blocks(np.shape(weight), num_blocks)
    return plan_from_scores(*cached_scores(weight), num_blocks)
