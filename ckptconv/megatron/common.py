"""What every family's Megatron model sets the same way."""

from __future__ import annotations

import torch


def runtime_config_kwargs(dtype: torch.dtype) -> dict:
    """TransformerConfig fields that do not depend on the model: parallel sizes from
    parallel_state, CPU initialization, dtype flags, and the fused kernels switched off (they need
    CUDA / apex / Transformer Engine; the unfused paths compute the same)."""
    from megatron.core import parallel_state

    return dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        pipeline_dtype=dtype,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
    )


def causal_mask(seq_len: int, padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean ``[B|1, 1, S, S]``, True = masked: causal, plus padded keys when given. Passed
    explicitly because megatron-core's default mask is built on CUDA."""
    mask = torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
    if padding_mask is not None:
        mask = mask | ~padding_mask.bool()[:, None, None, :]
    return mask
