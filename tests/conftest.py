"""Shared fixtures: tiny random HF checkpoints built from the real transformers config classes, and
helpers to run the CLI the way a user does (a subprocess, so exit codes and stderr are real)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ckptconv.families import FAMILIES, get_family

REPO = Path(__file__).resolve().parent.parent
HELPERS = REPO / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))  # helpers the tests import (check_loaded_model, tamper)

FAMILY_NAMES = [family.name for family in FAMILIES]
"""Every registered family: the conformance suite is parametrized over these."""

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`ckptconv ARGS...` as a subprocess; returns the completed process (never raises on exit code)."""
    return subprocess.run(
        [sys.executable, "-m", "ckptconv", *map(str, args)],
        capture_output=True, text=True, env=cli_env(), timeout=timeout, cwd=REPO,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script_or_module: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run under `torchrun --nproc-per-node N` on CPU (gloo)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *map(str, script_or_module),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=timeout, cwd=REPO)


class FamilyCase:
    """A registered family's tiny random checkpoint (seed 0) and what the tests make of it, each made
    once per session on first use: its spec, its conversions per (tp, ep), the conversion of another
    seed's weights, and verify against it."""

    def __init__(self, name: str, root: Path):
        self.family = get_family(name)
        self.root = root
        self.hf_dir = self.family.make_tiny(root / "hf", seed=0)
        self._converted: dict[tuple[int, int], Path] = {}

    @property
    def spec(self):
        from ckptconv.families import normalize_config
        from ckptconv.pipeline.source import read_config

        return normalize_config(read_config(self.hf_dir))

    def converted(self, tp: int = 1, ep: int = 1) -> Path:
        """``hf-to-mcore`` of the checkpoint at this layout (do not modify: copy it first)."""
        if (tp, ep) not in self._converted:
            from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

            out = self.root / f"mcore_tp{tp}_ep{ep}"
            convert_hf_to_mcore(str(self.hf_dir), out, tp=tp, ep=ep)
            self._converted[(tp, ep)] = out
        return self._converted[(tp, ep)]

    def converted_other_seed(self) -> Path:
        """A right conversion of different weights (seed 1, same shapes)."""
        out = self.root / "mcore_seed1"
        if not out.exists():
            from ckptconv.pipeline.hf_to_mcore import convert_hf_to_mcore

            convert_hf_to_mcore(str(self.family.make_tiny(self.root / "hf_seed1", seed=1)), out)
        return out

    def verify(self, ckpt, **options):
        """``ckptconv verify`` of this checkpoint's HF source against ``ckpt``, in process, on CPU."""
        from ckptconv.verify.runner import run_verify

        return run_verify(self.hf_dir, ckpt, device="cpu", **options)


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    """``case(family_name)`` -> that family's :class:`FamilyCase`, shared by the whole session."""
    cases: dict[str, FamilyCase] = {}

    def get(name: str) -> FamilyCase:
        if name not in cases:
            cases[name] = FamilyCase(name, tmp_path_factory.mktemp(name))
        return cases[name]

    return get


@pytest.fixture(scope="session")
def tiny_qwen(case) -> Path:
    """Tiny random Qwen2.5-VL, untied lm_head, GQA (4 heads, 2 KV groups), qkv bias, vocab 320
    (the conformance suite's Qwen checkpoint)."""
    return case("qwen2_5_vl").hf_dir


@pytest.fixture(scope="session")
def tiny_qwen_tied(tmp_path_factory) -> Path:
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_tied") / "hf", tie_word_embeddings=True, seed=1)


def read_safetensors_dir(directory: Path) -> dict:
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.fixture(scope="session")
def sharded_hub_qwen(tmp_path_factory):
    """The tiny Qwen2.5-VL as a user downloads a released model: sharded by ``save_pretrained``
    (8 ``model-0000i-of-00008.safetensors`` + index) and laid out as the huggingface_hub cache
    (``refs/main``, ``snapshots/<commit>/<file>`` -> ``../../blobs/<etag>``). Returns
    ``(cache_dir, repo_id, snapshot_dir, plain_dir)``; ``plain_dir`` is the same model as written."""
    from ckptconv.families.qwen2_5_vl.fixtures import make_tiny_qwen2_5_vl
    from ckptconv.fixtures import make_hub_cache

    root = tmp_path_factory.mktemp("hub_qwen")
    plain = make_tiny_qwen2_5_vl(root / "download", seed=3, max_shard_size="100KB")
    repo_id = "tiny-org/Tiny-Qwen2.5-VL"
    snapshot = make_hub_cache(root / "hub", repo_id, plain)
    return root / "hub", repo_id, snapshot, plain
