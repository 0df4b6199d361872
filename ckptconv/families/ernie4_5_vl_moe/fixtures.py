"""ERNIE-4.5-VL-MoE fixtures: a tiny random checkpoint written by the ``transformers`` classes, and the
published widths for real-width benchmark checkpoints (see :mod:`ckptconv.fixtures`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ckptconv.fixtures import build_and_save


_ERNIE_TINY_TOKENS = dict(
    image_token_id=250,
    image_start_token_id=251,
    image_end_token_id=252,
    video_token_id=253,
    video_start_token_id=254,
    video_end_token_id=255,
)


def _ernie_tiny_config(num_layers: int):
    from transformers import Ernie4_5_VLMoeConfig

    text = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        use_bias=False,
        tie_word_embeddings=True,
        moe_intermediate_size=[48, 32],  # [text, vision]
        moe_k=2,
        moe_num_experts=4,
        moe_num_shared_experts=1,
        mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},  # [h, w, t]
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=128,  # embed_dim * mlp_ratio(4)
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_merge_size=2,
        rms_norm_eps=1e-6,
        hidden_act="quick_gelu",
    )
    return Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_ERNIE_TINY_TOKENS)


def ernie_flat_config_dict(nested: dict) -> dict:
    """Turn a nested ``ernie4_5_vl_moe`` config.json dict into the released flat form.

    Applied transformation (this is the complete list):

    * every field of ``text_config`` moves to the top level (``text_config``
      is removed); top-level fields win on a clash (token ids, tie flag, ...).
    * ``rope_parameters`` (text) -> ``rope_theta`` (scalar) + ``rope_3d: true`` +
      ``freq_allocation`` (= ``mrope_section[2]``, the temporal rotary pairs; h and w
      each get ``(head_dim // 2 - freq_allocation) // 2``). ``mrope_section`` is
      not written.
    * ``mlp_layer_types`` is dropped and replaced by
      ``moe_layer_start_index`` (first sparse layer), ``moe_layer_end_index``
      (last sparse layer, inclusive) and ``moe_layer_interval`` (1);
      ``moe_layer_start_index``/``moe_layer_end_index`` are stored as ints.
    * ``moe_num_experts`` becomes a list ``[text, vision]`` (both pools have the
      same count); ``moe_intermediate_size`` stays a 2-list ``[text, vision]``.
    * ``image_token_id`` additionally appears as ``im_patch_id``.
    * ``vision_config``: ``hidden_size`` -> ``embed_dim``; ``intermediate_size`` ->
      ``mlp_ratio`` (= intermediate_size / embed_dim); ``hidden_size`` is then
      re-set to the *text* hidden size (as released checkpoints do);
      ``rms_norm_eps`` and ``temporal_merge_size`` are DROPPED; ``model_type``
      is dropped; ``in_chans``/``spatial_patch_size`` aliases are added.
    * top level: ``pixel_hidden_size`` (vision embed_dim), ``spatial_conv_size``
      (= spatial_merge_size), ``temporal_conv_size`` (2) are added.
    * ``model_type`` stays ``ernie4_5_vl_moe`` (the released one says
      ``ernie4_5_moe_vl``; we only support the transformers-native type).
    """
    d = json.loads(json.dumps(nested))
    text = d.pop("text_config")
    vis = d.pop("vision_config")
    flat: dict = {}
    for k, v in text.items():
        if k in ("model_type", "architectures", "transformers_version", "dtype", "mlp_layer_types", "rope_parameters"):
            continue
        flat[k] = v
    flat.update({k: v for k, v in d.items() if k not in ("rope_parameters",)})
    rp = text.get("rope_parameters") or {}
    flat["rope_theta"] = rp.get("rope_theta", 500000.0)
    flat["rope_3d"] = True
    flat["freq_allocation"] = rp.get("mrope_section", [22, 22, 20])[2]
    types = text["mlp_layer_types"]
    sparse = [i for i, t in enumerate(types) if t == "sparse"]
    flat["moe_layer_start_index"] = sparse[0] if sparse else len(types)
    flat["moe_layer_end_index"] = sparse[-1] if sparse else -1
    flat["moe_layer_interval"] = 1
    n_exp = text["moe_num_experts"]
    flat["moe_num_experts"] = [n_exp, n_exp]
    flat["im_patch_id"] = d["image_token_id"]
    flat["pixel_hidden_size"] = vis["hidden_size"]
    flat["spatial_conv_size"] = vis["spatial_merge_size"]
    flat["temporal_conv_size"] = vis.get("temporal_merge_size", 2)
    embed = vis["hidden_size"]
    new_vis = {
        "depth": vis["depth"],
        "embed_dim": embed,
        "hidden_size": text["hidden_size"],
        "hidden_act": vis["hidden_act"],
        "mlp_ratio": vis["intermediate_size"] / embed
        if vis["intermediate_size"] % embed
        else vis["intermediate_size"] // embed,
        "num_heads": vis["num_heads"],
        "in_channels": vis["in_channels"],
        "in_chans": vis["in_channels"],
        "patch_size": vis["patch_size"],
        "spatial_patch_size": vis["patch_size"],
        "spatial_merge_size": vis["spatial_merge_size"],
        "initializer_range": vis.get("initializer_range", 0.02),
    }
    flat["vision_config"] = new_vis
    flat["model_type"] = "ernie4_5_vl_moe"
    flat["architectures"] = ["Ernie4_5_VLMoeForConditionalGeneration"]
    return flat


def make_tiny_ernie4_5_vl_moe(
    out_dir: str | os.PathLike,
    *,
    flat: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 3,
) -> Path:
    """Tiny random ``Ernie4_5_VLMoeForConditionalGeneration``.

    Text: hidden 64, 4 heads x 16, 2 KV heads, vocab 300, tied embeddings,
    ``mlp_layer_types = ["dense", "sparse", ...]`` (layer 0 dense), 4 experts per
    pool (text + vision), moe_k 2, 1 shared expert, ``moe_intermediate_size``
    ``[48, 32]`` (text, vision). Vision: depth 2, hidden 32, 2 heads, mlp 128.

    ``flat=True`` rewrites config.json into the released ERNIE-4.5-VL flat form
    (see :func:`ernie_flat_config_dict` for the exact list of moved / renamed /
    dropped fields); the safetensors files are identical to the nested form.
    """
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    cfg = _ernie_tiny_config(num_layers)
    out = build_and_save(Ernie4_5_VLMoeForConditionalGeneration, cfg, out_dir, seed, dtype)
    if flat:
        path = out / "config.json"
        nested = json.loads(path.read_text())
        path.write_text(json.dumps(ernie_flat_config_dict(nested), indent=2, sort_keys=True) + "\n")
    return out


def real_width_config(variant: str | None, num_layers: int, vision_layers: int, num_experts: int | None):
    """Published widths (few layers): ``(model_cls, config)`` for :func:`ckptconv.fixtures.make_real_width`."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    # baidu/ERNIE-4.5-VL-28B-A3B (= transformers defaults)
    n_exp = num_experts or 64
    text = dict(vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=num_layers,
                num_attention_heads=20, num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=True,
                moe_intermediate_size=[1536, 512], moe_k=min(6, n_exp), moe_num_experts=n_exp,
                moe_num_shared_experts=2, mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1),
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [22, 22, 20]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=vision_layers, hidden_size=1280, intermediate_size=5120, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_merge_size=2, hidden_act="quick_gelu")
    cfg = Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    return Ernie4_5_VLMoeForConditionalGeneration, cfg


make_tiny = make_tiny_ernie4_5_vl_moe
