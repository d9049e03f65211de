"""The plugins the README shows, built from the README itself, installed as entry points
(a ``*.dist-info`` on sys.path) and run through the CLI like any user's."""
from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conceptmon import store
from conceptmon.cli import main
from conceptmon.plugins import registry
from conceptmon.probes.synthetic import generate_synthetic

from .fakes import TinyConv

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under a README heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def install_plugin(folder: Path, dist: str, modules: dict[str, str], entry_points: dict[str, dict[str, str]]) -> None:
    """Write modules and a dist-info declaring ``entry_points`` into ``folder`` (then put it on sys.path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in modules.items():
        (folder / f"{name}.py").write_text(code, encoding="utf-8")
    info = folder / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines))


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The README's three plugins, installed; registries rescanned before and after."""
    detector_code, toml = [code for lang, code in readme_blocks("### Adding a detector")]
    (probe_code,) = [code for lang, code in readme_blocks("### Adding a probe set") if lang == "python"]
    (stat_code,) = [code for lang, code in readme_blocks("### Adding a statistic") if lang == "python"]
    project = tomllib.loads(toml)
    folder = tmp_path / "site"
    install_plugin(folder, project["project"]["name"], {"my_detector": detector_code},
                   project["project"]["entry-points"])
    install_plugin(folder, "my-extras", {"my_probe": probe_code, "my_stat": stat_code},
                   {"conceptmon.probes": {"labelled-folders": "my_probe:PROBE"},
                    "conceptmon.statistics": {"mean_confidence": "my_stat:MEAN_CONFIDENCE"}})
    monkeypatch.syspath_prepend(str(folder))
    kinds = ("detectors", "probes", "statistics")
    for kind in kinds:
        registry(kind).rescan()
    yield folder
    monkeypatch.undo()
    for module in ("my_detector", "my_probe", "my_stat"):
        sys.modules.pop(module, None)
    for kind in kinds:
        registry(kind).rescan()


def project_with(tmp_path, config: dict) -> Path:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for e in (0, 1):
        torch.save({"epoch": e, "state_dict": TinyConv(seed=e).state_dict()}, ckpts / f"epoch_{e}.pt")
    path = tmp_path / "conceptmon.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "tests.fakes:TinyConv"}, "layers": ["conv1", "conv2"],
                                    "checkpoints": str(ckpts), "out": str(tmp_path / "out"), "batch_size": 8,
                                    "trust": {"replicates": 5}, **config}))
    return path


def test_the_readme_detector_plugin_is_listed_and_dissects(plugins, tmp_path):
    listed = CliRunner().invoke(main, ["plugins", "detectors", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["mean-contrast"]["source"] == "entry point my-detector (my_detector:MeanContrast)"
    probe = generate_synthetic(tmp_path / "probe", n=30, size=32, seed=0)
    config = project_with(tmp_path, {"probe": {"name": "synthetic", "root": str(probe)},
                                     "detector": {"name": "mean-contrast", "min_images": 3}})
    result = CliRunner().invoke(main, ["dissect", "--config", str(config)])
    assert result.exit_code == 0, result.output
    table = store.read_dissect(tmp_path / "out")
    assert set(table.detector) == {"mean-contrast"} and set(table.epoch) == {0, 1}
    assert table.score.max() > 0.3  # units do respond more on some concepts' images
    assert table.confidence.isna().all()  # this detector does not resample: no confidence is claimed
    assert store.read_manifest(tmp_path / "out")["detector"]["min_images"] == 3
    (tmp_path / "t").mkdir()
    typo = project_with(tmp_path / "t", {"probe": {"name": "synthetic", "root": str(probe)},
                                         "detector": {"name": "mean-contrast", "min_imges": 3}})
    bad = CliRunner().invoke(main, ["dissect", "--config", str(typo)])
    assert bad.exit_code == 1 and "detector.min_imges: unknown key (did you mean min_images?)" in bad.output


def test_the_readme_probe_and_statistic_plugins_work_end_to_end(plugins, tmp_path):
    root = tmp_path / "labelled"
    colours = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255)}
    for label, rgb in colours.items():
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), tuple(min(255, c + 10 * i) for c in rgb)).save(root / label / f"{i}.png")
    config = project_with(tmp_path, {"probe": {"name": "labelled-folders", "root": str(root), "mean": [0, 0, 0],
                                               "std": [1, 1, 1]}})
    result = CliRunner().invoke(main, ["dissect", "--config", str(config)])
    assert result.exit_code == 0, result.output
    table = store.read_dissect(tmp_path / "out")
    assert set(table.dropna(subset=["concept"]).concept) <= set(colours)
    stats = CliRunner().invoke(main, ["stats", "--out", str(tmp_path / "out"), "--format", "json",
                                      "--table", "mean_confidence"])
    assert stats.exit_code == 0, stats.output
    rows = json.loads(stats.stdout)["tables"]["mean_confidence"]
    assert {r["layer"] for r in rows} <= {"conv1", "conv2"}
    assert all(r["confidence"] is None or 0 <= r["confidence"] <= 1 for r in rows)
