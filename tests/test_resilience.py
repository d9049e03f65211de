"""Runs killed at any point, and shards run as separate processes, lose and corrupt nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conceptmon import store
from conceptmon.probes.synthetic import generate_synthetic

from .fakes import TinyConv
from .fixtures_runs import save_checkpoints
from .processes import kill_when_paused

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = [0, 1, 2, 3, 4]
TIME_FIELDS = {"finished", "seconds"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("resilience")
    probe = generate_synthetic(base / "probe", n=40, size=32, seed=1)
    ckpts = save_checkpoints(base / "ckpts", {e: TinyConv(seed=e) for e in EPOCHS})
    config = base / "conceptmon.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"arch": "tests.fakes:TinyConv"},
        "layers": ["conv1", "conv2"],
        "probe": {"name": "synthetic", "root": str(probe)},
        "detector": {"quantile": 0.02},
        "checkpoints": str(ckpts),
        "batch_size": 16,
        "run": "resilience",  # one run name, so shards and the reference write identical bytes
    }))
    reference = base / "reference"
    cli(config, reference).check_returncode()
    return config, reference


def cli(config, out, *extra, env=None, wait=True, command=("dissect", "--quiet")):
    cmd = [sys.executable, str(ROOT / "tests" / "kill_harness.py"), command[0], "--config", str(config),
           "--out", str(out), *command[1:], *extra]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def output_files(out: Path) -> dict[str, object]:
    """Every result file by name: tables as DataFrames, records without their timings."""
    files = {}
    for p in sorted([*(out / "dissect").iterdir(), *(out / "top_images").glob("*")]):
        if p.name.startswith(".tmp-"):
            continue
        if p.suffix == ".parquet":
            files[f"{p.parent.name}/{p.name}"] = pd.read_parquet(p)
        elif p.suffix == ".json":
            files[f"{p.parent.name}/{p.name}"] = {k: v for k, v in json.loads(p.read_text()).items()
                                                  if k not in TIME_FIELDS}
    return files


def assert_same_results(a: Path, b: Path):
    fa, fb = output_files(a), output_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if isinstance(fa[name], pd.DataFrame):
            pd.testing.assert_frame_equal(fa[name].drop(columns="run", errors="ignore"),
                                          fb[name].drop(columns="run", errors="ignore"))
        else:
            assert fa[name] == fb[name], name


def assert_valid(out: Path):
    """Every table under its real name is complete; every record's tables exist and read."""
    d = out / "dissect"
    if not d.exists():
        return
    for p in d.glob("*.parquet"):
        if not p.name.startswith(".tmp-"):
            pq.read_table(p)  # raises on a torn file
    for e in store.finished_epochs(out):
        store.read_table(store.dissect_path(out, e), store.DISSECT)
        store.read_table(store.top_images_path(out, e), store.TOP_IMAGES)


def test_three_shard_processes_equal_one_run(workspace, tmp_path):
    config, reference = workspace
    out = tmp_path / "sharded"
    procs = [cli(config, out, "--shard", f"{i}/3", wait=False) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert store.finished_epochs(out) == EPOCHS
    assert_same_results(out, reference)
    manifest_a = json.loads((out / "conceptmon.json").read_text())
    manifest_b = json.loads((reference / "conceptmon.json").read_text())
    for key in ("config_fingerprint", "detector", "concepts", "probe", "layers"):
        assert manifest_a[key] == manifest_b[key]


@pytest.mark.parametrize("point,at", [("forward", 2), ("forward", 7), ("parquet", 3), ("record", 2)])
def test_sigkill_leaves_valid_output_and_rerun_completes(workspace, tmp_path, point, at):
    config, reference = workspace
    out = tmp_path / "killed"
    marker = tmp_path / "paused"
    proc = cli(config, out, env={"KILL_POINT": point, "KILL_AT": str(at), "KILL_MARKER": str(marker)}, wait=False)
    kill_when_paused(proc, marker)
    assert_valid(out)
    done_before = store.finished_epochs(out)
    assert done_before != EPOCHS  # the kill really interrupted the run
    stamps = {e: store.dissect_path(out, e).stat().st_mtime_ns for e in done_before}
    rerun = cli(config, out)
    assert rerun.returncode == 0, rerun.stderr
    assert {e: store.dissect_path(out, e).stat().st_mtime_ns for e in done_before} == stamps  # only the missing redone
    assert store.finished_epochs(out) == EPOCHS
    assert_same_results(out, reference)


EMBED = ("embed", "--map-method", "pca", "--encoder", "minilm")


@pytest.mark.parametrize("at", [1, 2, 3])  # its three tables (the caches are warm: both anchor pairs are vocabulary words)
def test_sigkill_inside_embed_keeps_one_whole_generation(workspace, tmp_path, at):
    """A kill while embed writes any of its three tables leaves the previous
    embedding whole: its anchors, neurons and record still belong together."""
    import shutil

    from conceptmon.embedding import read_anchors, read_embed_meta, read_neurons

    config, reference = workspace
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cache = {"CONCEPTMON_CACHE": str(tmp_path / "cache")}  # its own caches: the same writes in every case
    first = cli(config, out, "--anchors", "red,sky", command=EMBED, env=cache)
    assert first.returncode == 0, first.stderr
    before = read_embed_meta(out)
    marker = tmp_path / "paused"
    proc = cli(config, out, "--anchors", "grass,sea", command=EMBED, wait=False,
               env={**cache, "KILL_POINT": "parquet", "KILL_AT": str(at), "KILL_MARKER": str(marker)})
    kill_when_paused(proc, marker)
    assert read_embed_meta(out) == before
    assert read_anchors(out)["concept"].tolist() == ["red", "sky"]
    assert len(read_neurons(out)) == before["n_neurons"]
    again = cli(config, out, "--anchors", "grass,sea", command=EMBED, env=cache)
    assert again.returncode == 0, again.stderr
    assert "up to date" not in again.stderr  # the killed call's work was not taken for done
    assert read_anchors(out)["concept"].tolist() == ["grass", "sea"]
    assert [p.name for p in (out / "embed").iterdir() if p.is_dir()] == [read_embed_meta(out)["generation"]]


def test_sigkill_inside_watch_then_watch_again_completes(workspace, tmp_path):
    config, reference = workspace
    out = tmp_path / "watched"
    marker = tmp_path / "paused"
    watch = ("watch", "--interval", "0.2", "--no-refresh")
    proc = cli(config, out, command=watch, wait=False,
               env={"KILL_POINT": "record", "KILL_AT": "2", "KILL_MARKER": str(marker)})
    kill_when_paused(proc, marker)
    assert_valid(out)
    assert store.finished_epochs(out) != EPOCHS
    again = cli(config, out, command=watch, wait=False)
    deadline = time.time() + 240
    while store.finished_epochs(out) != EPOCHS:
        assert again.poll() is None, again.stderr.read().decode()
        assert time.time() < deadline, "watch did not finish the remaining epochs"
        time.sleep(0.2)
    again.send_signal(signal.SIGINT)  # Ctrl-C: stops cleanly
    _, err = again.communicate(timeout=60)
    assert "stopped" in err.decode() and "Traceback" not in err.decode()
    assert_same_results(out, reference)
