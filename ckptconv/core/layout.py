"""Parallel layout: TP / PP / EP sizes, their validation against a model, and how Megatron cuts a
tensor into the chunks each rank saves.

A torch_dist checkpoint stores *global* tensors as a set of chunks; any TP/PP/EP layout can load
any chunking. We still write the chunks a Megatron job of the requested layout would write, so a
checkpoint from ``--tp 2`` is laid out on disk like one saved by a TP=2 training run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptconv.errors import ConversionError
from ckptconv.core.spec import ModelSpec


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    """Expert tensor parallelism (Megatron's ``expert_tensor_parallel_size``)."""
    make_vocab_size_divisible_by: int = 128

    def validate(self, spec: ModelSpec) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConversionError(message)

        for name in ("tp", "pp", "ep", "etp"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(spec.num_attention_heads % self.tp == 0,
             f"--tp {self.tp} does not divide num_attention_heads {spec.num_attention_heads}")
        need(spec.num_query_groups % self.tp == 0,
             f"--tp {self.tp} does not divide the {spec.num_query_groups} key/value groups (num_key_value_heads)")
        for layer, geometry in spec.layer_attention.items():
            for field in ("num_attention_heads", "num_query_groups"):
                value = getattr(geometry, field)
                need(value % self.tp == 0, f"--tp {self.tp} does not divide {field} {value} of layer {layer}")
        need(spec.ffn_hidden_size % self.tp == 0,
             f"--tp {self.tp} does not divide intermediate_size {spec.ffn_hidden_size}")
        need(spec.num_layers % self.pp == 0,
             f"--pp {self.pp} does not divide num_hidden_layers {spec.num_layers}")
        if spec.num_experts:
            for pool, experts in enumerate(spec.num_experts):
                need(experts % self.ep == 0, f"--ep {self.ep} does not divide the {experts} experts of pool {pool}")
            for pool, ffn in enumerate(spec.moe_ffn_hidden_size):
                need(ffn % self.etp == 0, f"--etp {self.etp} does not divide moe_intermediate_size {ffn} of pool {pool}")
        else:
            need(self.ep == 1, f"--ep {self.ep} given but the model has no experts")

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Megatron-LM's rule: pad to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return -(-vocab_size // multiple) * multiple


def split_ranges(size: int, parts: int, where: str) -> list[tuple[int, int]]:
    if size % parts:
        raise ConversionError(f"{where}: size {size} does not split into {parts} equal parts")
    step = size // parts
    return [(i * step, step) for i in range(parts)]


def tp_chunks(shard: str, shape: tuple[int, ...], tp: int, where: str) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """How Megatron's TP ranks split one tensor: list of ``(tp_rank, offsets, sizes)``.

    - ``replicated``: every rank holds it whole; rank 0 writes it.
    - ``column`` / ``vocab``: split along dim 0 (output features / vocab rows).
    - ``row``: split along dim 1 (input features).
    - ``glu``: SwiGLU fc1 = cat(gate, up): each rank holds a slice of gate *and* of up, saved as two
      chunks (megatron-core's ``apply_swiglu_sharded_factory``).
    """
    zeros = (0,) * len(shape)
    if shard == "replicated" or tp == 1 and shard != "glu":
        return [(0, zeros, tuple(shape))]
    if shard in ("column", "vocab", "row"):
        dim = 1 if shard == "row" else 0
        out = []
        for rank, (start, length) in enumerate(split_ranges(shape[dim], tp, where)):
            offsets = list(zeros)
            sizes = list(shape)
            offsets[dim], sizes[dim] = start, length
            out.append((rank, tuple(offsets), tuple(sizes)))
        return out
    if shard == "glu":
        half = shape[0] // 2
        out = []
        for part in (0, 1):  # gate half, then up half
            for rank, (start, length) in enumerate(split_ranges(half, tp, where)):
                out.append((rank, (part * half + start, *zeros[1:]), (length, *shape[1:])))
        return out
    raise ConversionError(f"{where}: unknown shard kind {shard!r}")
