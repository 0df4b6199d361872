"""Load converted checkpoints into the family's real megatron-core model and check them against the
HF source, independently of the converter.

For each run ``CKPT HF_DIR TP EP`` (as many as given, in one process group, so the process start is
paid once): build the family's Megatron model at that layout, ``dist_checkpointing.load`` it
strictly (every key the model asks for, nothing else), then

* every parameter shard this rank holds must equal the same region of the tensor the independent
  reference (``tests/oracles/hf_reference.py``: hand-written from the HF on-disk names, no ckptconv
  table or transform) makes from the HF source -- vocab padding rows must be zero;
* with ``--logits``, the logits on verify's text-only and image inputs must match ``transformers``'
  model of HF_DIR.

Run under torchrun (``--nproc-per-node`` = TP x EP) or alone. Prints per run and rank one line
``rank R: CKPT tp= ep=: N shards checked, M differ`` and one JSON line (``CONFORMANCE {...}``; with
``--out DIR`` also one file per run and rank, with the shards the rank holds) and exits non-zero if
anything differs. Importable: the suite's TP=1 checks
call :func:`check_parameters` in process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the oracles package

from oracles.hf_reference import reference_tensors  # noqa: E402

TOLERANCE = 1e-4  # fp32 max |logit difference|: the implementations differ in summation order only
PADDED_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def expected_global(reference: dict[str, torch.Tensor], key: str, global_shape) -> torch.Tensor:
    """The reference tensor for ``key`` at the checkpoint's global shape (vocab rows zero-padded)."""
    if key not in reference:
        raise KeyError(f"{key}: the independent reference has no tensor for this model key")
    tensor = reference[key]
    if key.endswith(PADDED_ROWS) and tensor.shape[0] < global_shape[0]:
        tensor = torch.cat([tensor, tensor.new_zeros(global_shape[0] - tensor.shape[0], *tensor.shape[1:])])
    return tensor


def shard_owners(model) -> dict[str, list]:
    """This rank's shards as ``[key, global offset]``: all of them, and those it holds the main
    replica of (``replica_id`` all zero: the copy a Megatron save writes). Across the ranks, every
    shard must have exactly one main replica, or training saves would drop or double it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from ckptconv.megatron.load import _leaves

    held, main = [], []
    for leaf in _leaves(model.sharded_state_dict()):
        if isinstance(leaf, ShardedTensor):
            shard = [leaf.key, list(leaf.global_offset)]
            held.append(shard)
            replica = leaf.replica_id if isinstance(leaf.replica_id, tuple) else (leaf.replica_id,)
            if all(r == 0 for r in replica):
                main.append(shard)
    return {"held": held, "main": main}


def check_parameters(model, hf_dir, family: str) -> tuple[int, list[str]]:
    """(shards checked, keys whose local shard differs from the reference) for this rank's model."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from ckptconv.megatron.load import _leaves

    reference = reference_tensors(hf_dir, family)
    checked, differ = 0, []
    for leaf in _leaves(model.sharded_state_dict()):
        if not isinstance(leaf, ShardedTensor):
            continue
        full = expected_global(reference, leaf.key, leaf.global_shape)
        if tuple(full.shape) != tuple(leaf.global_shape):
            differ.append(f"{leaf.key} (shape {list(full.shape)} vs {list(leaf.global_shape)})")
            continue
        extents = (1,) * leaf.prepend_axis_num + tuple(leaf.local_shape)
        region = full[tuple(slice(o, o + n) for o, n in zip(leaf.global_offset, extents))]
        if not torch.equal(region.reshape(leaf.data.shape).to(leaf.data.dtype), leaf.data):
            differ.append(leaf.key)
        checked += 1
    return checked, differ


@torch.no_grad()
def logits_vs_hf(model, spec, hf_dir) -> dict[str, float]:
    """Max |logit difference| against transformers' model of ``hf_dir``, per verify input."""
    from ckptconv.verify.inputs import build_inputs
    from ckptconv.verify.runner import _hf_logits

    inputs = build_inputs(spec, Path(hf_dir))
    reference = _hf_logits(Path(hf_dir), spec, inputs, torch.float32, torch.device("cpu"))
    return {inp.name: float((model(**inp.mcore_kwargs).float() - ref).abs().max()) for inp, ref in zip(inputs, reference)}


def main(runs: list[tuple[str, str, int, int]], out_dir: Path | None = None, logits: bool = False) -> int:
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import build_and_load

    failed = False
    for ckpt, hf_dir, tp, ep in runs:
        runtime.init_parallel(tp=tp, ep=ep, device="cpu")
        model, spec = build_and_load(ckpt)
        checked, differ = check_parameters(model, hf_dir, spec.family)
        max_abs = logits_vs_hf(model, spec, hf_dir) if logits else {}
        ok = checked > 0 and not differ and max(max_abs.values(), default=0.0) <= TOLERANCE
        failed |= not ok
        rank = torch.distributed.get_rank()
        result = {"family": spec.family, "tp": tp, "ep": ep, "rank": rank, "checked": checked,
                  "differ": differ[:5], "logits_max_abs": max_abs, "ok": ok}
        print(f"rank {rank}: {ckpt} tp={tp} ep={ep}: {checked} shards checked, {len(differ)} differ {differ[:3]}", flush=True)
        print("CONFORMANCE " + json.dumps(result), flush=True)
        if out_dir is not None:  # the full record, shard lists included (too long for interleaved stdout)
            (out_dir / f"{spec.family}-tp{tp}-ep{ep}-rank{rank}.json").write_text(json.dumps({**result, **shard_owners(model)}))
    runtime.destroy_parallel()
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    out, with_logits = None, False
    while args[:1] in (["--out"], ["--logits"]):
        if args[0] == "--out":
            out, args = Path(args[1]), args[2:]
        else:
            with_logits, args = True, args[1:]
    if not args or len(args) % 4:
        sys.exit("usage: check_loaded_model.py [--out DIR] [--logits] CKPT HF_DIR TP EP [CKPT HF_DIR TP EP ...]")
    runs = [(args[i], args[i + 1], int(args[i + 2]), int(args[i + 3])) for i in range(0, len(args), 4)]
    sys.exit(main(runs, out, with_logits))
