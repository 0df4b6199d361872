"""Atomic output directories.

Everything is written into a staging directory beside OUT (same filesystem, so the final rename is
atomic) and renamed into place only after the coverage proof passed. A failure, a Ctrl-C or a
``kill -9`` leaves at most a ``.OUT.ckptconv-partial`` directory, which no tool mistakes for a
checkpoint and which the next run clears. An existing OUT is refused unless ``force``; with
``force`` it is replaced only after success.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ckptconv import interrupt
from ckptconv.errors import ConversionError

STAGING_SUFFIX = ".ckptconv-partial"


def staging_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def check_output(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out}: already exists (pass --force to replace it once the new output is complete)")
    if not out.absolute().parent.is_dir():
        raise ConversionError(f"{out.absolute().parent}: parent directory does not exist")


@contextmanager
def staged_output(out: Path, force: bool, *, is_writer: bool = True):
    """Yield the staging directory; on clean exit, move it to ``out``. ``is_writer`` False for
    ranks other than 0 under torchrun: they write into the directory but do not create/rename it."""
    out = Path(out).absolute()
    staging = staging_path(out)
    # Registered before it exists: a Ctrl-C right after mkdir must find it (ckptconv.interrupt).
    with interrupt.removed_if_interrupted(staging):
        if is_writer:
            check_output(out, force)
            if staging.exists():
                shutil.rmtree(staging)  # left by a killed earlier run
            staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            if is_writer:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if is_writer:
            publish(staging, out, force)


def _remove(path: Path) -> None:
    """Remove whatever ``path`` is: a directory tree, or a file or symlink (``--force`` may replace
    a plain file named OUT; a symlink is removed, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staging: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"{out}: appeared while converting; refusing to overwrite without --force")
        trash = out.parent / f".{out.name}.ckptconv-old"
        _remove(trash)
        os.rename(out, trash)
        os.rename(staging, out)
        _remove(trash)
    else:
        os.rename(staging, out)
