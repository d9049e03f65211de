"""conceptmon validate: final-layer accuracy on a classifier whose units are known."""
import json

import pytest
import torch
from click.testing import CliRunner

from conceptmon.cli import main
from conceptmon.concepts import normalise_name
from conceptmon.config import config_from_dict
from conceptmon.probes.synthetic import PALETTE, generate_synthetic
from conceptmon.validate import ValidateError, read_classes, validate_run

from .fixtures_runs import save_checkpoints

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


class ColourClassifier(torch.nn.Module):
    """A 'classifier' whose output unit i lights up on the pixels of colour i (input in [0, 1])."""

    def __init__(self, colours=tuple(COLOURS)):
        super().__init__()
        self.register_buffer("rgb", torch.tensor([PALETTE[c] for c in colours], dtype=torch.float32) / 255)
        self.fc = torch.nn.Identity()

    def forward(self, x):
        distance = (x[:, None] - self.rgb[None, :, :, None, None]).abs().amax(dim=2)  # (B, classes, H, W)
        return self.fc(torch.nn.functional.avg_pool2d((distance < 1e-3).float(), 2))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("validate")
    probe = generate_synthetic(base / "probe", n=60, size=32, seed=0)
    ckpts = save_checkpoints(base / "ckpts", {3: ColourClassifier()})
    cfg = config_from_dict({"model": {"arch": "tests.test_validate:ColourClassifier"}, "layers": ["fc"],
                            "probe": {"name": "synthetic", "root": str(probe), "mean": [0, 0, 0], "std": [1, 1, 1]},
                            "checkpoints": str(ckpts), "out": str(base / "out"), "trust": {"replicates": 0}})
    return cfg, base


def test_units_named_by_their_classes_score_one_and_a_shuffle_fails(run_folder):
    cfg, base = run_folder
    report = validate_run(cfg, layer="fc", classes=COLOURS, log=lambda m: None)
    (row,) = report["results"]
    assert (row["epoch"], row["n_units"], row["top1"], row["top5"]) == (3, 6, 1.0, 1.0)
    assert row["misses"] == [] and (base / "out" / "validate.json").exists()
    shuffled = COLOURS[1:] + COLOURS[:1]
    (wrong,) = validate_run(cfg, layer="fc", classes=shuffled, log=lambda m: None)["results"]
    assert wrong["top1"] == 0.0 and len(wrong["misses"]) == 6


def test_unknown_classes_are_reported_not_dropped(run_folder):
    cfg, _ = run_folder
    classes = ["red", "green", "blue", "yellow", "white", "unicorn"]
    (row,) = validate_run(cfg, layer="fc", classes=classes, log=lambda m: None)["results"]
    assert row["n_units"] == 6 and row["top1"] == pytest.approx(5 / 6)
    assert row["not_in_concepts"] == ["unicorn"]
    assert row["misses"][0]["class"] == "unicorn" and row["misses"][0]["in_concepts"] is False


def test_wrong_number_of_classes_is_one_line(run_folder):
    cfg, _ = run_folder
    with pytest.raises(ValidateError, match=r"^layer fc: has 6 units but 2 class names were given"):
        validate_run(cfg, layer="fc", classes=["red", "green"], log=lambda m: None)


def test_cli_json_and_class_files(run_folder, tmp_path):
    cfg, base = run_folder
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg.to_dict()))
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(COLOURS) + "\n")
    result = CliRunner().invoke(main, ["validate", "--config", str(config), "--layer", "fc",
                                       "--classes", str(classes), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["results"][0]["top1"] == 1.0 and data["results"][0]["layer"] == "fc"
    bad = CliRunner().invoke(main, ["validate", "--config", str(config), "--layer", "fc", "--classes", "nope.txt"])
    assert bad.exit_code == 1 and "nope.txt is not a file" in bad.output


def test_name_normalisation():
    assert normalise_name("Living_Room-s") == "living room"
    assert normalise_name("red-c") == "red" and normalise_name(" Sea  Floor ") == "sea floor"
    assert read_classes("a, b ,c") == ["a", "b", "c"]


@pytest.mark.slow
def test_cli_planted_check_passes_and_a_broken_detector_setting_fails(tmp_path):
    import yaml

    probe = generate_synthetic(tmp_path / "probe", n=150, size=48, seed=0)
    good = CliRunner().invoke(main, ["validate", "--planted", "--probe-root", str(probe)])
    assert good.exit_code == 0, good.output
    assert "planted check: passed" in good.stdout
    config = tmp_path / "c.yaml"  # a detector that marks half of every unit active names nothing right
    config.write_text(yaml.safe_dump({"layers": ["x"], "detector": {"name": "netdissect", "quantile": 0.5}}))
    bad = CliRunner().invoke(main, ["validate", "--planted", "--probe-root", str(probe), "--config", str(config),
                                    "--format", "json"])
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["passed"] is False


def test_the_report_shows_the_self_check(run_folder):
    from conceptmon.engine import dissect_run
    from conceptmon.report import report_run

    cfg, base = run_folder
    dissect_run(cfg, log=lambda m: None)
    validate_run(cfg, layer="fc", classes=COLOURS[1:] + COLOURS[:1], log=lambda m: None)  # all six missed
    page = report_run(base / "out", log=lambda m: None).read_text()
    section = page.split('id="validation"')[1].split("</section>")[0]
    assert "Self-check" in section and "green → red" in section
