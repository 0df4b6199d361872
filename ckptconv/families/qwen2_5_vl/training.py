"""What Megatron-LM's ``args`` and Megatron-Bridge's ``run_config.yaml`` say about Qwen2.5-VL.

Provider fields as Megatron-Bridge's ``Qwen25VLBridge.provider_bridge`` sets them
(``src/megatron/bridge/models/qwen_vl/qwen25_vl_bridge.py:51-80``): RMSNorm, SwiGLU, qkv bias, M-RoPE
with ``mrope_section``, the HF vision config, the special token ids.
"""

from __future__ import annotations

from ckptconv.core.spec import ModelSpec
from ckptconv.pipeline.training import FamilyTraining

PROVIDER = "megatron.bridge.models.qwen_vl.qwen25_vl_provider.Qwen25VLModelProvider"
GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
VISION_CONFIG = "transformers.models.qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig"
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
                 "image_token_id", "video_token_id")


def training(spec: ModelSpec) -> FamilyTraining:
    hf = spec.hf_config
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
    tokens = {}
    for key in _TOKEN_FIELDS:
        value = hf.get(key, text.get(key))
        if isinstance(value, int):
            tokens[key] = value
    mrope = list(spec.extra["mrope_section"])
    return FamilyTraining(
        provider_target=PROVIDER,
        language_model_provider_target=GPT_PROVIDER,
        provider_fields={
            "position_embedding_type": "mrope",
            "mrope_section": mrope,
            "scatter_embedding_sequence_parallel": False,
            "vision_config": {"_target_": VISION_CONFIG, **{k: v for k, v in spec.vision.items() if k != "transformers_version"}},
            **tokens,
        },
        megatron_lm_args={"position_embedding_type": "mrope", "mrope_section": mrope},
        # Text tokens carry the same position on all three M-RoPE axes, which is plain RoPE: the
        # bare language model trains with Megatron-LM's GPT (2D position ids) as ``rope``.
        megatron_lm_args_language_model_only={"position_embedding_type": "rope", "mrope_section": None},
    )
