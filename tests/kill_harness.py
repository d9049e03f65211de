"""Runs the conceptmon CLI, pausing at one chosen point so a test can SIGKILL it there.

KILL_POINT=forward|parquet|record|replace|replaced, KILL_AT=<n-th call>, KILL_MARKER=<file written when paused>;
replace/replaced pause just before/after the atomic rename onto a file named KILL_FILE (e.g. current.json).
The pause is injected here, in the test harness, never in the package.
"""
import os
import pathlib
import sys
import time

point = os.environ.get("KILL_POINT")
at = int(os.environ.get("KILL_AT", "1"))
marker = pathlib.Path(os.environ.get("KILL_MARKER", "/dev/null"))
calls = {"n": 0}


def pause_here():
    calls["n"] += 1
    if calls["n"] == at:
        marker.write_text("paused")
        time.sleep(120)


if point == "forward":
    from conceptmon import hooks

    original_run = hooks.LayerTrace.run

    def run(self, x):
        pause_here()
        return original_run(self, x)

    hooks.LayerTrace.run = run
elif point == "parquet":
    import pyarrow.parquet as pq

    original_write = pq.write_table

    def write_table(table, where, **kw):
        pathlib.Path(where).write_bytes(b"PAR1 half a table")  # a torn write at the temporary path
        pause_here()
        return original_write(table, where, **kw)

    pq.write_table = write_table
elif point == "record":
    from conceptmon import store

    original_text = store.write_text

    def write_text(path, text):
        if pathlib.Path(path).name.startswith("epoch_"):
            pause_here()
        return original_text(path, text)

    store.write_text = write_text
elif point in ("replace", "replaced"):
    target = os.environ["KILL_FILE"]
    original_replace = os.replace

    def replace(src, dst, *args, **kw):
        hit = pathlib.Path(dst).name == target
        if hit and point == "replace":
            pause_here()
        original_replace(src, dst, *args, **kw)
        if hit and point == "replaced":
            pause_here()

    os.replace = replace

sys.path.insert(0, os.getcwd())
from conceptmon.cli import main  # noqa: E402

main()
