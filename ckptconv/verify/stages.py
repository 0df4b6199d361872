"""What a family declares for layer-streamed verify: its stages, as a module of each model.

A *stage* is one unit of the forward pass -- the token embedding, one vision block, the vision
merger or projector, one decoder layer, the final norm, the output layer -- named by its dotted
module path in the Hugging Face model and in the family's Megatron model. The layerwise runner
(:mod:`ckptconv.verify.layerwise`) reads each stage's weights just before that module runs and
frees them after, and compares the two modules' outputs. Families list their stages in data-flow
order (``Family.layerwise_stages``); the order is the one "first stage outside tolerance" refers to.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQ_FIRST = "seq_first"
"""Megatron activation ``[S, B, ...]`` against HF ``[B, S, ...]`` (language-model stages)."""
SAME = "same"
"""Both sides have the same layout (vision stages, which both sides run as HF modules or alike)."""


@dataclass(frozen=True)
class RouterProbe:
    """One expert pool's router inside a stage (paths relative to the stage module).

    HF routers return ``(logits, weights, chosen expert indices [N, k])``; megatron-core routers
    ``(probs, routing_map [N, E])``. The runner compares the chosen sets token by token.
    """

    pool: str
    hf_module: str
    mcore_module: str


@dataclass(frozen=True)
class Stage:
    name: str
    """``embedding``, ``vision.block.3``, ``vision.merger``, ``decoder.layer.5``, ``final_norm``, ``output``..."""
    hf_module: str | None
    """Dotted path in the HF model: hooked, and its parameters are the stage's HF weights. None for a
    Megatron part with no HF counterpart that the compared forward never runs (Step3.7's MTP layers:
    transformers drops them); its keys are still checked against the checkpoint, its values are not
    compared, and the report lists it."""
    mcore_module: str
    """Dotted path in the family's Megatron model: hooked, its parameters are the stage's checkpoint slice."""
    layout: str = SEQ_FIRST
    hf_extra: tuple[str, ...] = ()
    """Further modules whose parameters the stage needs loaded."""
    mcore_extra: tuple[str, ...] = ()
    """E.g. the embedding, for an output layer tied to it (GPTModel passes its weight in)."""
    routers: tuple[RouterProbe, ...] = ()


def output_stage(spec, hf_module: str = "lm_head", mcore_module: str = "language_model.output_layer") -> Stage:
    """The output layer; a tied one also needs the word embeddings loaded on the Megatron side."""
    tied = ("language_model.embedding",) if spec.tie_word_embeddings else ()
    return Stage("output", hf_module, mcore_module, mcore_extra=tied)
