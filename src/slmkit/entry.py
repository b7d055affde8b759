"""The `slm` console script: imports the CLI (and with it torch) inside the interrupt handling, so
that Ctrl-C or SIGTERM at any moment, start-up included, ends with one line and no traceback."""

from __future__ import annotations

import signal
import sys


def _terminate(signum: int, frame: object) -> None:
    # Outside training (which handles SIGTERM itself, saving first) SIGTERM acts like Ctrl-C, so
    # cleanup code runs: locks are released and temporary files removed.
    _interrupt(signum, frame)


def _importing(frame: object) -> bool:
    """Whether the interrupted code is inside an import (Python's import machinery is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):  # type: ignore[attr-defined]
            return True
        frame = frame.f_back  # type: ignore[attr-defined]
    return False


def _interrupt(signum: int, frame: object) -> None:
    # A KeyboardInterrupt raised inside an import can be swallowed by a library's broad `except`, or hit
    # C++ code that cannot pass it on (pybind11 aborts): Ctrl-C during start-up then did nothing, or
    # crashed. So it waits until the import is done, re-checked every 50 ms.
    if _importing(frame) and hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        from slmkit.cli import main as cli_main

        cli_main(argv)  # builds the parser (importing torch for some commands), then runs the command
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
