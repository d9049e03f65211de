"""Helpers for tests that start conceptmon in another process and kill it at a chosen point."""
from __future__ import annotations

import signal
import time
from pathlib import Path


def kill_when_paused(proc, marker: Path, seconds: float = 120) -> None:
    """Wait until the process under tests/kill_harness.py pauses (it writes ``marker``), then SIGKILL it."""
    deadline = time.time() + seconds
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the process never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
