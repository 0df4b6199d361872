"""Step3.7 fixtures: a tiny random checkpoint written by the ``transformers`` classes, and the
published widths for real-width benchmark checkpoints (see :mod:`ckptconv.fixtures`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ckptconv.fixtures import build_and_save


def _step3p7_tiny_config():
    from transformers import Step3p7Config

    n = 4
    layer_types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    text = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=n,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_sliding_attention_heads=6,  # -> per_layer_config override on sliding layers
        layer_types=layer_types,
        sliding_window=8,
        mlp_layer_types=["dense", "dense", "sparse", "sparse"],
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        share_expert_dim=40,
        moe_router_scaling_factor=1.0,
        rope_theta=[5000000.0, 10000.0, 10000.0, 5000000.0],
        partial_rotary_factors=[0.5, 1.0, 1.0, 0.5],
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32,
        mlp_ratio=2.0,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        max_position_embeddings=16,
    )
    return Step3p7Config(text_config=text, vision_config=vision, image_token_id=299)


def make_tiny_step3p7(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Tiny random ``Step3p7ForConditionalGeneration`` (text model type ``step3p5``).

    4 decoder layers: ``layer_types`` = [full, sliding, sliding, full]
    (sliding_window 8), ``mlp_layer_types`` = [dense, dense, sparse, sparse]
    (4 routed experts, top-2, shared expert width 40). Full-attention layers have
    4 query heads, sliding layers 6 (``num_sliding_attention_heads`` -> a
    ``per_layer_config`` override), 2 KV heads, head_dim 16, per-head ``g_proj``
    gate, q/k RMSNorm; all trunk RMSNorms are zero-centred (scale = 1 + w).
    Per-layer rope theta / partial rotary factor as in the released model.
    Vision: 2 layers, hidden 32, 2 heads, 56x56 images, patch 14.
    """
    from transformers import Step3p7ForConditionalGeneration

    return build_and_save(Step3p7ForConditionalGeneration, _step3p7_tiny_config(), out_dir, seed, dtype)


def real_width_config(variant: str | None, num_layers: int, vision_layers: int, num_experts: int | None):
    """Published widths (few layers): ``(model_cls, config)`` for :func:`ckptconv.fixtures.make_real_width`."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    # stepfun-ai/Step-3.7-Flash: 45 layers, layers 0-2 dense, 3.. MoE (288 experts, top-8),
    # 1 full-attention layer per 4 (64 q heads, rope 5e6, partial rotary 0.5),
    # sliding layers 96 q heads (rope 1e4, full rotary), 8 KV heads, head_dim 128.
    lt = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(num_layers)]
    text = dict(vocab_size=128815, hidden_size=4096, intermediate_size=11264, num_hidden_layers=num_layers,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, num_sliding_attention_heads=96,
                layer_types=lt, sliding_window=512,
                mlp_layer_types=["dense" if i < 3 else "sparse" for i in range(num_layers)],
                moe_intermediate_size=1280, n_routed_experts=num_experts or 288,
                num_experts_per_tok=min(8, num_experts or 288), share_expert_dim=1280,
                rope_theta=[5e6 if t == "full_attention" else 1e4 for t in lt],
                partial_rotary_factors=[0.5 if t == "full_attention" else 1.0 for t in lt],
                rms_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=128007)
    vision = dict(hidden_size=1536, mlp_ratio=8960 / 1536, num_hidden_layers=vision_layers, num_attention_heads=16,
                  image_size=728, patch_size=14)
    cfg = Step3p7Config(text_config=text, vision_config=vision)
    return Step3p7ForConditionalGeneration, cfg


make_tiny = make_tiny_step3p7
