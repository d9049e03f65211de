"""The ``conceptmon`` console script: Ctrl-C at any moment (while the CLI imports, while a
command runs, or while the interpreter shuts down after it) ends in one line, never a traceback."""
from __future__ import annotations

import os
import signal
import sys

OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "20000"}
"""Environment defaults set before torch loads (a user's own setting wins). torch's OpenMP
threads busy-wait after every parallel op, by default for milliseconds (300,000 spins):
on a CPU node that steals a core from Network Dissection's kernel threads, which run right
after the forward pass. Measured in one session on the 2-core development machine (wide CNN,
8,000 images, scripts/bench_netdissect.py): dissect 1.61-1.64x -> 1.49-1.51x of the bare
pass, the bare pass itself unchanged (8.0 s both ways)."""


def set_openmp_defaults(environ=os.environ) -> None:
    """Apply :data:`OPENMP_DEFAULTS` where unset; only has an effect before torch is imported."""
    for name, value in OPENMP_DEFAULTS.items():
        environ.setdefault(name, value)


def run() -> None:
    set_openmp_defaults()
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
