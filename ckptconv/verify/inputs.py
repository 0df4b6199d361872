"""Verify inputs: the same prompt and image, as each model takes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ckptconv.errors import ConversionError

DEFAULT_PROMPT = "Describe this picture in one sentence. What colours and shapes can you see, and where are they?"

#: Synthetic image size (width, height). Not square, so a height/width mix-up in the vision grid or
#: the M-RoPE positions changes the result; multiples of 28 (patch 14 x merge 2), so no resizing.
SYNTHETIC_IMAGE_SIZE = (140, 84)

#: User images are resized to at most this many pixels (448x448 -> 256 image tokens) to keep a CPU
#: run short; both models see the same pixels, so the comparison is unaffected.
MAX_IMAGE_PIXELS = 448 * 448

# --------------------------------------------------------------------------- inputs


@dataclass
class VerifyInput:
    """One input, as each model takes it. The same shape family modules return from their
    ``prepare_verify_inputs(spec, hf_dir, *, prompt, image)``: (hf_kwargs, mcore_kwargs, image mask)."""

    name: str
    hf_kwargs: dict
    """Keyword arguments of the HF model's forward (``input_ids``, pixels, e.g. ``mm_token_type_ids``)."""
    mcore_kwargs: dict
    """Keyword arguments of the family's Megatron model forward."""
    image_mask: torch.Tensor
    """``[1, S]`` (or ``[S]``) bool: the image-token positions (metrics are split text / image on it)."""

    @property
    def input_ids(self) -> torch.Tensor:
        return self.mcore_kwargs["input_ids"]

    def token_groups(self) -> dict[str, torch.Tensor]:
        # Accept [1, S] or [S]: one sequence per input.
        is_image = self.image_mask.bool().reshape(-1)
        if is_image.numel() != self.input_ids.shape[-1]:
            raise ConversionError(
                f"{self.name}: image mask has {is_image.numel()} positions, the sequence {self.input_ids.shape[-1]}"
            )
        return {"text": ~is_image, "image": is_image}


def synthetic_image():
    """Deterministic RGB test card: colour gradients plus a checkerboard (edges for the patches)."""
    from PIL import Image

    w, h = SYNTHETIC_IMAGE_SIZE
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = (((x // 14) + (y // 14)) % 2) * 60
    rgb = torch.stack([(x * 255) // (w - 1), (y * 255) // (h - 1), (255 - (x + y) * 255 // (w + h - 2))], -1)
    rgb = (rgb + checker[..., None]).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), mode="RGB")


def _load_tokenizer(hf_src: Path):
    if not ((hf_src / "tokenizer.json").is_file() or (hf_src / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_src), trust_remote_code=False)
    except Exception:  # a broken or remote-code tokenizer: fall back to deterministic ids
        return None


class TextEncoder:
    """Token ids for text: the checkpoint's tokenizer when it has one, else deterministic ids."""

    def __init__(self, hf_src: Path, vocab_size: int, reserved: set[int]):
        self.tokenizer = _load_tokenizer(hf_src)
        self.vocab_size = vocab_size
        self.reserved = reserved

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if all(0 <= i < self.vocab_size for i in ids):
                return list(ids)
        # No usable tokenizer: one id per byte, spread over the vocab, never a special (vision) id.
        usable = [i for i in range(min(self.vocab_size, 4096)) if i not in self.reserved]
        return [usable[(b * 131 + i * 7) % len(usable)] for i, b in enumerate(text.encode())]

    def has_token(self, token: str) -> bool:
        if self.tokenizer is None:
            return False
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return isinstance(tid, int) and tid != self.tokenizer.unk_token_id and 0 <= tid < self.vocab_size


def paired_inputs(prepare, spec, hf_src: Path, prompt: str, image, text_only: bool) -> list[VerifyInput]:
    """Inputs from a family's ``prepare(spec, hf_dir, *, prompt, image)`` that returns
    ``(hf_kwargs, mcore_kwargs, image_mask)`` for one sequence: the text-only one, then the image one."""
    inputs = []
    if text_only:
        inputs.append(VerifyInput("text-only", *prepare(spec, hf_src, prompt=prompt, image=None)))
    if image is not None:
        name, pil = image
        inputs.append(VerifyInput(name, *prepare(spec, hf_src, prompt=prompt, image=pil.convert("RGB"))))
    return inputs


def build_inputs(spec, hf_src, *, prompt=None, image=None, synthetic_image_=True, text_only=True) -> list[VerifyInput]:
    hf_src = Path(hf_src)
    prompt = prompt or DEFAULT_PROMPT
    picture = None
    if image is not None:
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise ConversionError(f"{path}: image file not found")
        try:
            picture = (f"image:{path.name}", Image.open(path))
        except Exception as exc:
            raise ConversionError(f"{path}: cannot read image ({exc})") from exc
    elif synthetic_image_:
        picture = ("image:synthetic", synthetic_image())
    from ckptconv.families import get_family

    inputs = get_family(spec.family).verify_inputs(spec, hf_src, prompt=prompt, image=picture, text_only=text_only)
    if not inputs:
        raise ConversionError("nothing to verify: both the text-only and the image input are disabled")
    return inputs
