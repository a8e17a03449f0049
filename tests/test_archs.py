"""Every mlx-lm architecture family: tiny models built in-process (mlx_lm.models.<arch>).

Per architecture: the default targets (listed here by hand, per layer), init = base
outputs, the trainable count from the weight shapes, adapted = fused, a save/load
round trip, and a few training steps lowering the loss. MoE experts (SwitchLinear)
are among the defaults of the MoE models.
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import _get_classes

from smoa_mlx.adapters import load_adapter, save_adapter
from smoa_mlx.archs import decoder_layers
from smoa_mlx.errors import ConfigError, ModelError
from smoa_mlx.fuse import fuse_layers
from smoa_mlx.patch import apply_smoa, layer_relative, smoa_layers, target_paths

TINY = dict(
    hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5, head_dim=8, max_position_embeddings=128,
    rope_theta=10000.0, tie_word_embeddings=False, layer_norm_eps=1e-5, norm_epsilon=1e-5,
    layer_norm_epsilon=1e-5, norm_eps=1e-5, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
    experts_per_token=2, moe_intermediate_size=24, shared_expert_intermediate_size=24,
    decoder_sparse_step=1, mlp_only_layers=[], n_embd=32, n_layer=2, n_head=4, n_positions=128,
    n_ctx=128, partial_rotary_factor=0.5, rotary_emb_base=10000, rotary_pct=0.5,
    use_parallel_residual=True, bias=False, sliding_window=64, query_pre_attn_scalar=8,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, norm_topk_prob=True,
    sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"],
    attention_bias=False, swiglu_limit=7.0, rotary_dim=4,
    # fields many families require: MoE (DeepSeek style: every layer routed, one shared expert),
    # multi-head latent attention, biases and norms off
    n_routed_experts=4, n_shared_experts=1, num_shared_experts=1, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, first_k_dense_replace=0, moe_layer_freq=1, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, use_bias=False,
    mlp_bias=False, use_qk_norm=False, qk_norm=False, rope_scaling=None, num_layers=2,
)
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA = ATTN + ("mlp.up_proj", "mlp.down_proj")
SWITCH = ("mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj")
SHARED = ("mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")
SPARSE = ("block_sparse_moe.switch_mlp.up_proj", "block_sparse_moe.switch_mlp.down_proj")
# multi-head latent attention (q_lora_rank set: q_a/q_b; deepseek_v3's kv_b is a MultiLinear)
MLA = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa")
SSM = ("mixer.in_proj", "mixer.out_proj")
# model_type -> the default targets of one decoder layer, written out independently of archs.py
EXPECTED = {
    **{t: LLAMA for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo3", "cohere",
        "cohere2", "afmoe", "apertus", "ernie4_5", "exaone4", "gear", "granite", "helium", "hunyuan_v1_dense",
        "internlm3", "iquestloopcoder", "mimo", "minicpm", "ministral3", "muse_glimmer", "nanbeige", "nemotron",
        "plamo", "seed_oss", "smollm3", "stablelm", "telechat3",
        # VL wrappers: their language model's layers
        "gemma3", "gemma3n", "mistral3", "pixtral", "qwen2_vl", "qwen3_vl")},
    "llama4_text": ATTN + ("feed_forward.up_proj", "feed_forward.down_proj"),
    "phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "glm4": ATTN + ("mlp.gate_up_proj", "mlp.down_proj"),
    "glm": ATTN + ("mlp.gate_up_proj", "mlp.down_proj"),
    "phi": ATTN + ("mlp.fc1", "mlp.fc2"),
    "starcoder2": ATTN + ("mlp.c_fc", "mlp.c_proj"),
    "internlm2": ("attention.wqkv", "feed_forward.w3", "feed_forward.w2"),
    "gpt2": ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"),
    "gpt_bigcode": ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("attention.query_key_value", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "gptj": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in", "mlp.fc_out"),
    "nanochat": ("attn.c_q", "attn.c_k", "attn.c_v", "mlp.c_fc", "mlp.c_proj"),
    "qwen": ("attn.c_attn", "mlp.w1", "mlp.c_proj"),
    "talkie": ("attn.attn_query", "attn.attn_key", "attn.attn_value", "mlp.mlp_linear", "mlp.mlp_resid"),
    "plamo3": ("mixer.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "baichuan_m1": ("self_attn.W_pack", "mlp.up_proj", "mlp.down_proj"),
    "exaone": ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj", "mlp.c_fc_1",
               "mlp.c_proj"),
    "falcon_h1": ATTN + ("feed_forward.up_proj", "feed_forward.down_proj", "mamba.in_proj", "mamba.out_proj"),
    "mamba": SSM, "mamba2": SSM,
    # MoE
    **{t: ATTN + SWITCH for t in ("qwen3_moe", "qwen3_vl_moe", "olmoe", "mellum")},
    **{t: ATTN + SPARSE for t in ("mixtral", "phimoe", "granitemoe", "minimax")},
    **{t: ATTN + SWITCH + SHARED for t in ("deepseek", "ernie4_5_moe", "glm4_moe", "solar_open")},
    **{t: ATTN + ("mlp.experts.up_proj", "mlp.experts.down_proj") + SHARED for t in ("Klear", "dots1")},
    "qwen2_moe": ATTN + SWITCH + ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
    "hunyuan": ATTN + SWITCH + ("mlp.shared_mlp.up_proj", "mlp.shared_mlp.down_proj"),
    "minimax_m3_vl": ATTN + SPARSE + ("block_sparse_moe.shared_experts.up_proj",
                                      "block_sparse_moe.shared_experts.down_proj"),
    "gpt_oss": ATTN + ("mlp.experts.up_proj", "mlp.experts.down_proj"),
    "bailing_moe": ("attention.query_key_value",) + SWITCH + SHARED,
    "dbrx": ("norm_attn_norm.attn.Wqkv",) + tuple(f"ffn.experts.{e}.{n}" for e in range(4) for n in ("v1", "w2")),
    **{t: MLA + SWITCH + SHARED for t in ("deepseek_v3", "deepseek_v32", "glm4_moe_lite", "kimi_k25", "kimi_vl",
                                          "mistral4")},
    "deepseek_v2": MLA + ("self_attn.kv_b_proj",) + SWITCH + SHARED,
    **{t: MLA + ("self_attn.kv_b_proj", "mlp.up_proj", "mlp.down_proj") for t in ("minicpm3", "youtu_llm")},
    "deepseek_v41": ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj",
                     "mlp.experts.switch_mlp.up_proj", "mlp.experts.switch_mlp.down_proj") + SHARED,
    "bailing_moe_v3": tuple(n.replace("self_attn", "attention") for n in MLA) + SWITCH + SHARED,
    **{t: LLAMA for t in ("gemma4", "gemma4_text", "nemotron-nas")},
    "glm_moe_dsa": MLA + SWITCH + SHARED,
    "bailing_moe_linear": ("attention.query_key_value",) + SWITCH + SHARED,
    "lille-130m": ("attention.qkv_proj", "feed_forward.up_proj", "feed_forward.down_proj"),
    "openelm": ("attn.qkv_proj", "ffn.proj_1", "ffn.proj_2"),
    "phixtral": ("mixer.Wqkv", "moe.switch_mlp.fc1", "moe.switch_mlp.fc2"),
    "rwkv7": ("attn.r_proj", "attn.k_proj", "attn.v_proj", "ffn.key", "ffn.value"),
    "spark2_5": ("self_attn.q_k_v_proj", "mlp.up_proj", "mlp.down_proj"),
    **{t: tuple(f"self_attn.{i}.{n.split('.')[1]}" for i in (0, 1) for n in MLA) + SWITCH
    + tuple(f"mlps.{i}.{n}" for i in (0, 1) for n in ("up_proj", "down_proj"))
       for t in ("longcat_flash", "longcat_flash_ngram")},
}
# Hybrids, layer by layer (in layer order): linear attention / state-space / convolution layers
# beside attention, dense beside MoE layers.
QWEN_MOE = SWITCH + ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
GRANITE = SPARSE + ("shared_mlp.input_linear", "shared_mlp.output_linear")
LFM = ("feed_forward.w3", "feed_forward.w2")
LFM_MOE = ("feed_forward.switch_mlp.up_proj", "feed_forward.switch_mlp.down_proj")
LLAMA4_MOE = ("feed_forward.experts.up_proj", "feed_forward.experts.down_proj",
              "feed_forward.shared_expert.up_proj", "feed_forward.shared_expert.down_proj")
HYBRID = {
    **{t: [("linear_attn.in_proj_qkv",) + QWEN_MOE, ATTN + QWEN_MOE] for t in ("qwen3_5", "qwen3_5_moe")},
    "granitemoehybrid": [("mamba.in_proj", "mamba.out_proj") + GRANITE, ATTN + GRANITE],
    "kimi_linear": [ATTN + SWITCH + SHARED, ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa") + SWITCH + SHARED],
    "laguna": [LLAMA, ATTN + QWEN_MOE],
    "step3p5": [LLAMA, ATTN + SWITCH + ("mlp.share_expert.up_proj", "mlp.share_expert.down_proj")],
    **{t: [("conv.in_proj", "conv.out_proj") + LFM, ATTN + LFM] for t in ("lfm2", "lfm2-vl")},
    "lfm2_moe": [("conv.in_proj", "conv.out_proj") + LFM_MOE, ATTN + LFM_MOE],
    "llama4": [ATTN + ("feed_forward.up_proj", "feed_forward.down_proj"), ATTN + LLAMA4_MOE] * 2,
    # Mamba-2, attention, MLP, MoE layers
    "nemotron_h": [SSM, ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj"), ("mixer.up_proj", "mixer.down_proj"),
                   ("mixer.switch_mlp.fc1", "mixer.switch_mlp.fc2", "mixer.shared_experts.up_proj",
                    "mixer.shared_experts.down_proj")],
    "qwen3_next": [("linear_attn.in_proj_qkvz",) + QWEN_MOE, ATTN + QWEN_MOE],
    "olmo_hybrid": [tuple(n.replace("self_attn", "linear_attn") for n in LLAMA), LLAMA],
    **{t: [LLAMA, ATTN + SWITCH + SHARED] for t in ("exaone_moe", "mimo_v2_flash")},
    # afm7: the fused qkv_proj (returns q, k, v) is left out; the KV-reuse layer has a q_proj
    "afm7": [("mlp.up_proj", "mlp.down_proj"), ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")],
    "bailing_hybrid": [("attention.query_key_value",) + SWITCH + SHARED,
                       tuple(n.replace("self_attn", "attention") for n in MLA) + SWITCH + SHARED],
    "kimi_k3": [("self_attn.qkv_proj",) + SWITCH + SHARED, MLA + SWITCH + SHARED],
    "jamba": [("mamba.in_proj", "mamba.out_proj", "feed_forward.up_proj", "feed_forward.down_proj"),
              ATTN + ("feed_forward.switch_mlp.up_proj", "feed_forward.switch_mlp.down_proj")],
    "plamo2": [SSM + ("mlp.gate_up_proj", "mlp.down_proj"), ("mixer.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")],
}
OVERRIDES = {
    "qwen": dict(kv_channels=8), "qwen3_5_moe": dict(full_attention_interval=2),
    "llama4_text": dict(intermediate_size_mlp=48, no_rope_layers=[1, 0]),
    # four layers: the fourth is llama4's first global-attention (no rope) layer
    "llama4": dict(intermediate_size_mlp=48, attention_chunk_size=64, interleave_moe_layer_step=2,
                   num_experts_per_tok=1, num_hidden_layers=4),
    "deepseek_v2": dict(rope_scaling=dict(factor=1.0)),
    **{t: dict(logits_scaling=1.0, attention_multiplier=0.125, embedding_multiplier=1.0,
               residual_multiplier=1.0) for t in ("granite", "granitemoe")},
    "granitemoehybrid": dict(logits_scaling=1.0, attention_multiplier=0.125, embedding_multiplier=1.0,
                             residual_multiplier=1.0, layer_types=["mamba", "attention"],
                             shared_intermediate_size=24, mamba_n_heads=4, mamba_d_head=16,
                             mamba_proj_bias=False, mamba_d_state=8, mamba_d_conv=4, mamba_n_groups=1,
                             mamba_conv_bias=True),
    "minicpm": dict(dim_model_base=32, scale_depth=1.4, scale_emb=12),
    "minicpm3": dict(dim_model_base=32, scale_depth=1.4, scale_emb=12),
    "mamba": dict(intermediate_size=64, state_size=8, conv_kernel=4, use_conv_bias=True, time_step_rank=4),
    "mamba2": dict(num_heads=4, head_dim=16, intermediate_size=64, state_size=8, conv_kernel=4, n_groups=1,
                   use_conv_bias=True, time_step_limit=(0.0, float("inf")), time_step_rank=4),
    "exaone4": dict(sliding_window_pattern="LG"),
    "nemotron": dict(hidden_act="relu2"),
    "nemotron_h": dict(hybrid_override_pattern=["M", "*", "-", "E"], layer_types=None, mamba_num_heads=4,
                       mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=8, conv_kernel=4,
                       n_groups=1, use_conv_bias=True, moe_intermediate_size=24,
                       moe_shared_expert_intermediate_size=24, num_experts_per_tok=2, norm_topk_prob=True,
                       time_step_limit=(0.0, float("inf"))),
    "lfm2": dict(conv_bias=False, conv_L_cache=3, block_dim=32, block_ff_dim=48, block_multiple_of=16,
                 block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False,
                 layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(use_expert_bias=True, num_dense_layers=0, conv_bias=False, conv_L_cache=3,
                     layer_types=["conv", "full_attention"]),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_num_shared_experts=1),
    "hunyuan": dict(moe_topk=2, num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=False,
                    cla_share_factor=1),
    "dbrx": dict(d_model=32, n_layers=2, n_heads=4,
                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0)),
    "kimi_linear": dict(linear_attn_config=dict(kda_layers=[1], num_heads=4, head_dim=8, short_conv_kernel_size=4),
                        model_max_length=128),
    "minimax": dict(shared_intermediate_size=24),
    "dots1": dict(),
    "step3p5": dict(num_attention_groups=2, moe_num_experts=4, moe_top_k=2, moe_intermediate_size=24,
                    share_expert_dim=24),
    **{t: dict(attention_method="MLA", zero_expert_type="identity", ffn_hidden_size=48, moe_topk=2,
                          expert_ffn_hidden_size=24, zero_expert_num=1, mla_scale_q_lora=True,
                          mla_scale_kv_lora=True, ngram_vocab_size_ratio=2, emb_neighbor_num=2, emb_split_num=2)
       for t in ("longcat_flash", "longcat_flash_ngram")},
    "baichuan_m1": dict(sliding_window_layers=[0], conv_window=2),
    "apertus": dict(post_norm=False),
    "qwen3_5": dict(full_attention_interval=2),
    "hunyuan": dict(moe_topk=2, num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=False,
                    cla_share_factor=1, rope_scaling=dict(alpha=1.0, factor=1.0, type="dynamic")),
    **{t: dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.1,
                                    original_max_position_embeddings=128)) for t in ("ministral3", "mistral4")},
    "minicpm3": dict(dim_model_base=32, scale_depth=1.4, scale_emb=12,
                     rope_scaling=dict(original_max_position_embeddings=128)),
    "gpt_bigcode": dict(n_inner=48),
    "gemma3n": dict(num_kv_shared_layers=0, vocab_size_per_layer_input=64, rope_local_base_freq=10000.0,
                    activation_sparsity_pattern=[0.0, 0.0], hidden_size_per_layer_input=8, altup_num_inputs=2,
                    altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0, laurel_rank=8),
    "minimax_m3_vl": dict(moe_layer_freq=[1, 1]),
    "stablelm": dict(use_qkv_bias=False),
    "plamo": dict(n_shared_head=2),
    "afm7": dict(hidden_dim=32, num_kv_reuse_layers=1, num_heads=4, num_kv_heads=2),
    **{t: dict(layer_group_size=2, group_norm_size=1) for t in ("bailing_moe_linear", "bailing_hybrid")},
    "exaone_moe": dict(is_moe_layer=[False, True]),
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2,
                  mamba_d_conv=4, mamba_d_state=8, mamba_expand=2),
    "lille-130m": dict(block_size=128, n_kv_heads=2, n_embd=64),  # its MLP width rounds 8/3·n_embd to 256s
    **{t: dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
               linear_conv_kernel_dim=4, linear_allow_neg_eigval=False, full_attention_interval=2,
               layer_types=["linear_attention", "full_attention"]) for t in ("olmo_hybrid", "qwen3_next")},
    "openelm": dict(num_transformer_layers=2, model_dim=32, ffn_dim_divisor=16, num_query_heads=[4, 4],
                    num_kv_heads=[2, 2], ffn_multipliers=[1.5, 1.5]),
    # phi3small and recurrent_gemma build but are not tested (docs/ARCHITECTURE.md says why)
    "phi3small": dict(dense_attention_every_n_layers=2, ff_intermediate_size=48, gegelu_limit=20.0),
    "recurrent_gemma": dict(conv1d_width=4, logits_soft_cap=30.0, attention_window_size=64,
                            block_types=["recurrent", "attention"]),
    "rwkv7": dict(a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8, decay_low_rank_dim=8),
    **{t: dict(rope_parameters={lt: dict(rope_type="default", rope_theta=10000.0)
                                for lt in ("sliding_attention", "full_attention")}) for t in ("mellum", "spark2_5")},
    "phixtral": dict(num_vocab=64, model_dim=32, num_heads=4, num_layers=2, rotary_dim=4),
    "glm_moe_dsa": dict(index_head_dim=8, index_n_heads=2, index_topk=4, topk_method="noaux_tc",
                        scoring_func="sigmoid", rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mimo_v2_flash": dict(hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 1], add_swa_attention_sink_bias=False,
                          add_full_attention_sink_bias=False, sliding_window_size=64, topk_method="noaux_tc",
                          scoring_func="sigmoid", layernorm_epsilon=1e-5, swa_rope_theta=10000.0,
                          swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, swa_v_head_dim=8),
    "nemotron-nas": dict(block_configs=[dict(attention=dict(n_heads_in_group=2), ffn=dict(ffn_mult=1.5))] * 2),
    "kimi_k3": dict(linear_attn_config=dict(kda_layers=[1], num_heads=4, head_dim=8, short_conv_kernel_size=4),
                    num_experts_per_token=2),
    **{t: dict(num_kv_shared_layers=0, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8)
       for t in ("gemma4_text", "gemma4")},
}
# VL wrappers: model_type -> the text model type their `text_config` holds (itself: their own text class)
TEXT_MODEL = {"mistral3": "ministral3", "pixtral": "llama", "gemma3": "gemma3_text", "qwen3_vl_moe": "qwen3_moe",
              "lfm2-vl": "lfm2", "llama4": "llama4", "kimi_vl": "deepseek_v3", "kimi_k25": "deepseek_v3",
              "gemma3n": "gemma3n", "minimax_m3_vl": "minimax_m3_vl",
              "gemma4": "gemma4_text"}
TOKENS = mx.array([[1, 5, 9, 12, 40, 7, 3, 30, 2, 8, 13, 21, 34, 55, 6, 11] * 3])


def tiny_config(model_type: str) -> dict:
    config = dict(TINY, **OVERRIDES.get(model_type, {}), model_type=model_type)
    if model_type in TEXT_MODEL:
        text = TEXT_MODEL[model_type]
        config["text_config"] = dict(TINY, **OVERRIDES.get(text, {}), model_type=text)
    return config


def tiny(model_type: str, seed: int = 0) -> nn.Module:
    config = tiny_config(model_type)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    if model_type == "talkie":  # its head is a bare array mlx-lm allocates as zeros for the checkpoint
        model.lm_head = 0.1 * mx.random.normal(model.lm_head.shape)
    model.eval()
    mx.eval(model.parameters())
    return model


def copy_of(model_type: str, params) -> nn.Module:
    """A fresh model of `model_type` holding the base weights `params` (seeded otherwise)."""
    fresh = tiny(model_type, seed=99)
    fresh.load_weights(params)
    return fresh


def expected_count(model, paths, rank, k):
    """Σ_modules (experts) Σ_k r_k (in_k + out_k), from the base weight shapes."""
    modules = dict(model.named_modules())
    total = 0
    for p in paths:
        m = modules[p]
        d_out, d_in = m.weight.shape[-2:]
        experts = m.weight.shape[0] if isinstance(m, SwitchLinear) else 1
        sizes = [np.array_split(np.arange(n), k) for n in (rank, d_in, d_out)]
        total += experts * sum(len(r) * (len(i) + len(o)) for r, i, o in zip(*sizes))
    return total


def randomize_b(model, seed=1):
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [0.5 * mx.random.normal(b.shape) for b in layer.smoa_b]


@pytest.mark.parametrize("model_type", sorted(EXPECTED) + sorted(HYBRID))
def test_architecture(model_type, tmp_path):
    model = tiny(model_type)
    n = len(model.layers)
    base = model(TOKENS)
    params = tree_flatten(model.parameters())
    per_layer = HYBRID.get(model_type) or [EXPECTED[model_type]] * n
    want = {f"{layer}.{name}" for layer, names in zip(_layer_paths(model), per_layer) for name in names}
    count = expected_count(model, want, 4, 2)
    summary = apply_smoa(model, rank=4, num_blocks=2, alpha=8.0, progress=False)
    assert set(smoa_layers(model)) == want and len(want) == sum(map(len, per_layer))
    assert summary["trainable"] == count
    assert summary["trainable"] == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert mx.array_equal(model(TOKENS), base).item()  # B = 0: exactly the base

    randomize_b(model)
    adapted = model(TOKENS)
    assert not np.allclose(np.array(adapted), np.array(base), atol=1e-3)

    save_adapter(model, tmp_path / "adapter")
    loaded = copy_of(model_type, params)
    load_adapter(loaded, tmp_path / "adapter")
    assert mx.array_equal(loaded(TOKENS), adapted).item()

    assert fuse_layers(loaded) == len(want)
    np.testing.assert_allclose(np.array(loaded(TOKENS)), np.array(adapted), rtol=1e-4, atol=1e-4)


def _layer_paths(model):
    """Decoder layer paths in layer order."""
    layers = decoder_layers(model)
    return sorted(layers, key=layers.get)


def train_losses(model, optimizer, steps: int = 6) -> list[float]:
    """Next-token loss on TOKENS before each of `steps` optimizer updates (model in train mode)."""
    model.train()
    step = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(TOKENS[:, :-1]), TOKENS[:, 1:]).mean())
    losses = []
    for _ in range(steps):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses


# Types no gradient can be taken through in mlx-lm 0.32 (mlx-lm's LoRA fails the same way), so
# their adapters are inference-only: deepseek_v41's sparse indexer takes top-k positions without
# stop_gradient (a VJP error); rwkv7's backward gives NaN.
UNTRAINABLE = {"deepseek_v41", "rwkv7"}


@pytest.mark.parametrize("model_type", sorted((set(EXPECTED) | set(HYBRID)) - UNTRAINABLE))
def test_training_steps_lower_the_loss(model_type):
    model = tiny(model_type)
    apply_smoa(model, rank=4, num_blocks=2, progress=False)
    losses = train_losses(model, optim.Adam(learning_rate=3e-2))
    assert losses[-1] < losses[0] - 0.05, losses
    names = {n for n, _ in tree_flatten(model.trainable_parameters())}
    assert names and all(".smoa_a." in n or ".smoa_b." in n for n in names)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama"])
def test_num_layers_counts_decoder_layers_whatever_their_name(model_type):
    model = tiny(model_type)
    last = next(p for p, m in model.named_modules() if m is model.layers[-1])
    paths = target_paths(model, num_layers=1)
    assert paths and all(p.startswith(last + ".") for p in paths)
    assert {layer_relative(p) for p in paths} == set(EXPECTED[model_type])


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "internlm2", "qwen3_moe"])
def test_all_linear_is_every_linear_layer_but_the_head(model_type):
    model = tiny(model_type)
    paths = target_paths(model, "all-linear")
    every = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, SwitchLinear))]
    heads = set(every) - set(paths)
    assert len(heads) == 1 and next(iter(heads)).rsplit(".", 1)[-1] in ("lm_head", "embed_out", "output")
    if model_type == "qwen3_moe":  # routers and experts are linear layers too
        assert "model.layers.0.mlp.gate" in paths and "model.layers.0.mlp.switch_mlp.gate_proj" in paths
    assert target_paths(model, ["all-linear"]) == paths


def test_a_vl_wrapper_without_a_row_takes_its_text_models_row():
    """mistral3 over a mistral4 (multi-head latent attention) text model: mistral4's row."""
    config = dict(tiny_config("mistral3"), text_config=tiny_config("mistral4"))
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    assert {layer_relative(p) for p in target_paths(model)} == set(EXPECTED["mistral4"])


def test_defaults_skip_names_a_model_lacks_but_explicit_targets_are_strict():
    model = tiny("deepseek_v3")  # multi-head latent attention: no q_proj/k_proj/v_proj
    assert {layer_relative(p) for p in target_paths(model)} == set(EXPECTED["deepseek_v3"])
    with pytest.raises(ConfigError, match=r"unknown target module\(s\) \['q_proj'\]"):
        target_paths(model, ["q_proj", "up_proj"])


def test_a_linear_subclass_with_its_own_call_is_not_adaptable():
    model = tiny("afm7")  # FusedLinear(nn.Linear) returns (q, k, v)
    with pytest.raises(ConfigError, match=r"unknown target module\(s\) \['qkv_proj'\]"):
        target_paths(model, ["qkv_proj"])
    assert not any(p.endswith("qkv_proj") for p in target_paths(model, "all-linear"))


class _Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.mixer = layer


class _Stack(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = [_Block(layer)]


def test_defaults_that_adapt_nothing_in_a_layer_or_no_linear_layers_are_errors():
    with pytest.raises(ModelError, match=r"adapt nothing in decoder layer\(s\) \[0\]; .*mixer"):
        target_paths(_Stack(nn.Linear(8, 8)))
    with pytest.raises(ModelError, match="no linear layers SMoA can adapt"):
        target_paths(_Stack(nn.Conv1d(8, 8, 1)))


def test_unknown_layout_is_an_error():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(ModelError, match="no `layers`"):
        target_paths(Flat(), ["proj"])


HF_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, head_dim=8, max_position_embeddings=128,
                moe_intermediate_size=24, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                shared_expert_intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Gemma 3: a sliding then a global layer (mlx-lm reads sliding_window_pattern, transformers layer_types).
GEMMA3_TEXT = dict(layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)
GEMMA3_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     image_size=28, patch_size=14)


# per type: what a hub config of that type sets and the generic tiny one lacks
HF_EXTRA = {"phi": dict(partial_rotary_factor=0.5), "gemma3_text": GEMMA3_TEXT}


def hf_model_dir(model_type, root):
    """A tiny random transformers model saved as a hub checkpoint, with a tokenizer."""
    import json

    import torch
    import transformers

    from smoa_mlx.synthetic import make_tokenizer

    tied = model_type.startswith("gemma") or model_type == "cohere"
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration: a tiny SigLIP tower beside the text model
        config = transformers.Gemma3Config(
            text_config=dict(HF_SMALL, **GEMMA3_TEXT), vision_config=GEMMA3_VISION, mm_tokens_per_image=4,
            image_token_index=5, boi_token_index=6, eoi_token_index=7, tie_word_embeddings=True)
    else:
        config = transformers.AutoConfig.for_model(
            model_type, tie_word_embeddings=tied, **HF_SMALL, **HF_EXTRA.get(model_type, {}))
    torch.manual_seed(0)
    path = root / model_type
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())  # fields hub configs (and mlx-lm) have
    text = saved.get("text_config", saved)
    rope = text.get("rope_parameters") or {}
    if "full_attention" in rope:  # gemma3: one rope base per attention type, as hub configs spell them
        text.update(rope_theta=rope["full_attention"]["rope_theta"],
                    rope_local_base_freq=rope["sliding_attention"]["rope_theta"], sliding_window_pattern=2)
    text.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if model_type == "gemma3":
        saved["vocab_size"] = text["vocab_size"]  # mlx-lm's gemma3 reads it here (default: Gemma 3's 262208)
    text.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    text.setdefault("rope_scaling", None)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        saved.setdefault("num_experts", saved["num_local_experts"])
    (path / "config.json").write_text(json.dumps(saved))
    make_tokenizer(path)
    return path


HF_TYPES = ["gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "starcoder2", "olmo2", "cohere", "glm4", "phi",
            "granite", "smollm3", "seed_oss"]
HF_MOE_TYPES = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"]


@pytest.mark.parametrize("model_type", HF_TYPES + HF_MOE_TYPES)
def test_fuse_hf_loads_in_transformers_with_the_adapted_logits(model_type, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from smoa_mlx.fuse import fuse
    from smoa_mlx.loader import load_base

    base_dir = hf_model_dir(model_type, tmp_path)
    model = load_base(str(base_dir))[0]
    apply_smoa(model, rank=4, num_blocks=2, progress=False)
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter")
    tokens = TOKENS % 320
    adapted = np.array(model(tokens))
    fuse(str(base_dir), tmp_path / "adapter", tmp_path / "fused", hf=True, log=lambda *_: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        logits = hf(torch.tensor(np.array(tokens))).logits.numpy()
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base = base_hf(torch.tensor(np.array(tokens))).logits.numpy()
    assert np.abs(adapted - base).max() > 1e-3  # the adapter moves the logits
    np.testing.assert_allclose(logits, adapted, rtol=1e-4, atol=1e-4)
    assert type(hf) is type(base_hf)  # gemma3: Gemma3ForConditionalGeneration, vision tower included
    fused, untouched = hf.state_dict(), base_hf.state_dict()
    assert fused.keys() == untouched.keys()
    vision = [k for k in fused if "vision_tower" in k or "multi_modal_projector" in k]
    assert bool(vision) == (model_type == "gemma3")
    assert all(torch.equal(fused[k], untouched[k]) for k in vision)


def test_fuse_hf_refuses_an_unchecked_architecture(tmp_path):
    from smoa_mlx.archs import check_hf_fuse

    with pytest.raises(ModelError, match="model type 'gpt2': fuse --hf writes only"):
        check_hf_fuse("gpt2")


@pytest.mark.parametrize("damage", ["no vision tower", "MLX layout"])
def test_fuse_hf_of_gemma3_needs_the_vision_tower_as_transformers_stores_it(damage, tmp_path):
    """The vision tower is not in mlx-lm's model; fuse --hf copies it from the base checkpoint."""
    pytest.importorskip("transformers")
    from smoa_mlx.fuse import fuse
    from smoa_mlx.loader import load_base

    base_dir = hf_model_dir("gemma3", tmp_path)
    weights = mx.load(str(base_dir / "model.safetensors"))
    key = "vision_tower.embeddings.patch_embedding.weight"
    if damage == "no vision tower":  # e.g. a text-only conversion, which mlx-lm loads all the same
        weights = {k: v for k, v in weights.items() if not k.startswith("vision_tower.")}
        match = r"no vision_tower\.\* tensors"
    else:  # an mlx-vlm conversion: convolutions channels-last
        weights[key] = weights[key].transpose(0, 2, 3, 1)
        match = f"tensor {key} is in MLX's layout"
    mx.save_safetensors(str(base_dir / "model.safetensors"), weights, {"format": "pt"})
    model = load_base(str(base_dir))[0]
    apply_smoa(model, rank=4, num_blocks=2, progress=False)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ModelError, match=match):
        fuse(str(base_dir), tmp_path / "adapter", tmp_path / "fused", hf=True, log=lambda *_: None)
    assert not (tmp_path / "fused").exists()


def test_quantized_moe_model_trains_saves_and_fuses(tmp_path, arith):
    """Model level, through the trainer and fuse: a 4-bit qwen3_moe directory whose experts
    are QuantizedSwitchLinear (layer-level checks are in test_switch.py)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import quantize_model, save_config, save_model
    from test_train import opts
    from test_train import train_losses as logged_losses

    import smoa_mlx
    from smoa_mlx.fuse import fuse
    from smoa_mlx.switch import SMoASwitchLinear
    from smoa_mlx.synthetic import make_tokenizer
    from smoa_mlx.train import train

    base = tmp_path / "base"
    base.mkdir()
    config = dict(TINY, model_type="qwen3_moe", hidden_size=64, head_dim=16, moe_intermediate_size=32,
                  intermediate_size=64, vocab_size=make_tokenizer(base))
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model, config = quantize_model(model_class(args_class.from_dict(config)), config, group_size=32, bits=4)
    save_model(base, model)
    save_config(config, base / "config.json")

    out = tmp_path / "adapter"
    train(opts(base, arith, out, iters=8, learning_rate=3e-2))
    losses = logged_losses(out)
    assert losses[max(losses)] < losses[min(losses)] - 0.05, losses

    adapted, tokenizer = smoa_mlx.load(str(base), str(out))
    experts = [m for m in smoa_layers(adapted).values() if isinstance(m, SMoASwitchLinear)]
    assert experts and all(isinstance(m.linear, QuantizedSwitchLinear) for m in experts)
    tokens = mx.array([tokenizer.encode("Question: what is 2 plus 3? Answer: The answer is 5.")])
    want = np.array(adapted(tokens))
    before = np.array(smoa_mlx.load(str(base))[0](tokens))
    for dequantize in (True, False):
        fused_dir = fuse(str(base), out, tmp_path / f"fused{dequantize}", dequantize=dequantize, log=lambda *_: None)
        fused, _ = smoa_mlx.load(str(fused_dir))
        assert not smoa_layers(fused)
        assert any(isinstance(m, QuantizedSwitchLinear) for _, m in fused.named_modules()) != dequantize
        got = np.array(fused(tokens))
        # de-quantized: the merged float weights; re-quantized: 4-bit rounding of them (measured
        # 0.13 relative error) against an adapter that moves the logits by 0.92 relative
        assert rel(got, want) < (1e-5 if dequantize else 0.25 * rel(before, want))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
