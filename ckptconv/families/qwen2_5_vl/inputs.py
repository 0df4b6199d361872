"""Qwen2.5-VL verify inputs: a chat-formatted prompt, and the same with an image between
``<|vision_start|>`` and ``<|vision_end|>`` as ``<|image_pad|>`` tokens (one per merged patch)."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptconv.errors import ConversionError
from ckptconv.verify.inputs import MAX_IMAGE_PIXELS, TextEncoder, VerifyInput


def verify_inputs(spec, hf_src: Path, *, prompt: str, image, text_only: bool) -> list[VerifyInput]:
    cfg = spec.hf_config
    start, end, pad = cfg.get("vision_start_token_id"), cfg.get("vision_end_token_id"), spec.image_token_id
    if None in (start, end, pad):
        raise ConversionError("config.json lacks vision_start_token_id / vision_end_token_id / image_token_id")
    enc = TextEncoder(hf_src, spec.vocab_size, {start, end, pad, cfg.get("video_token_id", -1)})
    chat = enc.has_token("<|im_start|>")
    head = "<|im_start|>user\n" if chat else ""
    tail = "<|im_end|>\n<|im_start|>assistant\n" if chat else ""

    inputs = []
    if text_only:
        input_ids = torch.tensor([enc.encode(head + prompt + tail)])
        inputs.append(VerifyInput("text-only", {"input_ids": input_ids}, {"input_ids": input_ids}, input_ids == pad))
    if image is not None:
        name, pil = image
        pixel_values, grid_thw = _qwen_pixels(spec, hf_src, pil)
        merge = int(spec.vision.get("spatial_merge_size", 2))
        n_image_tokens = int(grid_thw.prod()) // merge**2
        ids = enc.encode(head) + [start] + [pad] * n_image_tokens + [end] + enc.encode(prompt + tail)
        input_ids = torch.tensor([ids])
        # The HF model computes 3D (M-RoPE) positions only when told which tokens are image tokens;
        # without mm_token_type_ids it silently falls back to 1D positions.
        mcore = {"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_thw": grid_thw}
        hf = dict(mcore, mm_token_type_ids=(input_ids == pad).int())
        inputs.append(VerifyInput(name, hf, mcore, input_ids == pad))
    return inputs


def _qwen_pixels(spec, hf_src: Path, pil):
    # The PIL processor class: the default Qwen2VLImageProcessor may need torchvision, absent here.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = spec.vision
    if (hf_src / "preprocessor_config.json").is_file():
        processor = Qwen2VLImageProcessorPil.from_pretrained(str(hf_src))
    else:
        processor = Qwen2VLImageProcessorPil(
            patch_size=vision.get("patch_size", 14),
            merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
        )
    size = dict(processor.size)
    size["longest_edge"] = min(int(size.get("longest_edge") or MAX_IMAGE_PIXELS), MAX_IMAGE_PIXELS)
    out = processor(images=[pil.convert("RGB")], size=size, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]
