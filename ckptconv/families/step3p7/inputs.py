"""Step3.7 verify inputs: ``prepare_verify_inputs`` builds one sequence for both models; ``verify_inputs``
the text-only and the image input."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptconv.core.spec import ModelSpec
from ckptconv.errors import ConversionError
from ckptconv.families.step3p7.model import IM_PATCH_TOKEN, IM_START_TOKEN
from ckptconv.verify.inputs import VerifyInput, paired_inputs

#: transformers' Step3p7ImageProcessor normalization (OpenAI CLIP statistics).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _special_token_ids(spec: ModelSpec, tokenizer) -> tuple[int, int, int]:
    """(<im_start>, <im_patch>, <im_end>) ids: the tokenizer's when it knows them, else ids from the
    top of the vocabulary next to image_token_id (tiny test checkpoints have no tokenizer)."""
    patch = spec.image_token_id
    if tokenizer is not None:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_START_TOKEN, IM_PATCH_TOKEN, "<im_end>")]
        if all(isinstance(i, int) and i != tokenizer.unk_token_id and 0 <= i < spec.vocab_size for i in ids):
            if ids[1] != patch:
                raise ConversionError(f"tokenizer's {IM_PATCH_TOKEN} is {ids[1]} but config.json image_token_id is {patch}")
            return ids[0], ids[1], ids[2]
    free = [i for i in range(spec.vocab_size - 1, -1, -1) if i != patch]
    return free[0], patch, free[1]


def _load_tokenizer(hf_dir):
    from pathlib import Path

    hf_dir = Path(hf_dir)
    if not ((hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception:  # unusable (e.g. remote-code) tokenizer: deterministic ids instead
        return None


def _encode(text: str, tokenizer, vocab_size: int, reserved: set[int]) -> list[int]:
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if all(0 <= i < vocab_size and i not in reserved for i in ids):
            return list(ids)
    usable = [i for i in range(min(vocab_size, 4096)) if i not in reserved]
    return [usable[(b * 131 + i * 7) % len(usable)] for i, b in enumerate(text.encode())]


def _pixel_values(spec: ModelSpec, image) -> torch.Tensor:
    """The global view transformers' processor makes (resize to image_size, rescale, CLIP-normalize);
    local crops are left out, on both sides of the comparison alike."""
    from pathlib import Path

    if isinstance(image, torch.Tensor):
        pixels = image if image.dim() == 4 else image.unsqueeze(0)
    else:
        from PIL import Image

        picture = Image.open(image) if isinstance(image, (str, Path)) else image
        size = int(spec.vision["image_size"])
        picture = picture.convert("RGB").resize((size, size), Image.BILINEAR)
        pixels = torch.tensor(list(picture.getdata()), dtype=torch.float32).view(size, size, 3).permute(2, 0, 1)[None] / 255.0
        pixels = (pixels - torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
    size = int(spec.vision["image_size"])
    if tuple(pixels.shape[1:]) != (3, size, size):
        raise ConversionError(f"image tensor has shape {list(pixels.shape)}, expected [N, 3, {size}, {size}]")
    return pixels.float()


def image_feature_count(spec: ModelSpec) -> int:
    """Features per image: (image_size / patch_size / 4)^2 (two stride-2 downsampler convolutions)."""
    grid = int(spec.vision["image_size"]) // int(spec.vision["patch_size"])
    side = grid
    for _ in range(2):  # kernel 3, stride 2, padding 1
        side = (side - 1) // 2 + 1
    return side * side


def prepare_verify_inputs(spec: ModelSpec, hf_dir, *, prompt: str, image=None):
    """Inputs for comparing HF and Megatron logits on one sequence.

    Returns ``(hf_kwargs, mcore_kwargs, image_token_mask)``: keyword arguments for
    ``Step3p7ForConditionalGeneration`` and for :class:`Step37Megatron`, and the ``[1, S]`` mask of
    ``<im_patch>`` positions. With an image (PIL image, path, or an already normalized tensor) the
    sequence is ``<im_start> <im_patch> * L <im_end> prompt``, which HF fills by image_token_id and
    Megatron by "after <im_start>" -- the same positions.
    """
    tokenizer = _load_tokenizer(hf_dir)
    start, patch, end = _special_token_ids(spec, tokenizer)
    text = _encode(prompt, tokenizer, spec.vocab_size, {start, patch, end})
    if image is None:
        input_ids = torch.tensor([text])
        return {"input_ids": input_ids}, {"input_ids": input_ids}, torch.zeros_like(input_ids, dtype=torch.bool)
    pixel_values = _pixel_values(spec, image)
    ids: list[int] = []
    for _ in range(pixel_values.shape[0]):
        ids += [start] + [patch] * image_feature_count(spec) + [end]
    input_ids = torch.tensor([ids + text])
    hf_kwargs = {"input_ids": input_ids, "pixel_values": pixel_values}
    mcore_kwargs = {"input_ids": input_ids, "pixel_values": pixel_values, "image_start_token_id": start}
    return hf_kwargs, mcore_kwargs, input_ids == patch


def verify_inputs(spec: ModelSpec, hf_dir: Path, *, prompt: str, image, text_only: bool) -> list[VerifyInput]:
    return paired_inputs(prepare_verify_inputs, spec, hf_dir, prompt, image, text_only)
