"""Tiny random Hugging Face VL checkpoints for tests, demos and benchmarks.

Every builder writes a directory that ``transformers`` 5.x can load with
``from_pretrained`` (config.json + safetensors, written by the real config and
model classes), is seeded (same seed -> byte-identical tensors) and is small
enough to build in well under two seconds on a 2-core CPU.

Families:

* :func:`make_tiny_qwen2_5_vl` -- ``Qwen2_5_VLForConditionalGeneration``
  (+ an offline tokenizer / processor).
* :func:`make_tiny_ernie4_5_vl_moe` -- ``Ernie4_5_VLMoeForConditionalGeneration``
  (nested transformers-native config, or the released "flat" config form).
* :func:`make_tiny_step3p7` -- ``Step3p7ForConditionalGeneration``.
* :func:`make_real_width` -- real hidden widths, few layers, written
  shard-by-shard from a ``meta``-device model (never materialised in memory).
* :func:`make_hub_cache` -- a Hugging Face hub cache layout that
  ``huggingface_hub.snapshot_download(..., local_files_only=True)`` resolves.

Weight randomisation: after the model is built, every tensor in the state dict
is overwritten from a seeded generator. Tensors the initialiser leaves constant
(norm weights = 1, zero-centred norm weights = 0, biases = 0, layer scales,
router correction biases) become ``c + 0.05 * N(0, 1)`` so a converter that
drops, swaps or mis-offsets them is caught; all other tensors become
``0.02 * N(0, 1)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "make_tiny_qwen2_5_vl",
    "make_tiny_ernie4_5_vl_moe",
    "make_tiny_step3p7",
    "make_real_width",
    "make_hub_cache",
    "randomize_state_dict_",
    "hf_disk_layout",
    "list_disk_tensors",
    "ernie_flat_config_dict",
    "QWEN_TINY_SPECIAL_TOKENS",
]

_SHARD_BYTES = 2 * 1024**3  # 2 GiB per safetensors shard for real-width fixtures


# --------------------------------------------------------------------------- helpers


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _tensor_seed(seed: int, name: str) -> int:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _random_like(name: str, ref: torch.Tensor, seed: int, dtype: torch.dtype, const: float | None) -> torch.Tensor:
    """Random tensor for ``name`` with ``ref``'s shape; independent of iteration order."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    out = torch.empty(ref.shape, dtype=dtype)
    flat = out.view(-1) if out.dim() > 0 else out.view(1)
    # fill in chunks so that big bf16 tensors never need a full fp32 copy
    chunk = 1 << 24
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        if const is None:
            flat[start : start + n].normal_(0.0, 0.02, generator=g)
        else:
            flat[start : start + n].normal_(const, 0.05, generator=g)
    return out


def _constant_value(t: torch.Tensor) -> float | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    f = t.detach().float().reshape(-1)
    c = float(f[0])
    return c if bool(torch.all(f == c)) else None


@torch.no_grad()
def randomize_state_dict_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every floating parameter / persistent buffer of ``model`` in place (seeded)."""
    sd = model.state_dict()
    seen: set[int] = set()
    for name, t in sd.items():
        if not torch.is_floating_point(t):
            continue
        key = t.data_ptr()
        if key in seen:  # tied weights: randomise once
            continue
        seen.add(key)
        const = _constant_value(t)
        t.copy_(_random_like(name, t, seed, t.dtype, const))


def _reset_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _build_and_save(model_cls, config, out_dir, seed: int, dtype: torch.dtype) -> Path:
    _quiet_transformers()
    out = _reset_dir(out_dir)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    randomize_state_dict_(model, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- Qwen2.5-VL

#: token -> id of the special tokens in the tiny Qwen2.5-VL vocab (ids 256..263;
#: ids 0..255 are the byte-level alphabet; ids 264..319 are unused embedding rows,
#: mirroring the real model whose embedding is larger than its tokenizer).
QWEN_TINY_SPECIAL_TOKENS = {
    "<|endoftext|>": 256,
    "<|im_start|>": 257,
    "<|im_end|>": 258,
    "<|vision_start|>": 259,
    "<|vision_end|>": 260,
    "<|vision_pad|>": 261,
    "<|image_pad|>": 262,
    "<|video_pad|>": 263,
}
_QWEN_TINY_VOCAB = 320  # NOT a multiple of 128: exercises vocab padding

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tiny_config(tie_word_embeddings: bool, num_layers: int):
    from transformers import Qwen2_5_VLConfig

    tok = QWEN_TINY_SPECIAL_TOKENS
    text = dict(
        vocab_size=_QWEN_TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, 2 query groups
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        max_window_layers=num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tok["<|endoftext|>"],
        eos_token_id=tok["<|im_end|>"],
        pad_token_id=tok["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 56 / 14 / 2 = 2x2 merged-patch windows
        fullatt_block_indexes=[1],
        hidden_act="silu",
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok["<|image_pad|>"],
        video_token_id=tok["<|video_pad|>"],
        vision_start_token_id=tok["<|vision_start|>"],
        vision_end_token_id=tok["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok["<|endoftext|>"],
        eos_token_id=tok["<|im_end|>"],
        pad_token_id=tok["<|endoftext|>"],
    )


def _write_qwen_tokenizer_and_processor(out: Path) -> str:
    """Byte-level BPE (256 byte tokens, no merges) + Qwen special tokens.

    Returns ``"processor"`` if a full ``Qwen2_5_VLProcessor`` was written, else
    ``"tokenizer"`` (tokenizer only).
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    assert len(vocab) == 256
    for t, i in QWEN_TINY_SPECIAL_TOKENS.items():
        vocab[t] = i
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_TINY_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        model_max_length=512,
    )
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(QWEN_TINY_SPECIAL_TOKENS))
    assert ids == list(QWEN_TINY_SPECIAL_TOKENS.values()), ids
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 64
    )
    try:
        # Qwen2_5_VLProcessor requires a video processor, which requires torchvision.
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        proc = Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
            chat_template=_QWEN_CHAT_TEMPLATE,
        )
        proc.save_pretrained(out)
        return "processor"
    except Exception:
        tok.save_pretrained(out)
        image_processor.save_pretrained(out)
        return "tokenizer"


def make_tiny_qwen2_5_vl(
    out_dir: str | os.PathLike,
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    with_processor: bool = True,
) -> Path:
    """Tiny random ``Qwen2_5_VLForConditionalGeneration`` (+ tokenizer/processor).

    Text: hidden 64, 4 heads x head_dim 16, 2 KV heads (GQA, 2 groups), qkv bias,
    vocab 320 (not a multiple of 128), mrope_section [2, 3, 3] (sums to
    head_dim / 2). Vision: depth 2, hidden 32, 2 heads, out_hidden_size 64,
    window_size 56, fullatt_block_indexes [1]. Special token ids: see
    :data:`QWEN_TINY_SPECIAL_TOKENS`.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = _qwen_tiny_config(tie_word_embeddings, num_layers)
    out = _build_and_save(Qwen2_5_VLForConditionalGeneration, cfg, out_dir, seed, dtype)
    if with_processor:
        _write_qwen_tokenizer_and_processor(out)
    return out


# --------------------------------------------------------------------------- ERNIE-4.5-VL-MoE

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
    out = _build_and_save(Ernie4_5_VLMoeForConditionalGeneration, cfg, out_dir, seed, dtype)
    if flat:
        path = out / "config.json"
        nested = json.loads(path.read_text())
        path.write_text(json.dumps(ernie_flat_config_dict(nested), indent=2, sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------- Step3.7


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

    return _build_and_save(Step3p7ForConditionalGeneration, _step3p7_tiny_config(), out_dir, seed, dtype)


# --------------------------------------------------------------------------- real widths


def _real_config(family: str, variant: str | None, num_layers: int, vision_layers: int, num_experts: int | None):
    """Published widths (few layers). Returns (model_cls, config)."""
    if family in ("qwen2_5_vl", "qwen"):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        variant = variant or "3b"
        if variant.lower() == "3b":
            text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128000)
            out_hidden = 2048
        elif variant.lower() == "7b":
            text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=128000)
            out_hidden = 3584
        else:
            raise ValueError(f"unknown qwen2_5_vl variant {variant!r} (use '3b' or '7b')")
        text.update(num_hidden_layers=num_layers, max_window_layers=num_layers, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
        # published: depth 32, fullatt_block_indexes [7, 15, 23, 31]; keep the last block full-attention
        full = [i for i in (7, 15, 23, 31) if i < vision_layers] or [vision_layers - 1]
        vision = dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=out_hidden, window_size=112, fullatt_block_indexes=full,
                      hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      tokens_per_second=2)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                               bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
        return Qwen2_5_VLForConditionalGeneration, cfg
    if family in ("ernie4_5_vl_moe", "ernie"):
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
    if family in ("step3p7", "step"):
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
    raise ValueError(f"unknown family {family!r}")


def hf_disk_layout(model) -> dict[str, torch.Tensor]:
    """Names/shapes (as meta tensors) that ``model.save_pretrained`` would write.

    Works on a ``meta``-device model: applies transformers' own tied-weight
    removal and reverse weight conversion (hub key names, fused/split expert
    layouts) without materialising anything.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = model.state_dict()
    if getattr(model, "_keys_to_ignore_on_save", None):
        for k in model._keys_to_ignore_on_save:
            sd.pop(k, None)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, sd)
    return {k: (v[0] if isinstance(v, list) else v) for k, v in sd.items()}


def _plan_shards(layout: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    esize = torch.empty((), dtype=dtype).element_size()
    for name, t in layout.items():
        nbytes = t.numel() * esize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def make_real_width(
    family: str,
    out_dir: str | os.PathLike,
    *,
    num_layers: int,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    variant: str | None = None,
    vision_layers: int = 2,
    num_experts: int | None = None,
    max_shard_bytes: int = _SHARD_BYTES,
) -> Path:
    """Random checkpoint with published widths but only ``num_layers`` decoder layers.

    ``family``: ``"qwen2_5_vl"`` (``variant`` ``"3b"`` (default) or ``"7b"``),
    ``"ernie4_5_vl_moe"`` (ERNIE-4.5-VL-28B-A3B) or ``"step3p7"`` (Step-3.7-Flash;
    layers 0-2 dense, MoE from layer 3). ``vision_layers`` vision blocks (default 2).
    ``num_experts`` optionally shrinks the routed-expert count of MoE families
    (a single real-width Step3.7 MoE layer with all 288 experts is ~9 GB in bf16).

    The model is only ever built on the ``meta`` device; tensors are generated
    one by one (seeded per tensor name) and written in shards of at most
    ``max_shard_bytes`` with a ``model.safetensors.index.json``. Key names and
    shapes are exactly what ``save_pretrained`` would write (transformers' reverse
    weight conversion is applied to the meta state dict).
    """
    from safetensors.torch import save_file

    _quiet_transformers()
    model_cls, cfg = _real_config(family, variant, num_layers, vision_layers, num_experts)
    cfg.dtype = dtype
    with torch.device("meta"):
        model = model_cls(cfg)
    layout = hf_disk_layout(model)
    out = _reset_dir(out_dir)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    model.config.save_pretrained(out)
    shards = _plan_shards(layout, dtype, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            ref = layout[name]
            const = 1.0 if (ref.dim() == 1 and _is_norm_like(name) and not _zero_centered(family, name)) else None
            if const is None and (ref.dim() == 1 and (_zero_centered(family, name) or name.endswith("bias"))):
                const = 0.0
            t = _random_like(name, ref, seed, dtype, const)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _is_norm_like(name: str) -> bool:
    return "norm" in name or ".ln" in name or name.startswith("ln") or "layernorm" in name


def _zero_centered(family: str, name: str) -> bool:
    # Step3.7 trunk RMSNorms compute x * (1 + w); vision LayerNorms are standard.
    return family in ("step3p7", "step") and "norm" in name and "vision" not in name


# --------------------------------------------------------------------------- hub cache


def make_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    model_dir: str | os.PathLike,
    *,
    commit: str | None = None,
    revision: str = "main",
) -> Path:
    """Lay out ``model_dir``'s files as a Hugging Face hub cache entry for ``repo_id``.

    Creates ``<cache_dir>/models--org--name/{blobs/<sha256>, snapshots/<commit>/<file>
    -> ../../blobs/<sha256>, refs/<revision>}`` so that
    ``huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir,
    local_files_only=True)`` returns the snapshot directory offline. Returns the
    snapshot directory. ``commit`` defaults to a deterministic 40-hex digest of the
    file contents. Blobs are hard links to ``model_dir``'s files where the
    filesystem allows (no extra disk for big fixtures), copies otherwise.
    """
    src = Path(model_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digests: dict[Path, str] = {}
    tree = hashlib.sha1()
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digests[p] = h.hexdigest()
        tree.update(f"{p.relative_to(src).as_posix()}\0{digests[p]}\n".encode())
    commit = commit or tree.hexdigest()
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError("commit must be 40 lowercase hex characters")
    repo_root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_root / "blobs"
    snap = repo_root / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo_root / "refs").mkdir(exist_ok=True)
    for p in files:
        blob = blobs / digests[p]
        if not blob.exists():
            try:
                os.link(p, blob)
            except OSError:
                shutil.copyfile(p, blob)
        rel = p.relative_to(src)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    (repo_root / "refs" / revision).write_text(commit)
    return snap


def list_disk_tensors(model_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of all safetensors tensors in ``model_dir`` (header only)."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out
