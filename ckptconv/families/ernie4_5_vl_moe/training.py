"""What Megatron-LM's ``args`` and Megatron-Bridge's ``run_config.yaml`` say about ERNIE-4.5-VL-MoE.

Provider fields as Megatron-Bridge's ``Ernie45VLBridge.provider_bridge`` sets them
(``src/megatron/bridge/models/ernie_vl/ernie45_vl_bridge.py:429-497``; provider
``ernie45_vl_provider.py:52-104``): interleaved 3D RoPE (``rotary_interleaved``), the text pool as the
MoE fields and both pool widths as ``moe_intermediate_size``, expert bias on the router, the vision
config and token ids. Megatron-LM has no dual-pool (text / vision experts) MoE, so its ``args``
describe the text pool only; see README "Train with it".
"""

from __future__ import annotations

from ckptconv.core.spec import ModelSpec
from ckptconv.pipeline.training import FamilyTraining

PROVIDER = "megatron.bridge.models.ernie_vl.ernie45_vl_provider.Ernie45VLModelProvider"
VISION_CONFIG = "transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe.Ernie4_5_VLMoeVisionConfig"


def training(spec: ModelSpec) -> FamilyTraining:
    mrope = list(spec.extra["mrope_section"])
    tokens = {k: v for k, v in spec.extra["tokens"].items() if isinstance(v, int)}
    return FamilyTraining(
        provider_target=PROVIDER,
        language_model_provider_target=None,  # Bridge has no text-only provider for the dual-pool MoE
        transformer_fields={
            "rotary_interleaved": True,
            # As Megatron-Bridge's provider_bridge sets them (ernie45_vl_bridge.py:488-495): megatron-core
            # only allows an expert bias with sigmoid scores (TransformerConfig.__post_init__). HF ERNIE
            # scores with softmax (+ moe_statics bias for the top-k choice); ckptconv's own verify model
            # follows HF -- see docs/training.md.
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_dtype": "fp32",
            "moe_router_pre_softmax": False,
        },
        provider_fields={
            "position_embedding_type": "mrope",
            "mrope_section": mrope,
            "moe_intermediate_size": list(spec.moe_ffn_hidden_size),
            "scatter_embedding_sequence_parallel": False,
            "vision_config": {"_target_": VISION_CONFIG, **{k: v for k, v in spec.vision.items() if k != "transformers_version"}},
            **tokens,
        },
        megatron_lm_args={"position_embedding_type": "mrope", "mrope_section": mrope, "rotary_interleaved": True},
        # Text tokens have equal positions on all axes: every frequency band turns by the same
        # position, i.e. interleaved 1D RoPE.
        megatron_lm_args_language_model_only={"position_embedding_type": "rope", "mrope_section": None},
    )
