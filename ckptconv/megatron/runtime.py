"""Process-group and model-parallel setup for building Megatron models (verify, export, tests).

One entry point, :func:`init_parallel`, works the same way in three situations:

* under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment): joins that group;
* in a plain process: creates a one-process group on a free localhost port, so ``tp=1`` code paths
  (dist_checkpointing, parallel_state) run without a launcher;
* when already initialized with the same sizes: does nothing (idempotent), with other sizes: rebuilds
  the model-parallel groups.

The backend follows the device: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ckptconv.errors import ConversionError

DEFAULT_SEED = 1234


@dataclass
class _State:
    sizes: tuple[int, int, int] | None = None  # (tp, pp, ep) the model-parallel groups were built with
    device: torch.device | None = None
    owns_process_group: bool = False  # True when we created the default group (then we destroy it)


_state = _State()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; asking for CUDA without one is an error, not a fallback."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError("--device cuda was requested but torch sees no CUDA device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConversionError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        # No launcher: a group of one, so parallel_state and dist_checkpointing have something to use.
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    _state.owns_process_group = True


def _seed(seed: int, device: torch.device) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(seed)
    if device.type == "cuda":
        tp_random.model_parallel_cuda_manual_seed(seed)
    else:
        # model_parallel_cuda_manual_seed reads CUDA RNG state. On CPU, weights are initialized from
        # the CPU generator (use_cpu_initialization) and the tracker's fork is a null context (shims),
        # so an empty, initialized tracker is all that is needed.
        tp_random.initialize_rng_tracker(force_reset=True)
        tp_random.get_cuda_rng_tracker().reset()


def init_parallel(
    tp: int = 1, pp: int = 1, ep: int = 1, device: str | torch.device = "auto", seed: int = DEFAULT_SEED
) -> torch.device:
    """Initialize torch.distributed and megatron's parallel_state; return the device to build on."""
    from megatron.core import parallel_state

    from ckptconv.megatron import shims

    dev = resolve_device(device)
    shims.install()
    if not dist.is_initialized():
        _init_process_group(dev)
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or ep < 1:
        raise ConversionError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} ep={ep}")
    if world % (tp * pp):
        raise ConversionError(
            f"world size {world} is not divisible by tp*pp = {tp}*{pp}; "
            f"launch with torchrun --nproc-per-node {tp * pp} (or a multiple)"
        )
    if (world // (tp * pp)) % ep:
        raise ConversionError(f"expert parallel size {ep} does not divide the data-parallel size {world // (tp * pp)}")

    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if _state.sizes == (tp, pp, ep) and parallel_state.model_parallel_is_initialized():
        return dev
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    _seed(seed, dev)
    _state.sizes = (tp, pp, ep)
    _state.device = dev
    return dev


def destroy_parallel() -> None:
    """Tear down what :func:`init_parallel` set up (the process group only if we created it)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _state.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _state.sizes = None
    _state.device = None
    _state.owns_process_group = False


def is_rank0() -> bool:
    """True outside torch.distributed and on global rank 0; used to print once under torchrun."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
