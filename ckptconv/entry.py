"""The ``ckptconv`` entry point (console script and ``python -m ckptconv``).

It imports nothing heavy: the Ctrl-C handler goes in first (:mod:`ckptconv.interrupt`), then the
command line (typer, rich) is imported and run, so a Ctrl-C at any moment of a run ends with one
line and exit status 130.
"""

from __future__ import annotations


def main() -> None:
    from ckptconv import interrupt

    interrupt.install()
    try:
        from ckptconv.cli import app

        app()
    except KeyboardInterrupt:  # raised by code that put Python's default handler back
        interrupt.leave_interrupted()


if __name__ == "__main__":
    main()
