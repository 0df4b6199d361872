"""Per-file checksums recorded in ``ckptconv.json`` and computed while writing."""

from __future__ import annotations

from pathlib import Path

import xxhash

CHECKSUM = "xxh3_128"
"""Per-file checksums guard against corruption (truncation, bit rot, a partial copy), not against
an adversary; xxh3 runs at memory speed, where sha256 would cost as much as the conversion."""


def new_checksum():
    return xxhash.xxh3_128()


def checksum_bytes(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def checksum_file(path: Path, block: int = 1 << 24) -> str:
    digest = new_checksum()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
