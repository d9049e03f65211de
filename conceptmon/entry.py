"""The ``conceptmon`` console script: Ctrl-C while the CLI is still importing is one line too."""
from __future__ import annotations

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:  # before any command's own handling exists
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    main()
