"""What writing a torch_dist ``.metadata`` costs: ckptconv's torch-free emitter against DCP's own
classes through ``pickle`` (what ``dcp_metadata_pickle`` picks when torch is already imported).

    .venv/bin/python scripts/bench_metadata.py [--chunks 8000 80000] [--repeat 3]

Each size is a metadata of N chunks shaped like a MoE checkpoint's (N/8 keys of 8 chunks, bf16);
80 000 chunks is Step3.7's real size (42 MoE layers x 288 experts x 3 expert chunks, plus the TP
chunks of the dense tensors). CPU seconds (``process_time``) of this process, fastest of --repeat,
so that other load on the machine counts less. The import cost of torch + DCP, which the torch-free
path avoids, is measured in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

IMPORT_PROBE = (
    "import time; t = time.process_time(); import torch; a = time.process_time() - t; t = time.process_time(); "
    "import torch.distributed.checkpoint.metadata, torch.distributed.checkpoint.filesystem; "
    "print(a, time.process_time() - t)"
)


def metadata_of(n_chunks: int):
    from ckptconv.formats.array import DTYPES
    from ckptconv.formats.torch_dist import CheckpointMetadata, ChunkMeta, StorageInfo, TensorMeta

    bf16 = next(d for d in DTYPES if d.torch_name == "bfloat16")
    entries, storage = {}, {}
    for k in range(n_chunks // 8):
        key = f"language_model.decoder.layers.{k // 36}.mlp.experts.experts.linear_fc1.weight.{k}"
        chunks = [ChunkMeta((k % 288, r * 160, 0), (1, 160, 4096)) for r in range(8)]
        entries[key] = TensorMeta(bf16, (288, 1280, 4096), chunks)
        for rank, chunk in enumerate(chunks):
            storage[(key, chunk.offsets)] = StorageInfo(f"__{rank}_0.distcp", 123_456_789 * rank, 1 << 20)
    return CheckpointMetadata(entries, storage)


def fastest(fn, repeat: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(repeat):
        t = time.process_time()
        size = len(fn())
        best = min(best, time.process_time() - t)
    return best, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8000, 80000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    imports = [tuple(map(float, subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True,
                                                check=True).stdout.split())) for _ in range(args.repeat)]
    torch_s, dcp_s = min(i[0] for i in imports), min(i[1] for i in imports)
    print(f"import torch: {torch_s:.2f} s CPU; torch.distributed.checkpoint on top: {dcp_s:.2f} s CPU")
    from ckptconv.formats.torch_dist import dcp_metadata_pickle

    print("| chunks | torch-free emitter s | MB | DCP classes + pickle s | MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.chunks:
        metadata = metadata_of(n)
        ours = fastest(lambda: dcp_metadata_pickle(metadata, checkpoint_id="/ckpt/release", save_id="id", use_torch=False), args.repeat)
        theirs = fastest(lambda: dcp_metadata_pickle(metadata, checkpoint_id="/ckpt/release", save_id="id", use_torch=True), args.repeat)
        print(f"| {n} | {ours[0]:.2f} | {ours[1] / 1e6:.1f} | {theirs[0]:.2f} | {theirs[1] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
