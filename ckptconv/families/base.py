"""What a model family provides: the :class:`Family` interface.

A family is one package, ``ckptconv/families/<name>/``, plus one table, ``mappings/<name>.toml``:

=================  ==========================================================================
``config.py``      ``normalize(config) -> ModelSpec``: nested or flat ``config.json`` -> the spec
``transforms.py``  (only if the table names transforms the core lacks) ``TRANSFORMS``
``training.py``    ``training``: Megatron-LM ``args`` / Megatron-Bridge ``run_config.yaml`` fields (no torch)
``model.py``       ``build_model`` / ``hf_config``: the Megatron model verify loads, the HF config
``mimo.py``        ``build_mimo_model``: the same model as megatron-core's ``MimoModel`` (``--layout mimo``)
``inputs.py``      ``verify_inputs``: the same text and image inputs for both models
``stages.py``      ``layerwise_stages``: the forward pass as stages of both models (layerwise verify)
``fixtures.py``    ``make_tiny`` / ``real_width_config``: random checkpoints for tests and benchmarks
``__init__.py``    ``FAMILY``: the :class:`Family` subclass naming the family
=================  ==========================================================================

The registry (``ckptconv/families/__init__.py``) lists the ``FAMILY`` objects explicitly. Conversion
imports only ``config.py``, ``transforms.py`` and ``training.py`` (no torch); the other parts are imported when verify,
the tests or the benchmarks call them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ckptconv.errors import ConversionError

if TYPE_CHECKING:  # only for annotations: importing them costs torch
    import torch

    from ckptconv.core.spec import ModelSpec
    from ckptconv.core.transforms import Transform
    from ckptconv.pipeline.training import FamilyTraining
    from ckptconv.verify.inputs import VerifyInput
    from ckptconv.verify.stages import Stage


class Family:
    """A family: its identity, and one method per part of its package.

    Each method imports the part it needs on first use (``self.part("model")``): conversion must not
    pay for torch, megatron-core or transformers. A family overrides a method only where its package
    differs from the layout in the module docstring.
    """

    name: str
    """Registry key, ``ModelSpec.family``, the package name and the mapping table's name
    (``mappings/<name>.toml``)."""
    title: str
    """How people call it (``Qwen2.5-VL``)."""
    model_types: tuple[str, ...]
    """``model_type`` values of ``config.json`` this family reads (transformers' and remote-code)."""
    has_transforms: bool = False
    """True when the table names transforms of the family's own (``transforms.py``)."""

    def part(self, module: str) -> ModuleType:
        """The family's module ``module`` (``config``, ``model``, ...); a missing one is an error."""
        return importlib.import_module(f"ckptconv.families.{self.name}.{module}")

    # ------------------------------------------------------------------ conversion (no torch)
    def normalize(self, config: dict) -> "ModelSpec":
        """``config.json`` as read -> the spec every other module reads."""
        return self.part("config").normalize(config)

    def complete_config(self, config: dict, model_dir: Path) -> dict:
        """``config`` completed from the model directory's other files (tokenizer, processor), for
        what verify needs and the config may leave out (released configs name special tokens their own
        way). Returns a new dict; the default changes nothing. Conversion never depends on it."""
        return config

    def transforms(self) -> dict[str, "Transform"]:
        """Transforms of the family's own that its table names (the core vocabulary is implied)."""
        return self.part("transforms").TRANSFORMS if self.has_transforms else {}

    def training(self, spec: "ModelSpec") -> "FamilyTraining":
        """What Megatron-LM's ``args`` and Megatron-Bridge's ``run_config.yaml`` add for this family
        (``training.py``; see :mod:`ckptconv.pipeline.training`). No torch."""
        return self.part("training").training(spec)

    # ------------------------------------------------------------------ verify (torch, megatron-core)
    def build_model(self, spec: "ModelSpec", *, padded_vocab_size: int, dtype: "torch.dtype") -> "torch.nn.Module":
        """The Megatron model a converted checkpoint loads into; its ``sharded_state_dict()`` is the
        key contract the table writes."""
        return self.part("model").build_model(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)

    def build_mimo_model(self, spec: "ModelSpec", *, padded_vocab_size: int, dtype: "torch.dtype") -> "torch.nn.Module":
        """The same model as megatron-core's own ``MimoModel`` (vision tower as the ``images``
        encoder, projector as its input projection); its ``sharded_state_dict()`` is the key contract
        of the table's ``mimo`` key layout. ``forward`` takes the same inputs as ``build_model``'s."""
        return self.part("mimo").build_mimo_model(spec, padded_vocab_size=padded_vocab_size, dtype=dtype)

    def hf_config(self, spec: "ModelSpec"):
        """The transformers config object for the HF reference (flat configs are not readable by
        transformers itself)."""
        return self.part("model").hf_config(spec)

    def verify_inputs(self, spec: "ModelSpec", hf_dir: Path, *, prompt: str, image, text_only: bool) -> list["VerifyInput"]:
        """The text-only input (when ``text_only``) and the image input (when ``image`` is a
        ``(name, PIL image)`` pair), as each model takes them."""
        return self.part("inputs").verify_inputs(spec, hf_dir, prompt=prompt, image=image, text_only=text_only)

    def layerwise_stages(self, spec: "ModelSpec") -> list["Stage"]:
        """The forward pass as stages, in data-flow order, each a module of the HF model and of the
        Megatron model (:mod:`ckptconv.verify.stages`): what layerwise verify loads, runs and compares
        one at a time. Together they must hold every parameter of both models."""
        return self.part("stages").layerwise_stages(spec)

    # ------------------------------------------------------------------ fixtures (tests, benchmarks)
    def make_tiny(self, out_dir, *, seed: int = 0, **options) -> Path:
        """A tiny random checkpoint written by the ``transformers`` classes."""
        return self.part("fixtures").make_tiny(out_dir, seed=seed, **options)

    def real_width_config(self, variant: str | None, num_layers: int, vision_layers: int, num_experts: int | None):
        """``(model_cls, config)`` with published widths and ``num_layers`` decoder layers."""
        return self.part("fixtures").real_width_config(variant, num_layers, vision_layers, num_experts)

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
