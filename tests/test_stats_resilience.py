"""stats and report killed (SIGKILL) at several points leave the previous results or the new
ones, complete, never a mix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conceptmon import report, stats, store

from .fixtures_runs import write_embedding, write_epoch
from .processes import kill_when_paused
from .test_stats import distance_rows, make_out, neuron_rows

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def killed(args: list[str], tmp_path: Path, point: str, at: int = 1, file: str = "") -> None:
    """Run the CLI until it pauses at ``point``, then SIGKILL it."""
    marker = tmp_path / f"paused-{point}-{at}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_POINT": point, "KILL_AT": str(at),
           "KILL_MARKER": str(marker), "KILL_FILE": file}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_harness.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when_paused(proc, marker)


def redo_epoch_5(out: Path) -> None:
    """Epoch 5 dissected again with other scores, and embedded again: new statistics are due."""
    table = store.read_table(store.dissect_path(out, 5), store.DISSECT)
    table.loc[table["rank"] == 0, "score"] = 0.5
    write_epoch(out, 5, table)
    write_embedding(out, neuron_rows(), distance_rows())


def current_tables(out: Path) -> tuple[str, dict[str, pd.DataFrame]]:
    """The current stats generation's name and tables, after checking it is complete and intact."""
    gen = store.read_generation(out, store.STATS)
    assert gen.stale_files() == []
    assert sorted(p.name for p in gen.folder.iterdir()) == sorted(gen.record["files"])  # nothing half-written
    return gen.record["generation"], {n: store.read_table(gen.path(f"{n}.parquet"), stats.schema_of(n))
                                      for n in gen.record["tables"]}


@pytest.mark.parametrize("point, at, file, survivor", [
    ("parquet", 1, "", "old"), ("parquet", 5, "", "old"), ("replace", 1, "current.json", "old"),
    ("replaced", 1, "current.json", "new"),
])
def test_killed_stats_leave_one_whole_generation(tmp_path, point, at, file, survivor):
    out = make_out(tmp_path)
    stats.stats_run(out, log=lambda m: None)
    old_name, old_tables = current_tables(out)
    redo_epoch_5(out)
    killed(["stats", "--out", str(out)], tmp_path, point, at, file)
    name, tables = current_tables(out)
    if survivor == "old":
        assert name == old_name and tables.keys() == old_tables.keys()
        for key in tables:
            pd.testing.assert_frame_equal(tables[key], old_tables[key])
        assert stats.read_fresh_stats(out) is None  # and nobody calls them up to date
    else:
        assert name != old_name and stats.read_fresh_stats(out) is not None
    rerun = subprocess.run([sys.executable, "-m", "conceptmon", "stats", "--out", str(out)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert stats.read_fresh_stats(out) is not None
    assert [p.name for p in store.stats_dir(out).iterdir() if p.is_dir()] == [current_tables(out)[0]]


@pytest.mark.parametrize("point, survivor", [("replace", "old"), ("replaced", "new")])
def test_killed_report_leaves_the_old_page_or_the_new_one(tmp_path, point, survivor):
    out = make_out(tmp_path)
    path = report.report_run(out, log=lambda m: None)
    before = path.read_bytes()
    old_inputs = report.report_inputs(out)
    redo_epoch_5(out)
    killed(["report", "--out", str(out)], tmp_path, point, file="report.html")
    after = path.read_bytes()
    assert after.endswith(b"</html>\n")
    if survivor == "old":
        assert after == before
    else:
        assert after != before and report.report_inputs(out)["dissect"]["5"] != old_inputs["dissect"]["5"]
        assert report.report_inputs(out)["dissect"] == store.dissect_inputs(store.read_epoch_records(out))
