"""The ``conceptmon`` console script: Ctrl-C at any moment (while the CLI imports, while a
command runs, or while the interpreter shuts down after it) ends in one line, never a traceback."""
from __future__ import annotations

import signal
import sys


def run() -> None:
    try:
        from .cli import main
        main()
    except KeyboardInterrupt:  # before any command's own handling exists
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("interrupted\n")
        code = 130
    except SystemExit as finished:
        # The command has said what it had to; a Ctrl-C during interpreter shutdown would
        # otherwise kill the process by signal (exit -2) after its one line.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = finished.code
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = 0
    sys.exit(code)
