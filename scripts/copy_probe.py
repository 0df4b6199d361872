"""How fast can this machine copy a checkpoint's tensors file to file, and what slows it down?

The measurements behind three design choices of the writers (docs/benchmarks.md, "Where the time
went"): ``copy_file_range`` of each tensor's byte range (what the converter does) against one call
per whole file (what ``cat`` does); with the destination offset page-congruent to the source offset
or not; and with 1, 2 or 3 threads, each writing its own file (the converter's writer lanes).

    .venv/bin/python scripts/copy_probe.py SRC_DIR [--repeat 5]

SRC_DIR: a safetensors checkpoint (e.g. one ``make_real_width`` built). Every variant runs
``--repeat`` times, interleaved, after ``sync``; medians are printed. The page cache is left warm
(the source is read once first), as in ``scripts/bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

PAGE = 4096


def tensor_ranges(src: Path) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every tensor, in file order."""
    ranges = []
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                ranges.append((str(path), 8 + n + start, end - start))
    return sorted(ranges, key=lambda r: (r[0], r[1]))


def copy_ranges(ranges, out_path: str, congruent: bool) -> None:
    fds: dict[str, int] = {}
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for path, offset, length in ranges:
            fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
            if congruent:  # pad so the destination sits where the source does within a page
                pad = (offset - os.lseek(out, 0, os.SEEK_CUR)) % PAGE
                if pad:
                    os.write(out, b"\0" * pad)
            done = 0
            while done < length:
                done += os.copy_file_range(fd, out, length - done, offset + done)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)


def whole_files(src: Path, out_path: str) -> None:
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for path in sorted(src.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        size, done = os.fstat(fd).st_size, 0
        while done < size:
            done += os.copy_file_range(fd, out, size - done)
        os.close(fd)
    os.close(out)


def threaded(ranges, out_prefix: str, threads: int) -> None:
    lanes: list[list] = [[] for _ in range(threads)]
    loads = [0] * threads
    for r in sorted(ranges, key=lambda r: -r[2]):  # largest first onto the least loaded lane
        lane = loads.index(min(loads))
        lanes[lane].append(r)
        loads[lane] += r[2]
    workers = [threading.Thread(target=copy_ranges, args=(sorted(lane, key=lambda r: (r[0], r[1])), f"{out_prefix}.{i}", True))
               for i, lane in enumerate(lanes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ranges = tensor_ranges(args.src)
    for path in {r[0] for r in ranges}:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    variants = {
        "whole files (cat)": lambda out: whole_files(args.src, out),
        "tensor ranges": lambda out: copy_ranges(ranges, out, congruent=False),
        "tensor ranges, page-congruent": lambda out: copy_ranges(ranges, out, congruent=True),
        "2 threads, 2 files, congruent": lambda out: threaded(ranges, out, 2),
        "3 threads, 3 files, congruent": lambda out: threaded(ranges, out, 3),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(dir=args.src.parent) as scratch:
        for _ in range(args.repeat):
            for name, run in variants.items():
                out = os.path.join(scratch, "out")
                os.sync()
                start = time.perf_counter()
                run(out)
                times[name].append(time.perf_counter() - start)
                for leftover in Path(scratch).iterdir():
                    leftover.unlink()
    total = sum(r[2] for r in ranges) / 1e9
    print(f"{total:.2f} GB, {len(ranges)} tensors, median of {args.repeat}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:32s} {median:6.3f} s  {total / median:5.2f} GB/s")


if __name__ == "__main__":
    main()
