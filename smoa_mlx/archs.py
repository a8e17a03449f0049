"""Default SMoA targets per mlx-lm architecture, and where each module's decoder layer is.

The authors adapt `q_proj, k_proj, v_proj, up_proj, down_proj` (SPEC §1): the attention
inputs and the MLP's up and down projections. Every architecture gets the same choice
in its own names. A key matches a path ending in it, so the Llama names also reach MoE
experts (`mlp.switch_mlp.up_proj`, `mlp.experts.down_proj`) and shared experts; routers
(`mlp.gate`, `mlp.router`) are never defaults.

A fused projection (`qkv_proj`, `gate_up_proj`, `c_attn`) is adapted as the one linear
layer it is, with one plan over the fused weight: that is the module PEFT and the
authors' code target, so adapters convert 1:1 and fuse into the same checkpoint
tensor; per-part plans would need split bookkeeping no PyTorch loader knows. The
fused gate|up of `gate_up_proj` is taken whole for the same reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .errors import ModelError
from .files import load_safetensors, read_json, save_safetensors, write_json
from .layouts.names import UNSEEN

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"

# DeepSeek's multi-head latent attention: the query and key/value input projections, low-rank
# pairs included (q_proj exists only without q_lora_rank).
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
# Gated-delta linear attention layers of hybrid models (Qwen3-Next/3.5): their q|k|v input.
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_qkvz")
# State-space (Mamba, Mamba-2) and short-convolution (LFM2's conv.in_proj/out_proj) mixers have
# no q/k/v to split: their input and output projections, the mixer's counterpart of an MLP's up
# and down. x_proj/dt_proj compute the scan's per-token step and B/C (scores, like a router's)
# and are never defaults.
SSM = ("mixer.in_proj", "mixer.out_proj")
MAMBA_BRANCH = ("mamba.in_proj", "mamba.out_proj")  # a Mamba mixer beside attention/MLP
# model_type -> default target keys, for architectures whose names differ from Llama's.
TARGETS = {
    "phi3": ("qkv_proj", "gate_up_proj", "down_proj"),
    "glm4": ("q_proj", "k_proj", "v_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "mlp.c_fc", "mlp.c_proj"),
    "internlm2": ("wqkv", "w3", "w2"),
    "gpt2": ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"),
    "gpt_bigcode": ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    "glm": ("q_proj", "k_proj", "v_proj", "gate_up_proj", "down_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "fc_in", "fc_out"),
    "nanochat": ("c_q", "c_k", "c_v", "mlp.c_fc", "mlp.c_proj"),
    "phixtral": ("Wqkv", "fc1", "fc2"),
    "plamo2": ("qkv_proj", "gate_up_proj", "down_proj") + SSM,
    "plamo3": ("qkv_proj", "gate_up_proj", "down_proj"),
    "qwen": ("c_attn", "w1", "mlp.c_proj"),  # w2 is the gate (swiglu(w2 x, w1 x))
    "talkie": ("attn_query", "attn_key", "attn_value", "mlp_linear", "mlp_resid"),
    "baichuan_m1": ("W_pack", "up_proj", "down_proj"),
    **{t: ("query_key_value", "up_proj", "down_proj") for t in ("bailing_moe", "bailing_moe_linear")},
    "dbrx": ("Wqkv", "v1", "w2"),  # experts: swiglu(w1 x, v1 x), so v1 is the up projection
    "exaone": ("q_proj", "k_proj", "v_proj", "c_fc_1", "mlp.c_proj"),  # c_fc_0 is the gate
    # LFM2: w1 gate, w3 up, w2 down; MoE experts under Llama names
    **{t: ("q_proj", "k_proj", "v_proj", "conv.in_proj", "conv.out_proj", "w3", "w2", "up_proj", "down_proj")
       for t in ("lfm2", "lfm2-vl", "lfm2_moe")},
    "mamba": SSM,
    "mamba2": SSM,
    "nemotron_h": LLAMA_TARGETS + SSM + ("fc1", "fc2"),  # MoE experts: relu2(fc1 x), fc2
    "falcon_h1": LLAMA_TARGETS + MAMBA_BRANCH,
    # its shared expert's input_linear is the fused gate|up (taken whole, as gate_up_proj)
    "granitemoehybrid": LLAMA_TARGETS + MAMBA_BRANCH + ("shared_mlp.input_linear", "shared_mlp.output_linear"),
    "deepseek_v41": LLAMA_TARGETS + MLA + ("kv_proj",),
    "bailing_hybrid": ("query_key_value", "up_proj", "down_proj") + MLA,  # linear-attention and MLA layers
    "jamba": LLAMA_TARGETS + MAMBA_BRANCH,
    "kimi_k3": LLAMA_TARGETS + MLA + ("qkv_proj",),  # KDA layers: fused qkv_proj
    "lille-130m": ("qkv_proj", "up_proj", "down_proj"),
    "openelm": ("qkv_proj", "proj_1", "proj_2"),  # proj_1 is the fused gate|up
    "phi3small": ("query_key_value", "up_proj", "down_proj"),  # untested: mlx-lm's model corrupts memory on CPU
    # RG-LRU blocks: linear_x and linear_y (the scan's input and its gate, Mamba's in_proj in two) and
    # linear_out (untested: mlx-lm's recurrent_gemma.Model skips nn.Module.__init__, so it cannot be frozen)
    "recurrent_gemma": LLAMA_TARGETS + ("linear_x", "linear_y", "linear_out"),
    # RWKV-7: receptance/key/value into the time mix, channel mix key (up) and value (down); the
    # low-rank a/g/v/w projections compute decays and gates and are never defaults
    "rwkv7": ("r_proj", "k_proj", "v_proj", "ffn.key", "ffn.value"),
    "spark2_5": ("q_k_v_proj", "up_proj", "down_proj"),
    # afm7 has no row: its fused qkv_proj is a FusedLinear returning (q, k, v), which SMoALinear does
    # not reproduce; Llama's names reach the MLP and the q_proj of its KV-reuse layers
    **{t: LLAMA_TARGETS + LINEAR_ATTENTION for t in ("qwen3_5", "qwen3_5_moe", "qwen3_next")},
    **{t: LLAMA_TARGETS + MLA for t in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite",
                                         "youtu_llm", "bailing_moe_v3", "kimi_k25", "kimi_vl", "kimi_linear",
                                         "minicpm3", "mistral4", "longcat_flash", "longcat_flash_ngram",
                                         "glm_moe_dsa")},
}

# Layers SMoA adapts: dense (2-D weight) and MoE expert (3-D weight, one per expert).
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
SWITCH_TYPES = (SwitchLinear, QuantizedSwitchLinear)
ADAPTABLE = LINEAR_TYPES + SWITCH_TYPES


def adaptable(m: nn.Module) -> bool:
    """A linear layer SMoA can stand in for: a subclass with its own `__call__` may return
    something else (afm7's FusedLinear returns (q, k, v))."""
    return any(isinstance(m, t) and type(m).__call__ is t.__call__ for t in ADAPTABLE)


def model_type(model: nn.Module) -> str | None:
    args = getattr(model, "args", None)
    return getattr(model, "model_type", None) or getattr(args, "model_type", None)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The row of the model's type, else of the text model a VL wrapper holds (mistral3 over
    mistral4, kimi_vl over deepseek_v3), else Llama's names."""
    text = getattr(getattr(model, "args", None), "text_config", None)
    text_type = text.get("model_type") if isinstance(text, dict) else getattr(text, "model_type", None)
    return TARGETS.get(model_type(model)) or TARGETS.get(text_type, LLAMA_TARGETS)


def decoder_layers(model: nn.Module) -> dict[str, int]:
    """Module path -> index of every decoder layer, found by identity in `model.layers`
    (what mlx-lm's own training uses), whatever the layers are named (`layers.N`, `h.N`)."""
    layers = getattr(model, "layers", None)
    if layers is None or not len(layers):
        raise ModelError(
            f"{type(model).__module__}: the model has no `layers` list of decoder layers, "
            "so SMoA cannot tell which layer a module belongs to"
        )
    index = {id(layer): i for i, layer in enumerate(layers)}
    found = {p: index[id(m)] for p, m in model.named_modules() if id(m) in index}
    if len(found) != len(index):
        raise ModelError(
            f"{type(model).__module__}: {len(index) - len(found)} of the model's {len(index)} "
            "decoder layers are not among its modules; unknown layout"
        )
    return found


def layer_index(path: str, layers: dict[str, int]) -> int | None:
    """The decoder layer holding module `path` (None: outside every decoder layer)."""
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        i = layers.get(".".join(parts[:n]))
        if i is not None:
            return i
    return None


# `fuse --hf` model types: their merged weights load in transformers under mlx-lm's names,
# once MoE experts are un-stacked (tests/test_archs.py compares the logits for each). mlx-lm's
# parameter names are the checkpoint's, not always transformers' module names: gemma3's
# `language_model.model.*` is what hub checkpoints and transformers' own save_pretrained write.
HF_FUSE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
           "starcoder2", "olmo2", "cohere", "glm4", "phi", "granite", "smollm3", "seed_oss",
           "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
_STACKED = re.compile(r"^(.*)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
_MIXTRAL_EXPERTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def check_hf_fuse(model_type: str | None) -> None:
    if model_type not in HF_FUSE:
        raise ModelError(f"model type {model_type!r}: fuse --hf writes only {', '.join(HF_FUSE)} "
                         "checkpoints (names checked against transformers)")


def hf_tensors(model_type: str, weights: dict) -> dict:
    """mlx-lm's merged weights under checkpoint names: stacked experts (E, d_out, d_in) become
    one tensor per expert, as hub checkpoints store them and transformers 5 fuses on loading."""
    out = {}
    for key, value in weights.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = value
            continue
        name = _MIXTRAL_EXPERTS[m[2]] if model_type == "mixtral" else m[2]
        out.update({f"{m[1]}.experts.{e}.{name}.{m[3]}": value[e] for e in range(value.shape[0])})
    return out


def kept_tensors(model_type: str, model_dir: Path) -> dict:
    """The base checkpoint's tensors of the modules mlx-lm drops (`UNSEEN`: gemma3's vision tower
    and projector), as stored there, so the fused checkpoint is the base's whole architecture
    (docs/ARCHITECTURE.md says why); refused when the checkpoint lacks them or holds them in
    MLX's layout (an mlx-vlm conversion)."""
    prefixes = UNSEEN.get(model_type, ())
    if not prefixes:
        return {}
    kept = {}
    for shard in sorted(Path(model_dir).glob("model*.safetensors")):
        kept.update({k: v for k, v in load_safetensors(shard).items() if k.split(".", 1)[0] in prefixes})
    why = f"fuse --hf copies the {model_type} {' and '.join(prefixes)} from the base's Hugging Face checkpoint"
    for p in prefixes:
        if not any(k.startswith(p + ".") for k in kept):
            raise ModelError(f"{model_dir}: no {p}.* tensors; {why} (pass that checkpoint as --model)")
    channels = (read_json(Path(model_dir) / "config.json").get("vision_config") or {}).get("num_channels", 3)
    for k, v in kept.items():
        if k.endswith((".scales", ".biases")) or (k.endswith("patch_embedding.weight") and v.shape[1] != channels):
            raise ModelError(f"{model_dir}: tensor {k} is in MLX's layout, not transformers'; {why} "
                             "(pass that checkpoint as --model)")
    return kept


def rewrite_hf_shards(directory: Path, model_type: str, kept: dict) -> None:
    """Rename/un-stack the tensors of every shard mlx-lm's `save_model` wrote in `directory`,
    adding the `kept` base tensors to the last one."""
    index_file = directory / "model.safetensors.index.json"
    index = read_json(index_file)
    weight_map = {}
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:
        tensors = hf_tensors(model_type, mx.load(str(directory / shard)))
        if shard == shards[-1]:
            tensors.update(kept)
        save_safetensors(directory / shard, tensors, {"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    write_json(index_file, {**index, "weight_map": dict(sorted(weight_map.items()))})
