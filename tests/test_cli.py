"""The command line: help everywhere, the short forms, and one-line errors for bad input."""
import errno
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from conceptmon import store
from conceptmon.cli import main
from conceptmon.probes.synthetic import generate_synthetic

from .fakes import TinyConv


def all_commands(group=main, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", list(all_commands()), ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_expected_commands_exist():
    names = set(main.commands)
    assert {"init", "dissect", "embed", "plot", "stats", "compare", "report", "watch", "probe", "demo"} <= names


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("p") / "syn", n=24, size=32, seed=2)


@pytest.fixture
def project(tmp_path, probe_root, monkeypatch):
    """A folder with ./conceptmon.yaml and ./ckpts, as a user would have it."""
    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for e in (0, 1):
        torch.save({"epoch": e, "state_dict": TinyConv(seed=e).state_dict()}, ckpts / f"epoch_{e}.pt")
    cfg = {
        "model": {"arch": "tests.fakes:TinyConv"},
        "layers": ["conv1", "conv2"],
        "probe": {"name": "synthetic", "root": str(probe_root)},
        "batch_size": 8,
    }
    (tmp_path / "conceptmon.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_short_form_dissect_then_rerun_skips(project):
    result = invoke("dissect", "--ckpts", "ckpts/")
    assert result.exit_code == 0, result.output
    assert store.finished_epochs(project / "conceptmon_out") == [0, 1]
    again = invoke("dissect", "--ckpts", "ckpts/")
    assert "already dissected" in again.output and again.exit_code == 0


def test_cli_overrides_apply(project):
    result = invoke("dissect", "--ckpts", "ckpts", "--layers", "conv2", "--epochs", "1", "--limit", "10",
                    "--out", "o")
    assert result.exit_code == 0, result.output
    df = store.read_dissect(project / "o")
    assert set(df.layer) == {"conv2"} and set(df.epoch) == {1}
    assert store.read_manifest(project / "o")["probe"]["n_images"] == 10


def test_init_writes_a_valid_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "--arch", "resnet18", "--layers", "layer3,layer4", "--num-classes", "365")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((tmp_path / "conceptmon.yaml").read_text())
    assert data["layers"] == ["layer3", "layer4"] and data["model"]["kwargs"] == {"num_classes": 365}
    again = invoke("init")
    assert again.exit_code == 1 and "--overwrite" in again.output


def corrupt(project, what):
    """Make one kind of bad input; returns the extra CLI args."""
    cfg_path = project / "conceptmon.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    args = ["--ckpts", "ckpts"]
    if what == "no config":
        cfg_path.unlink()
    elif what == "missing ckpts folder":
        args = ["--ckpts", "nowhere"]
    elif what == "empty ckpts folder":
        (project / "empty").mkdir()
        args = ["--ckpts", "empty"]
    elif what == "truncated checkpoint":
        p = project / "ckpts" / "epoch_1.pt"
        p.write_bytes(p.read_bytes()[:300])
    elif what == "whole pickled module":
        torch.save(TinyConv(), project / "ckpts" / "epoch_1.pt")
    elif what == "other architecture":
        torch.save({"epoch": 1, "state_dict": torch.nn.Linear(2, 2).state_dict()}, project / "ckpts" / "epoch_1.pt")
    elif what == "unknown arch":
        cfg["model"]["arch"] = "resnet181"
    elif what == "wrong layer":
        cfg["layers"] = ["conv3"]
    elif what == "unknown config key":
        cfg["detector"] = {"quantil": 0.01}
    elif what == "missing probe root":
        cfg["probe"] = {"name": "broden", "root": str(project / "no_broden")}
    elif what == "malformed index.csv":
        import shutil

        broden = project / "broden"
        shutil.copytree(cfg["probe"]["root"], broden)
        (broden / "index.csv").write_text("image,split\nx.png\n")
        cfg["probe"] = {"name": "broden", "root": str(broden)}
    elif what == "NaN activations":
        sd = TinyConv(seed=1).state_dict()
        sd["conv1.bias"][:] = float("nan")
        torch.save({"epoch": 1, "state_dict": sd}, project / "ckpts" / "epoch_1.pt")
    elif what == "duplicate epochs":
        torch.save({"epoch": 1, "state_dict": TinyConv().state_dict()}, project / "ckpts" / "again.pt")
    elif what == "device name":
        cfg["device"] = "cuda:abc"
    elif what == "device not here":
        args += ["--device", "mps"]
    elif what == "layer without units":
        cfg["model"]["arch"] = "tests.test_layouts:Relayout"
        cfg["layers"] = ["scalar"]
    elif what == "ambiguous layout":
        cfg["layers"] = [{"name": "conv2", "layout": "tokens"}]
    elif what == "epoch out of range":
        torch.save({"epoch": 99999999999, "state_dict": TinyConv().state_dict()}, project / "ckpts" / "epoch_1.pt")
    elif what == "YAML alias bomb":
        text = "".join(f"{c}: &{c} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n"
                       for p, c in zip([None, *"abcdefg"], "abcdefgh"))
        cfg_path.write_text(text + "layers: [conv1]\ndetector: {name: netdissect, params: [*h, *h, *h]}\n")
        return args
    elif what == "truncated image, 2 workers":
        import shutil

        probe = project / "probe"
        shutil.copytree(cfg["probe"]["root"], probe)
        image = sorted(p for p in (probe / "images").rglob("*.png") if "_" not in p.stem)[5]
        image.write_bytes(image.read_bytes()[:200])
        cfg["probe"] = {"name": "synthetic", "root": str(probe)}
        args += ["--num-workers", "2"]
    cfg_path.write_text(yaml.safe_dump(cfg)) if cfg_path.exists() or what != "no config" else None
    return args


BAD_INPUTS = {
    "no config": "conceptmon init",
    "missing ckpts folder": "nowhere: checkpoint folder not found",
    "empty ckpts folder": "empty: no checkpoints",
    "truncated checkpoint": "epoch_1.pt: unreadable or truncated checkpoint",
    "whole pickled module": "--trust-checkpoints",
    "other architecture": "weights do not fit model",
    "unknown arch": "unknown architecture 'resnet181' (did you mean resnet18",
    "wrong layer": "no layer named 'conv3' in this model (did you mean conv2, conv1?)",
    "unknown config key": "detector.quantil: unknown key (did you mean quantile?)",
    "missing probe root": "no_broden",
    "malformed index.csv": "index.csv",
    "NaN activations": "layer conv1: NaN or infinite activations",
    "duplicate epochs": "two checkpoints for epoch 1",
    "device name": "device: expected auto, cpu, cuda, cuda:N or mps, got 'cuda:abc'",
    "device not here": "device: mps requested but Apple MPS is not available here (use auto or cpu)",
    "layer without units": "layer scalar: output (2,) has no unit dimension (one value per image)",
    "ambiguous layout": "layer conv2: output (2, 6, 16, 16) is 4-D, not layout tokens",
    "epoch out of range": "epoch_1.pt: epoch 99999999999 is out of range (0..2147483647)",
    "YAML alias bomb": "values once YAML aliases are expanded (limit 100,000)",
    "truncated image, 2 workers": "unreadable image (image file is truncated",
}


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_input_is_one_line_nonzero_and_leaves_no_table(project, what):
    args = corrupt(project, what)
    result = CliRunner().invoke(main, ["dissect", "--quiet", *args])
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert BAD_INPUTS[what] in lines[0]
    assert not list((project / "conceptmon_out").glob("dissect/epoch_0001.parquet"))


def test_disk_full_during_a_write_is_one_line_and_leaves_nothing(project, monkeypatch):
    import pyarrow.parquet as pq

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    result = CliRunner().invoke(main, ["dissect", "--ckpts", "ckpts"])
    assert result.exit_code == 1
    assert "could not write (No space left on device)" in result.output
    d = project / "conceptmon_out" / "dissect"
    assert not list(d.glob("*.parquet")) and not list(d.glob(".tmp-*"))


def one_line_error(result, fragment):
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output


def test_watch_interval_must_be_positive(project):
    one_line_error(CliRunner().invoke(main, ["watch", "--ckpts", "ckpts", "--interval", "-1"]),
                   "--interval: must be a positive number of seconds, got -1")


def test_init_quotes_what_yaml_would_misread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "--ckpts", "runs/my run #2", "--probe", "folder", "--root", "data: images",
                    "--layers", "null,layer4")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((tmp_path / "conceptmon.yaml").read_text())
    assert data["checkpoints"] == "runs/my run #2" and data["probe"]["root"] == "data: images"
    assert data["layers"] == ["null", "layer4"]


def test_stats_refuses_a_stale_embedding_and_mixed_configs(project):
    from conceptmon.embedding import embed_run

    from . import fixtures_runs  # noqa: F401  (registers the offline hashvec encoder)

    assert invoke("dissect", "--ckpts", "ckpts").exit_code == 0
    out = project / "conceptmon_out"
    embed_run(out, map_method="pca", encoder="hashvec", log=lambda m: None)
    torch.save({"epoch": 1, "state_dict": TinyConv(seed=9).state_dict()}, project / "ckpts" / "epoch_1.pt")
    assert invoke("dissect", "--ckpts", "ckpts").exit_code == 0  # epoch 1 redone: the embedding is now stale
    one_line_error(CliRunner().invoke(main, ["stats"]),
                   "conceptmon_out/embed: made from other dissect tables (epochs [1] were added, removed or redone "
                   "since); re-run `conceptmon embed --out conceptmon_out`")
    record = store.read_json(store.epoch_record_path(out, 0))
    store.write_json(store.epoch_record_path(out, 0), {**record, "config_fingerprint": "another"})
    one_line_error(CliRunner().invoke(main, ["stats"]), "epochs [0] were made with another config than epochs [1]")


@pytest.mark.slow
def test_ctrl_c_at_any_moment_is_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("conceptmon")
    for delay in (0.2, 0.6, 1.5, 3.0):  # while the CLI imports, while the command runs, as it exits
        proc = subprocess.Popen([str(exe), "stats", "--out", str(tmp_path / "nothing")], stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err
        assert proc.returncode in (1, 130), err  # interrupted (130), or it had already finished with its one line
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
