"""Effective rank of the learned updates ΔW: SMoA's selling point is a high-rank update
from few parameters (LoRA at rank r is capped at r), so users should see it measured.

Two measures per module, from the singular values s of ΔW (float64):
- `rank_1pct`: how many s are above 1% of the largest (a numerical rank);
- `entropy_rank`: exp(H(p)) with p = s / sum(s) (Roy & Vetterli's effective rank), a
  smooth count that is small when a few directions carry the update.
An all-zero ΔW (an untrained adapter) has rank 0 by both measures. An MoE expert layer
has one ΔW per expert: its row holds the mean over experts, and `experts` the per-expert values.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from .errors import AdapterError
from .layer import SMoALinear, adapter_layers
from .patch import layer_relative
from .switch import SMoASwitchLinear

REL_TOL = 0.01


def delta_weight(module: nn.Module) -> mx.array:
    """The dense scaled update (d_out, d_in) of an SMoA or mlx-lm LoRA/DoRA layer; (E, d_out,
    d_in) for SMoA on MoE experts."""
    if isinstance(module, (SMoALinear, SMoASwitchLinear)):
        return module.delta_weight()
    if isinstance(module, LoRALinear):  # mlx-lm: y += scale * (x @ lora_a) @ lora_b
        return module.scale * (module.lora_b.T @ module.lora_a.T)
    if isinstance(module, DoRALinear):  # the rescaled rows change too: merged minus base
        w = module._dequantized_weight().astype(mx.float32)
        adapted = w + module.scale * (module.lora_b.T @ module.lora_a.T)
        return (module.m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted - w
    raise TypeError(f"no update to measure in a {type(module).__name__}")


def adapter_deltas(model: nn.Module) -> dict[str, mx.array]:
    """ΔW of every SMoA / LoRA / DoRA layer of `model`, by module path (layers in numeric order)."""
    kinds = (SMoALinear, SMoASwitchLinear, LoRALinear, DoRALinear)
    return {p: delta_weight(m) for p, m in adapter_layers(model, kinds).items()}


def singular_values(delta) -> np.ndarray:
    """Singular values of `delta` (float64, descending), as the square roots of the
    eigenvalues of the smaller Gram matrix: ~5x faster than an SVD on a 2048x8192
    weight, exact to ~sqrt(eps) * the largest, far below the 1% cut."""
    d = np.asarray(delta, dtype=np.float64)
    gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram), 0.0))[::-1]


def effective_rank(delta, rel_tol: float = REL_TOL) -> tuple[int, float]:
    """(singular values above `rel_tol` * the largest, exp of the singular-value entropy)."""
    s = singular_values(delta)
    if s.size == 0 or s[0] <= 0:
        return 0, 0.0
    p = s / s.sum()
    p = p[p > 0]
    return int((s > rel_tol * s[0]).sum()), float(np.exp(-(p * np.log(p)).sum()))


def rank_report(model: nn.Module, rel_tol: float = REL_TOL) -> dict:
    """Per adapted module: its shape, the cap min(d_out, d_in), and both effective ranks."""
    deltas = adapter_deltas(model)
    if not deltas:
        raise AdapterError("the model has no SMoA, LoRA or DoRA layers to measure")
    modules = {}
    for path, delta in deltas.items():
        delta = np.array(delta.astype(mx.float32))
        info = {"type": layer_relative(path), "shape": list(delta.shape[-2:]), "max_rank": min(delta.shape[-2:])}
        if delta.ndim == 2:
            info["rank_1pct"], info["entropy_rank"] = effective_rank(delta, rel_tol)
        else:
            per = [effective_rank(d, rel_tol) for d in delta]
            info["experts"] = [{"rank_1pct": r, "entropy_rank": e} for r, e in per]
            info["rank_1pct"] = float(np.mean([r for r, _ in per]))
            info["entropy_rank"] = float(np.mean([e for _, e in per]))
        modules[path] = info
    return {"rel_tol": rel_tol, "modules": modules, "summary": summarize(modules)}


def summarize(modules: dict) -> dict:
    """Mean/min/max of both measures per module type and over all modules (key "all")."""
    groups: dict[str, list[dict]] = {}
    for info in modules.values():
        groups.setdefault(info["type"], []).append(info)
    groups["all"] = list(modules.values())
    out = {}
    for name, items in groups.items():
        row = {"count": len(items), "shape": _shape(items),
               "max_rank": max(i["max_rank"] for i in items)}
        for key in ("rank_1pct", "entropy_rank"):
            values = np.array([i[key] for i in items], dtype=np.float64)
            row[key] = {"mean": float(values.mean()), "min": float(values.min()),
                        "max": float(values.max())}
        out[name] = row
    return out


def _shape(items) -> str:
    shapes = {tuple(i["shape"]) for i in items}
    return "x".join(map(str, shapes.pop())) if len(shapes) == 1 else "mixed"


def format_rank_report(report: dict) -> str:
    """A compact table: one row per module type, then all modules."""
    head = ("module", "n", "shape", "cap", f"rank>{report['rel_tol']:.0%} mean/min/max",
            "entropy rank mean/min/max")
    rows = [head]
    for name, r in report["summary"].items():
        a, e = r["rank_1pct"], r["entropy_rank"]
        rows.append((name, str(r["count"]), r["shape"], str(r["max_rank"]),
                     f"{a['mean']:.1f} / {a['min']:.0f} / {a['max']:.0f}",
                     f"{e['mean']:.1f} / {e['min']:.1f} / {e['max']:.1f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "Effective rank of the learned updates ΔW\n" + "\n".join(lines)
