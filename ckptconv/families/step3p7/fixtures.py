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


# ------------------------------------------------------------------------------------------ release-shaped
#: Widths the release-shaped fixture cuts; every other field of the released config stays as released
#: (vocabulary, token ids, RoPE and its llama3 scaling, the per-layer lists' values, MTP count, ...).
RELEASE_TEXT_CUTS = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, share_expert_dim=32,
                         num_attention_heads=4, num_attention_groups=2, head_dim=16, moe_num_experts=8,
                         moe_top_k=2, sliding_window=8)
RELEASE_SLIDING_CUTS = dict(num_attention_heads=6, num_attention_groups=2, head_dim=16)
RELEASE_VISION_CUTS = dict(width=32, layers=1, heads=2, image_size=56)


def cut_release_config(config: dict, keep_layers: tuple[int, ...] = (0, 1, 2, 44)) -> dict:
    """The released ``config.json`` with depth, experts and widths cut for size.

    ``keep_layers`` are released decoder layers kept in order (default: the three dense ones and
    the last MoE layer, a full-attention layer that carries the routed and shared SwiGLU clamps);
    the MTP layers are kept whole. Every per-layer list (``layer_types``, ``rope_theta``,
    ``partial_rotary_factors``, ``swiglu_limits*``: num_hidden_layers + num_nextn_predict_layers
    entries) keeps the released entries of the kept layers, ``moe_layers_enum`` is renumbered.
    """
    import copy

    cut = copy.deepcopy(config)
    text = cut["text_config"]
    n, k = int(text["num_hidden_layers"]), int(text.get("num_nextn_predict_layers", 0) or 0)
    rows = [*keep_layers, *range(n, n + k)]
    for field, value in list(text.items()):
        if isinstance(value, list) and len(value) == n + k:
            text[field] = [value[i] for i in rows]
    moe = {int(i) for i in str(text.get("moe_layers_enum", "")).split(",") if i.strip()}
    text["moe_layers_enum"] = ",".join(str(j) for j, i in enumerate(keep_layers) if i in moe)
    text["num_hidden_layers"] = len(keep_layers)
    text.update(RELEASE_TEXT_CUTS)
    if isinstance(text.get("attention_other_setting"), dict):
        text["attention_other_setting"].update(RELEASE_SLIDING_CUTS)
    cut["vision_config"].update(RELEASE_VISION_CUTS)
    return cut


def _mtp_tensors(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 17 tensors of each MTP layer ``model.layers.{n + i}`` under the released names, shapes
    read off the config itself (the layer's type decides its head count, as in vLLM's Step3p5MTP)."""
    from ckptconv.fixtures import _random_like

    text = config["text_config"]
    n, k = int(text["num_hidden_layers"]), int(text.get("num_nextn_predict_layers", 0) or 0)
    hidden, ffn, vocab, d = int(text["hidden_size"]), int(text["intermediate_size"]), int(text["vocab_size"]), int(text["head_dim"])
    other = text.get("attention_other_setting") or {}
    out = {}
    for layer in range(n, n + k):
        sliding = text["layer_types"][layer] == "sliding_attention"
        heads = int(other.get("num_attention_heads", text["num_attention_heads"]) if sliding else text["num_attention_heads"])
        groups = int(other.get("num_attention_groups", text["num_attention_groups"]) if sliding else text["num_attention_groups"])
        shapes = {
            "enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
            "transformer.shared_head.norm.weight": (hidden,), "transformer.shared_head.output.weight": (vocab, hidden),
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (heads * d, hidden), "self_attn.k_proj.weight": (groups * d, hidden),
            "self_attn.v_proj.weight": (groups * d, hidden), "self_attn.o_proj.weight": (hidden, heads * d),
            "self_attn.g_proj.weight": (heads, hidden), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
            "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden), "mlp.down_proj.weight": (hidden, ffn),
        }
        for suffix, shape in shapes.items():
            name = f"model.layers.{layer}.{suffix}"
            # (1 + w) norms are stored centred on 0, like the decoder's.
            const = 0.0 if suffix.endswith("norm.weight") else None
            out[name] = _random_like(name, torch.empty(shape, device="meta"), seed, torch.float32, const).to(dtype)
    return out


def make_release_step3p7(
    config: dict,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 3,
) -> Path:
    """A checkpoint shaped like the release: ``config`` (the released remote-code config, cut with
    :func:`cut_release_config`) written as ``config.json`` unchanged, the weights under the released
    on-disk names in ``shards`` files with a ``model.safetensors.index.json``, MTP layers included.

    The decoder and vision weights come from transformers' own ``Step3p7ForConditionalGeneration``
    (seeded, randomised) and its ``save_pretrained`` names; transformers has no MTP modules, so the
    MTP layers are written from the config.
    """
    import json
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_and_save(Step3p7ForConditionalGeneration, Step3p7Config.from_dict(json.loads(json.dumps(config))),
                       tmp, seed, dtype)
        tensors = {}
        for path in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(path)))
    tensors.update(_mtp_tensors(config, seed, dtype))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names, files, weight_map, budget = list(tensors), [], {}, -(-total // shards)
    current, size = [], 0
    for name in names:  # consecutive names, about total / shards bytes per file
        current.append(name)
        size += tensors[name].numel() * tensors[name].element_size()
        if size >= budget and len(files) < shards - 1:
            files.append(current)
            current, size = [], 0
    files.append(current)
    for i, group in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file({name: tensors[name].contiguous() for name in group}, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


make_tiny = make_tiny_step3p7
