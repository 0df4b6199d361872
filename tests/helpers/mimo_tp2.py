"""Run under torchrun --nproc-per-node 2 with triples HF_DIR CKPT SAVE_DIR ...: for each, verify CKPT
through megatron-core's own MimoModel at TP=2 (strict load; logits against transformers on rank 0),
then save that loaded MimoModel with megatron-core's own `dist_checkpointing.save` into SAVE_DIR (a
mimo-layout checkpoint exactly as a TP=2 training job writes it). Rank 0 prints one JSON line per
triple: {"family", "passed", "max_abs", "image_tokens"}."""

import json
import multiprocessing
import sys

import torch


def main(args: list[str]) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import build_and_load
    from ckptconv.verify.runner import run_verify

    # The async writer's result queue would spawn a Manager that re-imports __main__; fork instead.
    filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    for hf_dir, ckpt, save_dir in zip(args[0::3], args[1::3], args[2::3]):
        report = run_verify(hf_dir, ckpt, tp=2, device="cpu", megatron_model="mimo")
        model, spec = build_and_load(ckpt, model="mimo")
        if torch.distributed.get_rank() == 0:
            __import__("os").makedirs(save_dir, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), save_dir)
        torch.distributed.barrier()
        if runtime.is_rank0():
            print(json.dumps({
                "family": spec.family,
                "megatron_model": report.megatron_model,
                "passed": report.passed,
                "max_abs": max(m.max_abs for r in report.results for m in r.groups.values() if m is not None),
                "image_tokens": sum(r.groups["image"].n_tokens for r in report.results if r.groups["image"] is not None),
            }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
