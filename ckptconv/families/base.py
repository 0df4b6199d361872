"""What a model family provides: the :class:`Family` interface.

A family is one package, ``ckptconv/families/<name>/``, plus one table, ``mappings/<name>.toml``:

=================  ==========================================================================
``config.py``      ``normalize(config) -> ModelSpec``: nested or flat ``config.json`` -> the spec
``transforms.py``  (only if the table names transforms the core lacks) ``TRANSFORMS``
``model.py``       ``build_model`` / ``hf_config``: the Megatron model verify loads, the HF config
``inputs.py``      ``verify_inputs``: the same text and image inputs for both models
``fixtures.py``    ``make_tiny`` / ``real_width_config``: random checkpoints for tests and benchmarks
``__init__.py``    ``FAMILY``: the :class:`Family` subclass wiring the above together
=================  ==========================================================================

The registry (``ckptconv/families/__init__.py``) lists the ``FAMILY`` objects explicitly. Conversion
imports only ``config.py`` and ``transforms.py`` (no torch); the other parts are imported when verify,
the tests or the benchmarks call them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from ckptconv.errors import ConversionError

if TYPE_CHECKING:  # only for annotations: importing them costs torch
    import torch

    from ckptconv.core.spec import ModelSpec
    from ckptconv.core.transforms import Transform
    from ckptconv.verify.inputs import VerifyInput


class Family(ABC):
    name: str
    """Registry key, ``ModelSpec.family`` and the mapping table's name (``mappings/<name>.toml``)."""
    title: str
    """How people call it (``Qwen2.5-VL``)."""
    model_types: tuple[str, ...]
    """``model_type`` values of ``config.json`` this family reads (transformers' and remote-code)."""

    # ------------------------------------------------------------------ conversion (no torch)
    @abstractmethod
    def normalize(self, config: dict) -> "ModelSpec":
        """``config.json`` as read -> the spec every other module reads."""

    def transforms(self) -> dict[str, "Transform"]:
        """Transforms of the family's own that its table names (the core vocabulary is implied)."""
        return {}

    # ------------------------------------------------------------------ verify (torch, megatron-core)
    @abstractmethod
    def build_model(self, spec: "ModelSpec", *, padded_vocab_size: int, dtype: "torch.dtype") -> "torch.nn.Module":
        """The Megatron model a converted checkpoint loads into; its ``sharded_state_dict()`` is the
        key contract the table writes."""

    @abstractmethod
    def hf_config(self, spec: "ModelSpec"):
        """The transformers config object for the HF reference (flat configs are not readable by
        transformers itself)."""

    @abstractmethod
    def verify_inputs(self, spec: "ModelSpec", hf_dir: Path, *, prompt: str, image, text_only: bool) -> list["VerifyInput"]:
        """The text-only input (when ``text_only``) and the image input (when ``image`` is a
        ``(name, PIL image)`` pair), as each model takes them."""

    # ------------------------------------------------------------------ fixtures (tests, benchmarks)
    @abstractmethod
    def make_tiny(self, out_dir, *, seed: int = 0, **options) -> Path:
        """A tiny random checkpoint written by the ``transformers`` classes."""

    @abstractmethod
    def real_width_config(self, variant: str | None, num_layers: int, vision_layers: int, num_experts: int | None):
        """``(model_cls, config)`` with published widths and ``num_layers`` decoder layers."""

    def zero_centered_norm(self, hf_name: str) -> bool:
        """True for norm weights applied as ``(1 + w)`` (random fixtures centre them on 0)."""
        return False

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def require(cfg: dict, key: str, where: str):
    """Read a required config field, or fail naming it."""
    if key not in cfg or cfg[key] is None:
        raise ConversionError(f"{where}: required field {key!r} is missing")
    return cfg[key]
