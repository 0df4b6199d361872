"""``ckptconv.json``: what a converted checkpoint is, so it can be exported and checked later
without the original model at hand."""

from __future__ import annotations

import json
from pathlib import Path

import ckptconv
from ckptconv.errors import ConversionError
from ckptconv.formats.checksum import checksum_file

MANIFEST_NAME = "ckptconv.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE_DIR = "release"


def versions() -> dict:
    """Versions of what wrote the checkpoint (from package metadata: importing megatron-core or
    transformers only to read a version string would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "ckptconv": ckptconv.__version__,
        "torch": of("torch"),
        "megatron_core": of("megatron-core"),
        "transformers": of("transformers"),
        "safetensors": of("safetensors"),
    }


def write_manifest(out: Path, manifest: dict) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(checkpoint: Path) -> dict | None:
    """The manifest of a ckptconv checkpoint (OUT or OUT/release), or None for one Megatron wrote."""
    for candidate in (Path(checkpoint) / MANIFEST_NAME, Path(checkpoint).parent / MANIFEST_NAME):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise ConversionError(f"{candidate}: not valid JSON: {exc}") from None
    return None


def check_checkpoint(out: Path) -> list[str]:
    """Re-hash every file the manifest lists; return the problems (empty when intact)."""
    manifest = read_manifest(out)
    if manifest is None:
        raise ConversionError(f"{out}: no {MANIFEST_NAME}; not a checkpoint written by ckptconv")
    problems = []
    for rel, expected in sorted(manifest.get("files", {}).items()):
        path = Path(out) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif checksum_file(path) != expected:
            problems.append(f"{rel}: checksum mismatch")
    return problems
