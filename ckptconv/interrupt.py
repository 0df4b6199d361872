"""Ctrl-C at any moment: one line, exit status 130, no traceback, nothing left behind.

The entry point (:mod:`ckptconv.entry`) installs the handler before typer, rich or torch is
imported. The handler does not raise KeyboardInterrupt: it removes what the run registered with
:func:`removed_if_interrupted` (the staging directory of OUT, temporary directories), prints the
line and ends the process with ``os._exit(130)``.

Why not the usual KeyboardInterrupt: a Ctrl-C often lands inside ``import torch`` (1-2 s of a run
that casts dtypes or verifies). Raised there, it can cross torch's C++ frames (pybind11 turns it
into ``std::terminate``: SIGABRT), or it leaves torch half initialized, so that any later
``import torch...`` on the way out raises from the partial module (a long traceback) and
interpreter finalization of the half-loaded extension crashes (SIGSEGV). Leaving from the handler
with ``os._exit`` runs none of that. Writer threads may still be writing into the staging directory
when it is removed; they write to already opened files (only the main thread, which is running this
handler, creates files), so nothing reappears.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_INTERRUPTED = 130
MESSAGE = "error: interrupted; nothing was written to the output"

_to_remove: list[Path] = []


def leave_interrupted() -> None:
    """Remove what the run registered, print the one line, end the process with status 130
    without interpreter finalization."""
    for path in list(_to_remove):
        shutil.rmtree(path, ignore_errors=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not stop the exit
            pass
    try:
        os.write(2, (MESSAGE + "\n").encode())
    except OSError:
        pass
    os._exit(EXIT_INTERRUPTED)


def _on_sigint(signum, frame) -> None:
    leave_interrupted()


def install() -> None:
    """Route Ctrl-C (SIGINT) to :func:`leave_interrupted`. Main thread only, as for any handler."""
    signal.signal(signal.SIGINT, _on_sigint)


@contextmanager
def removed_if_interrupted(path: Path):
    """While the block runs, a Ctrl-C removes ``path`` (a directory) before the process leaves."""
    _to_remove.append(Path(path))
    try:
        yield path
    finally:
        _to_remove.remove(Path(path))
