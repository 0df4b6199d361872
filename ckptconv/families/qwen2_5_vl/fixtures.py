"""Qwen2.5-VL fixtures: a tiny random checkpoint written by the ``transformers`` classes, and the
published widths for real-width benchmark checkpoints (see :mod:`ckptconv.fixtures`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ckptconv.fixtures import build_and_save


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
    max_shard_size: str | None = None,
) -> Path:
    """Tiny random ``Qwen2_5_VLForConditionalGeneration`` (+ tokenizer/processor).

    Text: hidden 64, 4 heads x head_dim 16, 2 KV heads (GQA, 2 groups), qkv bias,
    vocab 320 (not a multiple of 128), mrope_section [2, 3, 3] (sums to
    head_dim / 2). Vision: depth 2, hidden 32, 2 heads, out_hidden_size 64,
    window_size 56, fullatt_block_indexes [1]. Special token ids: see
    :data:`QWEN_TINY_SPECIAL_TOKENS`. ``max_shard_size`` (e.g. ``"100KB"``) shards it as
    ``save_pretrained`` shards released checkpoints.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = _qwen_tiny_config(tie_word_embeddings, num_layers)
    out = build_and_save(Qwen2_5_VLForConditionalGeneration, cfg, out_dir, seed, dtype, max_shard_size)
    if with_processor:
        _write_qwen_tokenizer_and_processor(out)
    return out


def real_width_config(variant: str | None, num_layers: int, vision_layers: int, num_experts: int | None):
    """Published widths (few layers): ``(model_cls, config)`` for :func:`ckptconv.fixtures.make_real_width`."""
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


make_tiny = make_tiny_qwen2_5_vl
