"""ERNIE-4.5-VL-MoE verify inputs: ``prepare_verify_inputs`` builds one sequence for both models; ``verify_inputs``
the text-only and the image input."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError
from ckptconv.verify.inputs import VerifyInput, paired_inputs


#: Images are resized to at most this many pixels (448x448 -> 256 image tokens) to keep CPU runs short.
VERIFY_MAX_IMAGE_PIXELS = 448 * 448


def _text_ids(hf_dir, text: str, vocab_size: int, reserved: set[int]) -> list[int]:
    """The checkpoint's tokenizer when it has a usable one, else deterministic ids (one per byte,
    spread over the vocab, never a special vision id)."""
    from pathlib import Path

    hf_dir = Path(hf_dir)
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)(text, add_special_tokens=False)["input_ids"]
            if all(0 <= i < vocab_size and i not in reserved for i in ids):
                return list(ids)
        except Exception:  # a remote-code or broken tokenizer: fall back to deterministic ids
            pass
    usable = [i for i in range(min(vocab_size, 4096)) if i not in reserved]
    return [usable[(b * 131 + i * 7) % len(usable)] for i, b in enumerate(text.encode())]


def _image_processor(spec: ModelSpec, hf_dir):
    from pathlib import Path

    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    if (Path(hf_dir) / "preprocessor_config.json").is_file():
        try:
            return Ernie4_5_VLMoeImageProcessorPil.from_pretrained(str(hf_dir))
        except Exception:  # a remote-code processor config: the transformers defaults below
            pass
    return Ernie4_5_VLMoeImageProcessorPil(
        patch_size=spec.vision["patch_size"], merge_size=spec.vision["spatial_merge_size"]
    )


def prepare_verify_inputs(spec: ModelSpec, hf_dir, *, prompt: str, image=None) -> tuple[dict, dict, torch.Tensor]:
    """Inputs for one verify comparison: ``(hf_kwargs, mcore_kwargs, image_token_mask)``.

    ``image``: a PIL image or None (text only). The sequence is ``<image_start> <image>*n <image_end>``
    followed by the prompt. The HF reference gets normalized pixels (what transformers' processor
    gives); the Megatron model gets the same pixels *raw* (0..255, what the released processor gives)
    with ``pixel_values_are_raw=True``, so the in-model normalization is checked too. Both get the
    token types the HF processor would make. ``image_token_mask`` ``[S]`` marks image placeholders.
    """
    tokens = spec.extra["tokens"]
    reserved = {v for v in tokens.values() if v is not None}
    prompt_ids = _text_ids(hf_dir, prompt, spec.vocab_size, reserved)
    if image is None:
        input_ids = torch.tensor([prompt_ids])
        mm = torch.zeros_like(input_ids, dtype=torch.int)
        hf_kwargs = {"input_ids": input_ids, "mm_token_type_ids": mm, "moe_mm_token_type_ids": mm.clone()}
        mcore_kwargs = dict(hf_kwargs)
        return hf_kwargs, mcore_kwargs, torch.zeros(input_ids.shape[1], dtype=torch.bool)

    start, end = tokens["image_start_token_id"], tokens["image_end_token_id"]
    missing = [name for name, value in (("image_token_id (im_patch_id)", spec.image_token_id),
                                        ("image_start_token_id", start), ("image_end_token_id", end)) if value is None]
    if missing:
        raise ConversionError(
            f"{hf_dir}: {', '.join(missing)} neither in config.json nor in the tokenizer files "
            "(added tokens <|IMAGE_PLACEHOLDER|>, <|IMAGE_START|>, <|IMAGE_END|>)"
        )
    processor = _image_processor(spec, hf_dir)
    size = dict(processor.size)
    size["longest_edge"] = min(int(size.get("longest_edge") or VERIFY_MAX_IMAGE_PIXELS), VERIFY_MAX_IMAGE_PIXELS)
    picture = [image.convert("RGB")]
    normalized = processor(images=picture, size=size, return_tensors="pt")
    raw = processor(images=picture, size=size, return_tensors="pt", do_rescale=False, do_normalize=False)
    grid = normalized["image_grid_thw"]
    n_image = int(grid.prod()) // spec.vision["spatial_merge_size"] ** 2
    input_ids = torch.tensor([[start] + [spec.image_token_id] * n_image + [end] + prompt_ids])
    image_mask = input_ids == spec.image_token_id
    mm = image_mask.int()
    moe = (image_mask | (input_ids == start) | (input_ids == end)).int()
    common = {"input_ids": input_ids, "image_grid_thw": grid, "mm_token_type_ids": mm, "moe_mm_token_type_ids": moe}
    hf_kwargs = {**common, "pixel_values": normalized["pixel_values"]}
    mcore_kwargs = {**common, "pixel_values": raw["pixel_values"], "pixel_values_are_raw": True}
    return hf_kwargs, mcore_kwargs, image_mask[0]


def verify_inputs(spec: ModelSpec, hf_dir: Path, *, prompt: str, image, text_only: bool) -> list[VerifyInput]:
    return paired_inputs(prepare_verify_inputs, spec, hf_dir, prompt, image, text_only)
