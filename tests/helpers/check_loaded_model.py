"""Run under torchrun (or alone): build the family's real megatron-core model at TP = world size,
load CKPT with `dist_checkpointing.load` (strict), and check every parameter shard equals the HF
source (HF_DIR) put through the mapping table. Prints one line per rank and exits non-zero on a
mismatch.

Arguments: ``CKPT HF_DIR TP [EP]``, or several ``CKPT HF_DIR TP EP`` groups checked one after the
other in the same processes (one torchrun start for many checkpoints)."""

import sys

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from ckptconv.pipeline.hf_to_mcore import global_tensors_in_memory
from ckptconv.core.layout import ParallelLayout
from ckptconv.megatron import runtime
from ckptconv.megatron.load import _leaves, build_and_load


def main(ckpt: str, hf_dir: str, tp: int, ep: int) -> None:
    runtime.init_parallel(tp=tp, ep=ep, device="cpu")
    model, spec = build_and_load(ckpt)
    expected = global_tensors_in_memory(hf_dir, ParallelLayout(tp=tp, ep=ep))
    checked, bad = 0, []
    for leaf in _leaves(model.sharded_state_dict()):
        if not isinstance(leaf, ShardedTensor):
            continue
        extents = (1,) * leaf.prepend_axis_num + tuple(leaf.local_shape)
        region = expected[leaf.key][tuple(slice(o, o + n) for o, n in zip(leaf.global_offset, extents))]
        if not torch.equal(region.reshape(leaf.data.shape), leaf.data):
            bad.append(leaf.key)
        checked += 1
    rank = torch.distributed.get_rank()
    print(f"rank {rank}: {ckpt} tp={tp} ep={ep}: {checked} shards checked, {len(bad)} differ {bad[:3]}", flush=True)
    if bad or not checked:
        sys.exit(1)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) <= 4:
        main(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else 1)
    else:
        for i in range(0, len(args), 4):
            main(args[i], args[i + 1], int(args[i + 2]), int(args[i + 3]))
