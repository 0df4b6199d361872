"""Let megatron-core 0.16.1 run on a machine without CUDA.

megatron-core assumes CUDA in a handful of places that a CPU forward pass and
``dist_checkpointing.save/load`` go through. Each patch below replaces exactly one such call and is
applied only when ``torch.cuda.is_available()`` is False, so on a GPU machine this module does
nothing. Call :func:`install` before building a Megatron model; it is idempotent.
"""

from __future__ import annotations

import contextlib

import torch

_installed = False


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def install() -> bool:
    """Apply the CPU patches. Returns True when they were applied (no CUDA), False otherwise."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True

    # Rotary embeddings and the checkpoint saver place small tensors on
    # `torch.cuda.current_device()`; on CPU that call raises. A device string works everywhere.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # `dist_checkpointing` synchronizes the CUDA stream before writing; there is none on CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]

    # DotProductAttention always forks the CUDA RNG tracker (even in eval, for dropout);
    # the tracker's fork needs CUDA RNG state. Dropout on CPU uses the CPU generator anyway.
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

    # The fused-softmax fallback builds its default causal masks with device="cuda".
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    # Without Transformer Engine, `moe_utils` never defines `te_general_gemm` (the import sits in a
    # try block) but the router still reads the name: define it as "not available".
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    _installed = True
    return True
