"""Tiny HuggingFace transformers MoE models, built from configs in code with random weights.

One table, `ARCHITECTURES`, names every MoE architecture moe_fx is tested on. The tests, the demo,
`python -m moe_fx inspect --hf NAME` and the supported-models list in the docs all read it.
Nothing is downloaded: each model is `cls(config)` with random weights (biases a fresh init leaves at
zero, such as DeepSeek-V3's `e_score_correction_bias`, get random values). `example_inputs(model, T)`
gives the keyword inputs of one forward (decoder inputs too, for the encoder-decoder models).

Experts implementations (transformers 5.x, `@use_experts_implementation`): `grouped_mm` (the default)
and `batched_mm` reach Dynamo whole and are matched as they are. `eager` is a loop over `nonzero()`
that Dynamo cannot hold in one graph; while moe_fx captures (torch.compile with backend="moe_fx",
`apply`, `explain`), Dynamo traces it as HF's own `batched_mm` instead (`moe_fx.capture.hf_experts`), and the
model's setting is untouched. Architectures without the decorator have one form each.

transformers 4.57 (the last 4.x line, tested by `.ci/transformers457` on TRANSFORMERS_4): experts there are
`nn.ModuleList`s of per-expert MLPs (or stacked parameters) run by Python code, with no implementation to
select. The static `range(E)` loops (OLMoE, FlexOlmo), `.tolist()` + `split` (Granite, JetMoE) and the dense
bmm (Llama4) are captured whole under moe_fx's capture flags and rewritten (per-expert weights are stacked
once). The `for e in expert_hit` loops over `nonzero()` (Mixtral, Qwen2/3-MoE) and the loop with a
data-dependent `if` (DeepSeek-V3), and GPT-OSS's on the CPU, graph-break: `apply` captures them as loops over
every expert and rewrites them once they agree with the original forward (`moe_fx.capture.hit_loops`), `torch.compile`
leaves them untouched (`apply_only_4x`).

Architectures added with transformers 5.x are `shrink=True` entries: the config's defaults shrunk by TINY.
Multimodal ones are built as their MoE text model (`logits` then reads its last hidden state); an
architecture the installed transformers lacks is `missing` (the tests skip it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# Sizes every tiny decoder-only model shares; an architecture's own entries override them.
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# Multi-head latent attention (DeepSeek-V2/V3, LongCat) at tiny sizes.
MLA = dict(
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    head_dim=8,
)
# Multi-head latent attention sizes for a `shrink=True` entry (TINY has the latent ranks).
MLA_SIZES = dict(num_key_value_heads=4, head_dim=8)
# `Architecture(shrink=True)`: the config's own defaults, shrunk. Configs name the same size differently, so
# each entry here applies where the config has the field; per-layer lists (`layer_types`, ...) are cut to the
# first layers, and `mlp_layer_types` to the kind of the last layer (the MoE one: dense layers come first).
TINY = dict(
    COMMON,
    head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=48,
    shared_experts_intermediate_size=48,
    shared_intermediate_size=48,
    num_experts=8,
    n_routed_experts=8,
    num_local_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    moe_topk=2,
    moe_k=2,
    top_k_experts=2,
    first_k_dense_replace=0,
    num_dense_layers=0,
    n_group=4,
    topk_group=2,
    num_expert_group=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    index_topk=16,
    index_head_dim=16,
    index_n_heads=2,
    index_num_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_head_dim=16,
    linear_num_heads=4,
    sliding_window=16,
    unpadded_vocab_size=128,
    mlp_only_layers=[],
    decoder_sparse_step=1,
    num_nextn_predict_layers=0,
    use_cache=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class Architecture:
    """How to build one tiny model: the config and model class names in `transformers`, and overrides.

    `common`: whether COMMON applies (False for models whose configs name sizes differently).
    `moe_blocks`: MoE blocks the tiny model holds (all must be rewritten).
    `notes`: what moe_fx does with the architecture (shown in the user guide).
    `refused`: why moe_fx leaves its MoE blocks untouched (empty: every block is rewritten).
    `shrink`: start from the config's defaults shrunk by TINY (then `overrides`), not from COMMON.
    `apply_only_4x`: why only `apply` rewrites the transformers 4.57 form (`torch.compile` leaves it untouched).
    """

    config: str
    model: str
    overrides: dict = field(default_factory=dict)
    moe_blocks: int = 1
    notes: str = ""
    common: bool = True
    refused: str = ""
    shrink: bool = False
    apply_only_4x: str = ""


# transformers 4.57's experts loops: over the experts hit (Mixtral, Qwen2/3-MoE), or over every expert skipping the
# empty ones (DeepSeek-V3)
LOOP_4X = (
    "the transformers 4.57 block loops {}: `apply` captures it as a loop over every expert "
    "and rewrites it once it agrees with the original forward on probes where most experts get no token "
    '(`moe_fx.capture.hit_loops`); `torch.compile(backend="moe_fx")` leaves it untouched (Dynamo graph-breaks at the '
    "data-dependent loop)"
)
HIT_LOOP_4X = LOOP_4X.format("over the experts hit (`for e in expert_hit`, from `nonzero()`)")

# HY-V4, DeepSeek-V4, GLM-5-Next: experts whose SwiGLU clamps at swiglu_limit
CLAMPED_SILU = (
    "clamped SiLU-gated experts, silu(clamp(gate, max=swiglu_limit)) · clamp(up, ±swiglu_limit) "
    "(clamped_silu_gated; identified on probes past the limit)"
)

ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_hidden_layers=2, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
        moe_blocks=2,
        notes="softmax → top-k → renormalise; SiLU-gated experts",
        apply_only_4x=HIT_LOOP_4X,
    ),
    "qwen2_moe": Architecture(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=96,
        ),
        notes="shared expert with a sigmoid gate, left as ordinary nodes",
        apply_only_4x=HIT_LOOP_4X,
    ),
    "qwen3_moe": Architecture(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
        notes="softmax → top-k → renormalise",
        apply_only_4x=HIT_LOOP_4X,
    ),
    "qwen3_next": Architecture(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            moe_intermediate_size=48,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=16,
            layer_types=["full_attention"],
        ),
        notes="shared expert with a sigmoid gate, left as ordinary nodes",
    ),
    "olmoe": Architecture(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2),
        notes="softmax → top-k, not renormalised",
    ),
    "flex_olmo": Architecture(
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2, pad_token_id=1),
        notes="softmax → top-k, not renormalised",
    ),
    "deepseek_v2": Architecture(
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            MLA,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=0,
            intermediate_size=96,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.0,
        ),
        notes="softmax, group-limited greedy top-k (group score = max), × routed_scaling_factor; shared experts "
        "left as ordinary nodes",
    ),
    "deepseek_v3": Architecture(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            MLA,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=0,
            intermediate_size=96,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),
        notes="sigmoid + e_score_correction_bias, group-limited top-k (group score = top-2 sum), unbiased "
        "weights, renormalise, × routed_scaling_factor",
        apply_only_4x=LOOP_4X.format("over every expert, skipping those without tokens (`if tokens.numel() > 0`)"),
    ),
    "glm4_moe": Architecture(
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=0,
            intermediate_size=96,
            n_group=1,
            topk_group=1,
            head_dim=16,
        ),
        notes="DeepSeek-V3 router (sigmoid + correction bias), no groups",
    ),
    "dots1": Architecture(
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=0,
            intermediate_size=96,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            head_dim=16,
        ),
        notes="DeepSeek-V3 router (sigmoid + correction bias)",
    ),
    "longcat_flash": Architecture(
        "LongcatFlashConfig",
        "LongcatFlashForCausalLM",
        dict(
            MLA,
            num_hidden_layers=2,  # LongCat derives num_hidden_layers = 2 * num_layers: one decoder layer
            ffn_hidden_size=96,
            expert_ffn_hidden_size=48,
            n_routed_experts=8,
            zero_expert_num=4,
            moe_topk=2,
        ),
        notes="zero-computation experts: the router picks among 8 routed + 4 identity experts (ids >= "
        "n_routed_experts return the token times its weight), `identity_experts` in the spec (dropped picks for "
        "the ops, the tokens added back after combine); gate_up_proj holds all 12, its first 8 are used; the "
        "experts loop (`nonzero()`, `.item()`) is captured as one `opaque_experts` op; router softmax, "
        "+ correction bias for the selection, unbiased weights × routed_scaling_factor",
    ),
    "gpt_oss": Architecture(
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=48,
            head_dim=16,
            layer_types=["full_attention"],
        ),
        notes="router bias, top-k → softmax; transposed [E, D, 2F] interleaved gate/up with biases, clamped SwiGLU",
        apply_only_4x=LOOP_4X.format(
            "on the CPU over the experts hit (`for expert_idx in expert_hit[:]`, then `expert_idx[0]`; the dense "
            "bmm path runs on CUDA only), its experts reading the router's dense [T, E] scores "
            "(`zeros_like(logits).scatter_(1, ids, w)`, rebuilt from the ids' sizes so that only the top-k reaches "
            "them)"
        ),
    ),
    "llama4": Architecture(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=48,
            intermediate_size_mlp=96,
            num_local_experts=8,
            num_experts_per_tok=1,
            moe_layers=[0],
            head_dim=16,
            layer_types=["full_attention"],
            attention_chunk_size=64,
        ),
        notes="top-k → sigmoid of the scores scattered into a dense [T, E] tensor of -inf (rewritten first, "
        "exactly, as zeros scattered with sigmoid(top-k)); the weight multiplies the expert's input; dense bmm "
        "over all experts; the shared MLP is left as is",
    ),
    "granitemoe": Architecture(
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
        notes="top-k on the logits → softmax",
    ),
    "granitemoeshared": Architecture(
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48),
        notes="top-k on the logits → softmax; shared MLP left as is",
    ),
    "phimoe": Architecture(
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
        notes="sparsemixer router (two masked top-1 picks, concatenated): no recognised router reproduces it, so it "
        "stays in the graph as an opaque router and the rewrite starts at its concatenated weights and ids",
    ),
    "dbrx": Architecture(
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=64,
            n_heads=4,
            n_layers=1,
            max_seq_len=64,
            vocab_size=128,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2),
        ),
        common=False,
        notes="the experts are a per-expert Python loop over `nonzero()` (no experts implementation to select): "
        "moe_fx captures it as one `opaque_experts` op and identifies it by probing the loop; w1/v1/w2 stored "
        "flat as [E·F, D] are used as [E, F, D] views (separate gate/up, w2 transposed); router softmax → "
        "top-k → L1 renormalise (transformers 5.23 also needs `rope_theta` and `clip_qkv` in `attn_config` to "
        "build)",
    ),
    "jetmoe": Architecture(
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, kv_channels=16),
        notes="top-k on the logits → softmax (the `.tolist()` + `split` experts); the mixture-of-attention "
        "router in self-attention is found and refused (its experts are attention heads, not an MLP)",
    ),
    "ernie4_5_moe": Architecture(
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            moe_intermediate_size=48,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
            intermediate_size=96,
            moe_layer_start_index=0,
            moe_layer_end_index=0,
        ),
        notes="softmax, + e_score_correction_bias ([1, E]) for the selection only, unbiased weights, "
        "renormalised by clamp(sum, 1e-12): recognised as renormalise (a softmax top-k sums to at least K/E, "
        "so the clamp never acts)",
    ),
    "hunyuan_v1_moe": Architecture(
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(intermediate_size=48, num_experts=8, moe_topk=2, head_dim=16),
        notes="softmax → top-k → renormalise; shared MLP left as is",
    ),
    "minimax": Architecture(
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["full_attention"],
        ),
        notes="softmax → top-k → renormalise",
    ),
    "minimax_m2": Architecture(
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
        notes="sigmoid + correction bias → top-k → renormalise",
    ),
    "jamba": Architecture(
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=1,
            attn_layer_offset=0,
            use_mamba_kernels=False,
            mamba_dt_rank=8,
        ),
        notes="softmax → top-k, not renormalised",
    ),
    "lfm2_moe": Architecture(
        "Lfm2MoeConfig",
        "Lfm2MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            num_dense_layers=0,
            layer_types=["full_attention"],
        ),
        notes="sigmoid + expert bias → top-k → renormalise",
    ),
    "nllb_moe": Architecture(
        "NllbMoeConfig",
        "NllbMoeForConditionalGeneration",
        dict(
            vocab_size=128,
            d_model=64,
            encoder_layers=1,
            decoder_layers=1,
            encoder_ffn_dim=96,
            decoder_ffn_dim=96,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            num_experts=4,
            expert_capacity=16,
            moe_eval_capacity_token_fraction=0.25,  # eval capacity ceil(0.25 * T): the example inputs drop picks
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            max_position_embeddings=64,
        ),
        moe_blocks=2,
        common=False,
        refused="transformers 5.x `NllbMoeExperts` one-hot encodes the router's dispatch mask, which is already "
        "one-hot, so only expert modules 0 and 1 ever run (expert 1 on each token's kept first choice, expert 0 "
        "on its kept second choice): no MoESpec routes that way. The loop over `nonzero()` also graph-breaks, "
        "so no graph holds the block; left untouched. The capacity rule itself (first choices first, then "
        "token order) is `RouterSpec.capacity`",
    ),
    "switch_transformers": Architecture(
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        dict(
            vocab_size=128,
            d_model=64,
            d_kv=16,
            d_ff=96,
            num_layers=1,
            num_decoder_layers=1,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            num_heads=4,
            num_experts=4,
            expert_capacity=2,  # per sequence: the example inputs (7 tokens a sequence) drop tokens
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            router_jitter_noise=0.0,
        ),
        moe_blocks=2,
        common=False,
        refused="the experts are a Python loop over the experts hit (`nonzero()`) that picks each expert's "
        "module by the tensor's value (`self[f'expert_{i}']`): Dynamo graph-breaks inside it, so no graph holds "
        "the block; left untouched. Its routing is expressible (argmax top-1, capacity counted per sequence in "
        "token order: `RouterSpec(k=1, capacity=expert_capacity)` on [batch, seq, E] logits; a dropped token's "
        "MoE output is zero in 5.x), but the matcher anchors on top-k and does not read an argmax one-hot "
        "dispatch mask",
    ),
    # Architectures added from transformers 5.x, sized by TINY (`shrink=True`)
    "afmoe": Architecture(
        "AfmoeConfig",
        "AfmoeForCausalLM",
        {},
        shrink=True,
        notes="sigmoid + expert bias → top-k → renormalise; the shared experts read the same flattened tokens "
        "(left as is)",
    ),
    "aria": Architecture(
        "AriaTextConfig",
        "AriaTextForCausalLM",
        {},
        shrink=True,
        notes="top-k on the logits → softmax; shared MLP left as is",
    ),
    "axk1": Architecture(
        "AXK1Config",
        "AXK1ForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor)",
    ),
    "axk2": Architecture(
        "AXK2Config",
        "AXK2ForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor); the DSA indexer's top-k is not an MoE",
    ),
    "bailing_hybrid": Architecture(
        "BailingHybridConfig",
        "BailingHybridForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor)",
    ),
    "beam": Architecture(
        "BeamConfig",
        "BeamForCausalLM",
        {},
        shrink=True,
        notes="DeepSeek-V3 router without the scale (sigmoid + correction bias, groups, renormalise)",
    ),
    "cohere2_moe": Architecture(
        "Cohere2MoeConfig", "Cohere2MoeForCausalLM", {}, shrink=True, notes="top-k on the logits → softmax"
    ),
    "deepseek_v32": Architecture(
        "DeepseekV32Config",
        "DeepseekV32ForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor); the DSA indexer's top-k is not an MoE",
    ),
    "deepseek_v4": Architecture(
        "DeepseekV4Config",
        "DeepseekV4ForCausalLM",
        {},
        shrink=True,
        notes="router scored by sqrt(softplus) (+ correction bias → top-k → renormalise → × routed_scaling_factor):"
        " not a recognised router, kept opaque; " + CLAMPED_SILU + "; the clamped shared expert left as is",
    ),
    "deepseek_ocr2": Architecture(
        "DeepseekOcr2TextConfig",
        "DeepseekOcr2TextModel",
        dict(n_group=1, topk_group=1, mlp_layer_types=["sparse"]),
        shrink=True,
        notes="softmax → top-k (greedy), not renormalised; shared experts left as is (MoE text tower)",
    ),
    "diffusion_gemma": Architecture(
        "DiffusionGemmaTextConfig",
        "DiffusionGemmaEncoderTextModel",
        {},
        shrink=True,
        notes="the experts read the tokens through their own pre-norm (found apart from the router's input); "
        "router with a per-expert scale kept opaque; GELU-tanh gated experts",
    ),
    "doge": Architecture(
        "DogeConfig",
        "DogeForCausalLM",
        dict(is_moe=True, num_experts=16, num_experts_per_tok=4),
        shrink=True,
        refused="CDMoE: the experts are single-neuron embeddings (down_embed/up_embed, [E, D]) picked by a "
        "product-key top-k over √E × √E sub-keys; no top-k over [T, E] router logits, nothing MoESpec's "
        "experts express; left untouched",
    ),
    "dots3_note": Architecture(
        "Dots3NoteTextConfig",
        "Dots3NoteForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router without the scale (sigmoid + correction bias, groups, renormalise)",
    ),
    "ergo": Architecture(
        "ErgoConfig",
        "ErgoForCausalLM",
        {},
        shrink=True,
        refused="each route's expert output goes through that expert's own RMSNorm (post_expert_norm, [E, D]) "
        "before the weighted sum: not in MoESpec (no expert layout takes the norm's [E, D] weight); left "
        "untouched (the experts themselves, non-gated squared-ReLU, are relu2; router: sigmoid + correction "
        "bias → top-k → renormalise → × moe_routed_scaling_factor; a shared expert with its own norm)",
    ),
    "ernie4_5_vl_moe": Architecture(
        "Ernie4_5_VLMoeTextConfig",
        "Ernie4_5_VLMoeTextModel",
        dict(
            moe_intermediate_size=[48, 32],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2]),
        ),
        shrink=True,
        notes="text experts of the modality-isolated block (text tokens only here): softmax, + correction bias"
        " for the selection, renormalised",
    ),
    "exaone_moe": Architecture(
        "ExaoneMoeConfig",
        "ExaoneMoeForCausalLM",
        {},
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor)",
    ),
    "flint": Architecture("FlintConfig", "FlintForCausalLM", {}, shrink=True, notes="sigmoid → top-k → renormalise"),
    "gemma4": Architecture(
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        dict(enable_moe_block=True),
        shrink=True,
        notes="MoE beside a dense MLP; the experts read the tokens through their own pre-norm (found apart "
        "from the router's input); router with a per-expert scale kept opaque; GELU-tanh gated experts",
    ),
    "glm4_moe_lite": Architecture(
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor)",
    ),
    "glm4v_moe": Architecture(
        "Glm4vMoeTextConfig",
        "Glm4vMoeTextModel",
        dict(
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], partial_rotary_factor=1.0
            )
        ),
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor) (MoE text tower)",
    ),
    "glm5_next": Architecture(
        "Glm5NextTextConfig",
        "Glm5NextTextModel",
        dict(MLA_SIZES, qk_rope_head_dim=0, head_dim=0),
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor); " + CLAMPED_SILU + " (MoE text tower)",
    ),
    "glm_moe_dsa": Architecture(
        "GlmMoeDsaConfig",
        "GlmMoeDsaForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor); the DSA indexer's top-k is not an MoE",
    ),
    "granitemoe_swa": Architecture(
        "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", {}, shrink=True, notes="top-k on the logits → softmax"
    ),
    "granitemoehybrid": Architecture(
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(layer_types=["attention"]),
        shrink=True,
        notes="top-k on the logits → softmax; shared MLP left as is",
    ),
    "hy_v3": Architecture(
        "HYV3Config",
        "HYV3ForCausalLM",
        {},
        shrink=True,
        notes="sigmoid + correction bias → top-k → renormalise → × router_scaling_factor",
    ),
    "hy_v4": Architecture(
        "HYV4Config",
        "HYV4ForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="sigmoid + correction bias → group-limited top-k → renormalise → × router_scaling_factor; "
        + CLAMPED_SILU,
    ),
    "hy_v4_vl": Architecture(
        "HYV4VLTextConfig",
        "HYV4VLTextModel",
        # mrope_section sums to qk_rope_head_dim // 2 (TINY's qk_rope_head_dim is 8)
        dict(MLA_SIZES, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
        shrink=True,
        notes="HY-V4's block (MoE text tower): sigmoid + correction bias → group-limited top-k → renormalise → × "
        "router_scaling_factor; " + CLAMPED_SILU,
    ),
    "inkling": Architecture(
        "InklingTextConfig",
        "InklingForCausalLM",
        {},
        shrink=True,
        refused="the router's logits are [T, E + n_shared] and the top-k runs on the routed slice [..., :E], "
        "with the weights normalised over the top-k and the shared logits together: no [E, D] router "
        "linear feeds the top-k, so no block is anchored; left untouched",
    ),
    "inkling2": Architecture(
        "Inkling2TextConfig",
        "Inkling2ForCausalLM",
        {},
        shrink=True,
        refused="the experts soft-cap their gate and up projections (cap · tanh(x / cap)) before the SwiGLU: not"
        " an activation MoESpec has; left untouched",
    ),
    "inkling2_loop": Architecture(
        "Inkling2LoopTextConfig",
        "Inkling2LoopForCausalLM",
        # a second layer, looped: its MoE block runs twice a forward
        dict(
            num_hidden_layers=2,
            n_layers_per_attn_res_block=1,
            loop_layer_index_start=1,
            loop_layer_index_end=2,
            loop_num_passes=2,
        ),
        moe_blocks=2,
        shrink=True,
        refused="Inkling-2's experts: cap_g·tanh(gate / cap_g) · sigmoid(gate) · cap_u·tanh(up / cap_u) (the "
        "SwiGLU's linear gate factor and up soft-capped, mlp_gate_softcap and mlp_up_softcap): not an activation "
        "MoESpec has; left untouched",
    ),
    "kimi_linear": Architecture(
        "KimiLinearConfig",
        "KimiLinearForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, renormalise, × "
        "routed_scaling_factor)",
    ),
    "kolibri1": Architecture(
        "Kolibri1Config",
        "Kolibri1ForCausalLM",
        {},
        shrink=True,
        notes="no recognised router, kept opaque; experts rewritten",
    ),
    "kolibri1_1": Architecture(
        "Kolibri1_1Config",
        "Kolibri1_1ForCausalLM",
        {},
        shrink=True,
        notes="Kolibri-1's block: top-k of the logits + correction bias, then the sigmoid of the picked "
        "(unbiased) logits: no recognised router, kept opaque; experts rewritten",
    ),
    "laguna": Architecture(
        "LagunaConfig", "LagunaForCausalLM", {}, shrink=True, notes="sigmoid + correction bias → top-k → renormalise"
    ),
    "lara_mini": Architecture(
        "LaraMiniConfig",
        "LaraMiniForCausalLM",
        {},
        shrink=True,
        notes="softmax of float32 logits → top-k → renormalise, weights cast to the model dtype; shared expert "
        "added without a gate, left as is",
    ),
    "mellum": Architecture("MellumConfig", "MellumForCausalLM", {}, shrink=True, notes="softmax → top-k → renormalise"),
    "mimo_v2_flash": Architecture(
        "MiMoV2FlashConfig",
        "MiMoV2FlashForCausalLM",
        {},
        shrink=True,
        notes="DeepSeek-V3 router without the scale (sigmoid + correction bias, groups, renormalise)",
    ),
    "minicpm5_moe": Architecture(
        "MiniCPM5MoeConfig",
        "MiniCPM5MoeForCausalLM",
        {},
        shrink=True,
        notes="DeepSeek-V3 router (sigmoid of float32 logits + correction bias, group-limited top-k, renormalise, "
        "× routed_scaling_factor)",
    ),
    "minimax_m3_vl": Architecture(
        "MiniMaxM3VLTextConfig",
        "MiniMaxM3VLForCausalLM",
        {},
        shrink=True,
        notes="sigmoid + correction bias → top-k → renormalise; clamped SwiGLU experts (MoE text tower)",
    ),
    "mistral4": Architecture(
        "Mistral4Config",
        "Mistral4ForCausalLM",
        MLA_SIZES,
        shrink=True,
        notes="softmax, group-limited top-k, renormalise",
    ),
    "mistral_large4": Architecture(
        "MistralLarge4TextConfig",
        "MistralLarge4TextModel",
        MLA_SIZES,
        shrink=True,
        notes="softmax, group-limited top-k, renormalise (MoE text tower)",
    ),
    "muse_spark": Architecture(
        "MuseSparkTextConfig",
        "MuseSparkTextModel",
        dict(moe_hidden_size=48),
        shrink=True,
        refused="a shared projection and norm before the experts (D → moe_hidden_size) and an RMSNorm after each"
        " expert's down projection (has_post_expert_norm): not expressible in MoESpec; left untouched",
    ),
    "nemotron_h": Architecture(
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(layers_block_type=["moe"], use_mamba_kernels=False, moe_shared_expert_intermediate_size=48),
        shrink=True,
        notes="sigmoid + correction bias → (group-limited) top-k → renormalise → × routed_scaling_factor; "
        "non-gated squared-ReLU experts (relu2); the shared expert left as is",
    ),
    "openai_privacy_filter": Architecture(
        "OpenAIPrivacyFilterConfig",
        "OpenAIPrivacyFilterForTokenClassification",
        {},
        shrink=True,
        notes="GPT-OSS-style experts (clamped SwiGLU with biases) in a token classifier; router kept opaque",
    ),
    "qwen3_5_moe": Architecture(
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        {},
        shrink=True,
        notes="softmax → top-k → renormalise; shared expert with a sigmoid gate left as is",
    ),
    "qwen3_omni_moe": Architecture(
        "Qwen3OmniMoeTextConfig",
        "Qwen3OmniMoeThinkerTextModel",
        {},
        shrink=True,
        notes="softmax → top-k → renormalise (the thinker's MoE text tower)",
    ),
    "qwen3_vl_moe": Architecture(
        "Qwen3VLMoeTextConfig",
        "Qwen3VLMoeTextModel",
        {},
        shrink=True,
        notes="softmax → top-k → renormalise (MoE text tower)",
    ),
    "qwen4_exp": Architecture(
        "Qwen4ExpTextConfig",
        "Qwen4ExpForCausalLM",
        {},
        shrink=True,
        notes="softmax → top-k → renormalise; shared expert with a sigmoid gate left as is (the block reads and "
        "writes through hyper-connections)",
    ),
    "solar_open": Architecture(
        "SolarOpenConfig",
        "SolarOpenForCausalLM",
        {},
        shrink=True,
        notes="DeepSeek-V3 router without the scale (sigmoid + correction bias, groups, renormalise)",
    ),
    "step3p7": Architecture(
        "Step3p7TextConfig",
        "Step3p7TextModel",
        {},
        shrink=True,
        notes="the experts are a per-expert Python loop over `nonzero()` with no experts implementation to "
        "select: captured as one `opaque_experts` op and identified by probing the loop; sigmoid router with a "
        "correction bias, renormalised",
    ),
    "unlimited_ocr": Architecture(
        "UnlimitedOcrTextConfig",
        "UnlimitedOcrTextModel",
        {},
        shrink=True,
        notes="softmax → top-k (greedy), not renormalised; shared experts left as is (MoE text tower)",
    ),
    "zaya": Architecture(
        "ZayaConfig",
        "ZayaForCausalLM",
        dict(num_experts_per_tok=1, router_hidden_size=32),
        shrink=True,
        refused="the router is an MLP over a down-projection carrying state across layers, with E + 1 classes (a"
        " skip expert masked to weight 0): the top-k's E + 1 is not the experts' E, so no combine is "
        "found; left untouched",
    ),
}


# The architectures tested on transformers 4.57 (the last 4.x line; `.ci/transformers457`): its forms are
# per-expert `nn.ModuleList`s run by Python loops, the dense bmm of Llama4, the `.tolist()` + split of Granite
# and JetMoE; `apply_only_4x` says which only `apply` rewrites.
TRANSFORMERS_4 = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "deepseek_v3", "gpt_oss", "llama4")
TRANSFORMERS_4 += ("granitemoe", "jetmoe")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ImportError("moe_fx: tiny HuggingFace models need transformers: pip install 'moe_fx[hf]'") from e
    return transformers


def build(name: str, experts_implementation: str | None = "grouped_mm", **overrides) -> nn.Module:
    """A tiny `name` model in eval mode with random weights. `experts_implementation`: grouped_mm |
    batched_mm | eager (None keeps the model's default)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"moe_fx: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    if reason := missing(name):
        raise ValueError(f"moe_fx: {reason}")
    arch = ARCHITECTURES[name]
    transformers = _transformers()
    config_cls = getattr(transformers, arch.config)
    config = config_cls(**{**_config_kwargs(config_cls, arch), **overrides})
    cls = getattr(transformers, arch.model)
    if experts_implementation is not None and has_experts_implementations(name):
        config._experts_implementation = experts_implementation
    model = cls(config).eval()
    _randomize_zero_biases(model)
    return model


def _config_kwargs(config_cls: type, arch: Architecture) -> dict:
    if not arch.shrink:
        return {**(COMMON if arch.common else {}), **arch.overrides}
    defaults = config_cls().to_dict()
    known = set(defaults) | set(inspect.signature(config_cls.__init__).parameters)
    kwargs = {k: v for k, v in TINY.items() if k in known}
    layers = arch.overrides.get("num_hidden_layers", TINY["num_hidden_layers"])
    for k, v in defaults.items():
        if isinstance(v, list) and len(v) == defaults.get("num_hidden_layers"):
            kwargs[k] = [v[-1]] * layers if k == "mlp_layer_types" else v[:layers]
    return {**kwargs, **arch.overrides}


def missing(name: str) -> str:
    """Why the installed transformers cannot build `name` (empty when it can): the architecture is newer."""
    transformers = _transformers()
    arch = ARCHITECTURES[name]
    absent = [c for c in (arch.config, arch.model) if not hasattr(transformers, c)]
    return f"transformers {transformers.__version__} has no {', '.join(absent)}" if absent else ""


def logits(output) -> torch.Tensor:
    """A forward's logits; a text tower with no LM head (the MoE text model of a multimodal architecture)
    gives its last hidden state."""
    found = getattr(output, "logits", None)
    return found if found is not None else output.last_hidden_state


def has_experts_implementations(name: str) -> bool:
    """Whether the architecture's experts use transformers' `@use_experts_implementation` (5.x), so that
    `experts_implementation` selects grouped_mm / batched_mm / eager; other models have one form."""
    cls = getattr(_transformers(), ARCHITECTURES[name].model)
    can_set = getattr(cls, "_can_set_experts_implementation", None)
    return bool(can_set and can_set())


def _randomize_zero_biases(model: nn.Module, seed: int = 0) -> None:
    """Give biases that a fresh init leaves at zero (router correction biases, expert biases) random
    values, so that the tiny models exercise them as a trained checkpoint would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "bias" in name.rsplit(".", 1)[-1] and t.is_floating_point() and not t.any():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def example_inputs(model: nn.Module, T: int = 7, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for one forward of a tiny model: `input_ids` [batch, T] (and `decoder_input_ids`
    [batch, T] for encoder-decoder models), token ids drawn from the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (batch, T), generator=g)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, T), generator=g)
    return inputs
