"""What Megatron-LM's ``args`` and Megatron-Bridge's ``run_config.yaml`` say about Step3.7.

Provider fields as Megatron-Bridge's ``Step37Bridge.provider_bridge`` sets them
(``src/megatron/bridge/models/stepfun/step37_bridge.py:127-290``; dataclass fields of
``Step35ModelProvider``, ``step35_provider.py:188-213``, and ``Step37ModelProvider``,
``step37_provider.py:38-70``). The bridge also sets ``rotary_percents`` and ``swiglu_limits`` as plain
attributes; they are not dataclass fields, so neither Bridge's own run_config.yaml nor ours can carry
them (the recipe supplies them). Megatron-LM's GPT has no per-layer head counts, windows, RoPE bases
or head-wise gates: its ``args`` describe the model-wide values only.
"""

from __future__ import annotations

from ckptconv.core.spec import ModelSpec
from ckptconv.pipeline.training import FamilyTraining

PROVIDER = "megatron.bridge.models.stepfun.step37_provider.Step37ModelProvider"
TEXT_PROVIDER = "megatron.bridge.models.stepfun.step35_provider.Step35ModelProvider"
VISION_CONFIG = "transformers.models.step3p7.configuration_step3p7.Step3p7VisionConfig"


def training(spec: ModelSpec) -> FamilyTraining:
    layers = spec.extra["layer_attention"]
    moe = {}
    if spec.num_experts:
        moe = {
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_topk_scaling_factor": spec.extra["moe_router_scaling_factor"],
        }
    text_fields = {
        "layer_types": [layers[i]["type"] for i in range(spec.num_layers)],
        "rotary_base_per_layer": [float(layers[i]["rope_theta"]) for i in range(spec.num_layers)],
        "head_wise_attn_gate": True,
    }
    sliding = [i for i in range(spec.num_layers) if layers[i]["type"] == "sliding_attention"]
    if sliding:
        geometry = spec.attention(sliding[0])
        text_fields["sliding_attention_setting"] = {
            "window_size": [layers[sliding[0]]["window_size"][0] + 1, 0],  # HF's sliding_window
            "num_attention_heads": geometry.num_attention_heads,
            "num_query_groups": geometry.num_query_groups,
            "kv_channels": geometry.head_dim,
        }
    vision = {k: v for k, v in spec.vision.items() if k != "transformers_version"}
    return FamilyTraining(
        provider_target=PROVIDER,
        language_model_provider_target=TEXT_PROVIDER,
        transformer_fields={
            "layernorm_zero_centered_gamma": True,
            "qk_layernorm": True,
            "softmax_scale": spec.extra["softmax_scale"],
            **moe,
        },
        text_provider_fields=text_fields,
        provider_fields={
            "vision_config": {"_target_": VISION_CONFIG, **vision},
            "image_token_id": spec.image_token_id,
            "projector_bias": bool(spec.extra["projector_bias"]),
        },
        megatron_lm_args={"qk_layernorm": True, "rotary_base": float(layers[0]["rope_theta"])},
    )
