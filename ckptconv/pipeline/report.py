"""What a run reports: progress while it works, a summary table (or JSON) when done."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field

# rich is imported where a table or a bar is drawn: a --json run never draws one, and the import
# is a measurable part of converting a small model.


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Summary:
    command: str
    source: str
    output: str
    family: str = ""
    tensors_read: int = 0
    tensors_written: int = 0
    objects_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    ranks: int = 1
    layout: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def finish(self) -> "Summary":
        self.seconds = round(time.perf_counter() - self._started, 3)
        self.peak_rss_bytes = peak_rss_bytes()
        return self

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(summary: Summary):
    from rich.table import Table

    table = Table(title=f"ckptconv {summary.command}: {summary.family}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    rate = summary.bytes_written / summary.seconds if summary.seconds else 0.0
    rows = [
        ("source", summary.source),
        ("output", summary.output),
        ("layout", ", ".join(f"{k}={v}" for k, v in summary.layout.items())),
        ("tensors read / written", f"{summary.tensors_read} / {summary.tensors_written}"),
        ("objects written", str(summary.objects_written)),
        ("bytes read / written", f"{_human(summary.bytes_read)} / {_human(summary.bytes_written)}"),
        ("seconds", f"{summary.seconds:.2f} ({_human(rate)}/s)"),
        ("peak memory (RSS)", _human(summary.peak_rss_bytes)),
        ("ranks", str(summary.ranks)),
    ]
    for label, value in rows:
        table.add_row(label, value)
    for note in summary.notes:
        table.add_row("note", note)
    return table


class _NoProgress:
    """What ``make_progress(False)`` returns: the same calls, drawing nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass


def make_progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
