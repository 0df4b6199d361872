"""Sharing a conversion over ``torchrun`` ranks with torch.distributed (gloo: conversion is I/O,
not GPU work). Without torchrun everything here degrades to the single-process case."""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

from ckptconv.errors import ConversionError

T = TypeVar("T")


def _dist():
    """torch.distributed when this process can be in a group: under torchrun (WORLD_SIZE > 1) or
    when something (a test, verify) has imported it already. A lone conversion never imports it:
    that import alone takes longer than converting a small model."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "torch.distributed" in sys.modules:
        import torch.distributed as dist

        return dist if dist.is_available() else None
    return None


_joined = False
"""True while this module owns the process group (it joined it in :func:`init_from_env`)."""


def init_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise do nothing."""
    global _joined
    dist = _dist()
    if dist is not None and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        _joined = True


def shutdown() -> None:
    """Leave the process group cleanly: a gloo group left to process exit can abort the process
    ("terminate called without an active exception") after the work is done. Only a group
    :func:`init_from_env` joined: one the caller set up (verify's, megatron-core's) stays theirs."""
    global _joined
    dist = _dist()
    if _joined and dist is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _joined = False


def active() -> bool:
    dist = _dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if active():
        return _dist().get_rank(), _dist().get_world_size()
    return 0, 1


def barrier() -> None:
    if active():
        _dist().barrier()


def all_gather(obj) -> list:
    if not active():
        return [obj]
    dist = _dist()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_rank0(obj) -> list | None:
    if not active():
        return [obj]
    dist = _dist()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def raise_if_any_failed(error: BaseException | None) -> None:
    """A collective step: if any rank failed, every rank raises (so none waits forever)."""
    messages = all_gather(None if error is None else f"{error}")
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise ConversionError(f"rank {rank} failed: {message}")


def first_error_everywhere(fn: Callable[[], T]) -> T:
    error, result = None, None
    try:
        result = fn()
    except ConversionError as exc:
        error = exc
    raise_if_any_failed(error)
    return result


def sum_counters(summary):
    """Add up every rank's counters into the summary (all ranks get the totals)."""
    fields = ("tensors_read", "tensors_written", "objects_written", "bytes_read", "bytes_written")
    per_rank = all_gather({f: getattr(summary, f) for f in fields})
    for f in fields:
        setattr(summary, f, sum(counts[f] for counts in per_rank))
    return summary
