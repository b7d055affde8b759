"""The `slm` console script: imports the CLI (and with it torch) inside the interrupt handling, so
that Ctrl-C or SIGTERM at any moment, start-up included, ends with one line and no traceback."""

from __future__ import annotations

import signal
import sys


def _terminate(signum: int, frame: object) -> None:
    # Outside training (which handles SIGTERM itself, saving first) SIGTERM acts like Ctrl-C, so
    # cleanup code runs: locks are released and temporary files removed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from slmkit.cli import main as cli_main

        cli_main(argv)  # builds the parser (importing torch for some commands), then runs the command
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
