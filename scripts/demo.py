"""`make demo`: build a tiny random Qwen2.5-VL locally, then run the main jobs on it with the real CLI:
hf-to-mcore (TP=2 layout), verify (HF vs Megatron logits, text and image), mcore-to-hf, and a
byte-for-byte comparison of the round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl


def run(*args: str) -> None:
    command = [sys.executable, "-m", "ckptconv", *args]
    print("\n$ ckptconv " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def main(root: str) -> None:
    root_dir = Path(root)
    hf_dir, mcore_dir, export_dir = root_dir / "hf", root_dir / "mcore", root_dir / "hf-export"
    print(f"building a tiny random Qwen2.5-VL in {hf_dir}")
    make_tiny_qwen2_5_vl(hf_dir)
    run("hf-to-mcore", str(hf_dir), str(mcore_dir), "--tp", "2")
    run("verify", str(hf_dir), str(mcore_dir))
    run("mcore-to-hf", str(mcore_dir), str(export_dir))
    original, exported = tensors(hf_dir), tensors(export_dir)
    same = original.keys() == exported.keys() and all(
        torch.equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original
    )
    print(f"\nround trip HF -> Megatron -> HF: {len(original)} tensors, bit-exact: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
