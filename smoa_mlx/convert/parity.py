"""MLX vs PyTorch on the same adapter and inputs: parity measured, not assumed.

End to end: the logits of a fixed token sequence. Per layer: every adapted
module applied to the same random inputs, its disagreement relative to the size
of the adapter's own contribution (so a tiny update cannot hide a wrong one);
for MoE experts, every expert's update applied to them (PEFT's `get_delta_weight`
of the 3-D parameter, or its gate / up half).
Relative error means max |mlx - torch| / max |reference| throughout.
PyTorch comes from the `torch` extra: transformers, plus PEFT for hira/lora
and `smoa_mlx.torch` for smoa.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..archs import SWITCH_TYPES, model_type
from ..errors import ModelError
from ..files import read_config
from ..layer import adapter_layers, base_weight
from ..layouts.names import PEFT_PREFIX, hf_expert, hf_path

PROBE_TOKENS = 24
PROBE_ROWS = 8


def max_rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def probe_tokens(vocab_size: int, n: int = PROBE_TOKENS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (1, n)).astype(np.int64)


def skip_reason(fmt: str, model_dir) -> str | None:
    """Why PyTorch cannot run this comparison here, or None."""
    needed = ["torch", "transformers"] + ([] if fmt == "smoa" else ["peft"])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'smoa-mlx[torch]')"
    config = read_config(Path(model_dir) / "config.json")
    if "quantization" in config or "quantization_config" in config:
        return "the base model is quantized; transformers needs the float checkpoint"
    return None


def mlx_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def torch_model(fmt: str, model_dir, torch_adapter, plan_dtype=None):
    """The transformers model in float32 with the PyTorch adapter applied (unmerged)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    with warnings.catch_warnings():  # deprecation chatter between transformers and peft versions
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
        if fmt == "smoa":
            from ..torch import apply_adapter

            apply_adapter(model, torch_adapter, plan_dtype)
            return model
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(torch_adapter)).eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def torch_expert_deltas(tmodel) -> dict[str, np.ndarray]:
    """PEFT's update of every 3-D parameter its LoRA wraps (ParamWrapper), (E, out, in) by
    transformers path."""
    from peft.tuners.lora.layer import ParamWrapper

    deltas = {}
    for name, m in tmodel.named_modules():
        if isinstance(m, ParamWrapper):
            path = name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            deltas[f"{path}.{m.parameter_name}"] = delta.detach().double().numpy()
    return deltas


def expert_error(m, torch_deltas: dict, path: str, x: np.ndarray) -> float:
    """Max error of every expert's update applied to `x` against PEFT's (the rows of the
    parameter holding `path`), relative to that whole parameter's: a gate half the SMoA adapter
    left alone is zero, up to the SVD's rounding. The MLX update is what `m` fuses into its base."""
    w0 = base_weight(m.linear).astype(mx.float32)
    delta = np.array(m.fuse(dequantize=True).weight.astype(mx.float32) - w0, np.float64)
    param, half = hf_expert(path)
    ref = np.einsum("ri,eoi->ero", x.astype(np.float64), torch_deltas[param])
    d_out = delta.shape[1]
    rows = slice(None) if half is None else slice(half * d_out, (half + 1) * d_out)
    y_mlx = np.einsum("ri,eoi->ero", x.astype(np.float64), delta)
    return float(np.max(np.abs(y_mlx - ref[..., rows])) / max(np.max(np.abs(ref)), 1e-30))


def measure(fmt: str, model_dir, mlx_model, torch_adapter, plan_dtype=None) -> dict:
    """Max relative error of the logits and, per adapted module, of its output."""
    import torch

    tmodel = torch_model(fmt, model_dir, torch_adapter, plan_dtype)
    prefix = "" if fmt == "smoa" else PEFT_PREFIX
    rng = np.random.default_rng(1)
    layers, torch_deltas, mt = {}, None, model_type(mlx_model)
    for path, m in adapter_layers(mlx_model).items():
        if isinstance(m.linear, SWITCH_TYPES):
            if torch_deltas is None:
                torch_deltas = torch_expert_deltas(tmodel)
            x = rng.standard_normal((PROBE_ROWS, m.linear.input_dims)).astype(np.float32)
            layers[path] = expert_error(m, torch_deltas, path, x)
            continue
        w0 = np.array(base_weight(m.linear).astype(mx.float32), np.float64)
        x = rng.standard_normal((PROBE_ROWS, w0.shape[1])).astype(np.float32)
        y_mlx = np.array(m(mx.array(x)).astype(mx.float32))
        with torch.no_grad():
            y_torch = tmodel.get_submodule(prefix + hf_path(path, mt))(torch.from_numpy(x)).numpy()
        update = y_torch - x.astype(np.float64) @ w0.T
        if "bias" in m.linear:
            update -= np.array(m.linear.bias.astype(mx.float32))
        layers[path] = float(np.max(np.abs(y_mlx - y_torch)) / max(np.max(np.abs(update)), 1e-30))
    config = read_config(Path(model_dir) / "config.json")
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))  # gemma3: text_config
    if not isinstance(vocab, int):
        raise ModelError(f"{Path(model_dir) / 'config.json'}: no integer vocab_size to draw probe tokens from")
    tokens = probe_tokens(vocab)
    logits = max_rel(mlx_logits(mlx_model, tokens), torch_logits(tmodel, tokens))
    return {"logits": logits, "layers": layers}


def describe(result: dict) -> str:
    worst = max(result["layers"], key=result["layers"].get)
    return (f"parity MLX vs PyTorch: max relative logit error {result['logits']:.3e} "
            f"({PROBE_TOKENS} tokens); worst layer {worst}: {result['layers'][worst]:.3e} "
            "of its update")
