"""Run under torchrun (or alone): build the family's real megatron-core model at TP = world size,
fill it with the HF weights (HF_DIR) through the mapping table, and save it with megatron-core's own
`dist_checkpointing.save` into OUT -- a checkpoint exactly as a Megatron training job writes it
(no ckptconv.json, no config.json)."""

import multiprocessing
import sys

import torch

from ckptconv.families import normalize_config
from ckptconv.pipeline.hf_to_mcore import global_tensors_in_memory
from ckptconv.core.layout import ParallelLayout
from ckptconv.megatron import runtime
from ckptconv.megatron.load import fill_from_global_tensors, model_builder
from ckptconv.pipeline.source import read_config


def main(hf_dir: str, out: str, tp: int) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # The async writer's result queue would spawn a Manager that re-imports __main__; fork instead.
    filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    runtime.init_parallel(tp=tp, device="cpu")
    spec = normalize_config(read_config(__import__("pathlib").Path(hf_dir)))
    layout = ParallelLayout(tp=tp)
    model = model_builder(spec.family)(spec, padded_vocab_size=layout.padded_vocab_size(spec.vocab_size), dtype=torch.float32)
    fill_from_global_tensors(model, global_tensors_in_memory(hf_dir, layout))
    if torch.distributed.get_rank() == 0:
        __import__("os").makedirs(out, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), out)
    torch.distributed.barrier()
    print(f"rank {torch.distributed.get_rank()}: saved", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
