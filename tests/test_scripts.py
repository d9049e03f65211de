"""The case-study training scripts, each run for one tiny step on a small image folder.

pytest puts ``scripts/`` on the import path (pyproject.toml), as ``python scripts/X.py`` does.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptmon import store
from conceptmon.checkpoints import apply_state_dict, find_checkpoints, load_state_dict
from conceptmon.config import load_config, override
from conceptmon.engine import dissect_run
from conceptmon.models import build_model
from conceptmon.demo.data import Normalizer
from conceptmon.demo.loop import checkpoint_payload
from conceptmon.demo.model import MODEL_ARCH, small_resnet

from casestudies.lottery import apply_masks, global_magnitude_masks, prunable_weights, sparsity
from casestudies.options import run_main
from casestudies.pgd import pgd_attack

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SCRIPT_NAMES = ("train_standard", "train_lth", "train_pgd", "finetune")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"conceptmon_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str]) -> int:
    return run_main(load_script(name).main, argv)


@pytest.fixture(autouse=True)
def _restore_determinism():
    # The scripts switch on deterministic algorithms for the process; leave other tests as they were.
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two colour classes, 6 train and 4 val images each, 24 px."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.integers(0, 50, (24, 24, 3)) + np.array(colour)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def checkpoint_states(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {f.epoch: load_state_dict(f.path) for f in find_checkpoints(folder)}


def assert_dissectable(config_path: Path, expected_epochs: list[int]) -> dict[int, dict]:
    """The config loads, names the checkpoint folder, and every checkpoint fits the model it builds."""
    cfg = load_config(config_path)
    files = find_checkpoints(cfg.checkpoints)
    assert [f.epoch for f in files] == expected_epochs
    model = build_model(cfg.model)
    states = {}
    for f in files:
        raw = torch.load(f.path, map_location="cpu", weights_only=True)  # no custom classes inside
        assert raw["epoch"] == f.epoch
        apply_state_dict(model, raw["state_dict"], f.path)
        states[f.epoch] = raw
    names = dict(model.named_modules())
    assert all(layer in names for layer in cfg.layers)
    return states


# ----------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_has_help(name, capsys):
    module = load_script(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--data" in text and "--out" in text and "--tiny" in text


@pytest.mark.slow
def test_help_runs_as_a_command():
    # Run from another folder: the script must find the package and its helpers by itself.
    result = subprocess.run([sys.executable, str(SCRIPTS / "train_lth.py"), "--help"], cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--rewind" in result.stdout and "--prune-fraction" in result.stdout


@pytest.mark.parametrize(
    "name, argv, expected",
    [
        ("train_standard", ["--dataset", "cifar10"], "CIFAR10('ROOT', download=True)"),
        ("train_pgd", ["--dataset", "cifar100"], "CIFAR100('ROOT', download=True)"),
        ("train_standard", ["--dataset", "places365"], "places365standard_easyformat"),
        ("finetune", ["--weights", "none"], "diabetic-retinopathy-detection"),
    ],
)
def test_missing_data_names_path_and_how_to_get_it(name, argv, expected, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = run_script(name, argv + ["--data", str(missing), "--out", str(tmp_path / "run"), "--tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert str(missing) in err[-1] and expected in err[-1]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_bad_option_value_is_one_line(image_folder, tmp_path, capsys):
    rc = run_script("train_lth", ["--data", str(image_folder), "--dataset", "folder", "--out", str(tmp_path),
                                  "--epochs", "3", "--rewind", "5"])
    assert rc == 2
    assert "--rewind" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the scripts


@pytest.mark.slow
def test_train_standard_writes_a_dissectable_run(image_folder, tmp_path, capsys):
    out = tmp_path / "std"
    rc = run_script("train_standard", ["--dataset", "folder", "--data", str(image_folder), "--out", str(out),
                                       "--tiny"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "epoch   1" in stdout and "val acc" in stdout
    states = assert_dissectable(out / "conceptmon.yaml", [0, 1])
    w0, w1 = states[0]["state_dict"]["conv1.weight"], states[1]["state_dict"]["conv1.weight"]
    assert not torch.equal(w0, w1)  # training changed the weights
    cfg = load_config(out / "conceptmon.yaml")
    assert cfg.model.arch == "resnet18" and cfg.model.kwargs == {"num_classes": 2}
    assert cfg.probe.image_size == 32 and cfg.layers == ["layer2", "layer3", "layer4"]
    assert Path(cfg.out) == (out / "conceptmon_out").resolve()
    history = (out / "history.json").read_text()
    assert '"val_acc"' in history and '"epoch": 1' in history


@pytest.mark.slow
def test_conceptmon_dissects_a_script_run_as_written(tmp_path):
    out = tmp_path / "syn"
    assert run_script("train_standard", ["--dataset", "synthetic", "--out", str(out), "--tiny",
                                         "--arch", MODEL_ARCH]) == 0
    cfg = load_config(out / "conceptmon.yaml")
    # Only the probe's size and place change (a tiny set under tmp_path, not the user's cache).
    cfg = override(cfg, **{"probe.root": str(tmp_path / "probe"), "probe.n": 12})
    assert dissect_run(cfg, log=lambda m: None) == [0, 1]
    table = store.read_dissect(cfg.out)
    assert set(table["layer"]) == {"layer2", "layer3", "layer4"} and set(table["epoch"]) == {0, 1}


@pytest.mark.slow
def test_same_seed_same_weights(image_folder, tmp_path):
    def final_weights(name: str, seed: str) -> torch.Tensor:
        argv = ["--dataset", "folder", "--data", str(image_folder), "--out", str(tmp_path / name), "--tiny",
                "--arch", MODEL_ARCH, "--seed", seed]
        assert run_script("train_standard", argv) == 0
        return checkpoint_states(tmp_path / name / "checkpoints")[1]["layer4.0.conv2.weight"]

    first = final_weights("a", "3")
    assert torch.equal(final_weights("b", "3"), first)
    assert not torch.equal(final_weights("c", "4"), first)


@pytest.mark.slow
def test_train_lth_saves_masked_stages_and_rewound_inits(image_folder, tmp_path):
    out = tmp_path / "lth"
    rc = run_script("train_lth", ["--dataset", "folder", "--data", str(image_folder), "--out", str(out),
                                  "--arch", MODEL_ARCH, "--batch-size", "4",
                                  "--image-size", "24", "--epochs", "2", "--max-steps", "1",
                                  "--stages", "2", "--rewind", "1"])
    assert rc == 0
    stages = assert_dissectable(out / "conceptmon.yaml", [0, 1, 2])
    inits = assert_dissectable(out / "conceptmon_rewound.yaml", [0, 1, 2])
    assert load_config(out / "conceptmon.yaml").out != load_config(out / "conceptmon_rewound.yaml").out

    model = small_resnet(num_classes=2)
    prunable = list(prunable_weights(model))
    for stage, expected in ((0, 0.0), (1, 0.4), (2, 1 - 0.6 * 0.6)):
        sd = stages[stage]["state_dict"]
        assert not any("_orig" in k or "_mask" in k for k in sd)  # plain state_dict, masks applied
        zeros = sum(int((sd[k] == 0).sum()) for k in prunable)
        total = sum(sd[k].numel() for k in prunable)
        assert zeros / total == pytest.approx(expected, abs=0.01)
        assert stages[stage]["sparsity"] == pytest.approx(expected, abs=0.01)
    # Each rewound init is the stage-0 rewind point with that stage's mask applied.
    for stage in (1, 2):
        for k in prunable:
            mask = stages[stage]["state_dict"][k] != 0
            assert torch.equal(inits[stage]["state_dict"][k], inits[0]["state_dict"][k] * mask)
    # Pruning is cumulative: what stage 1 removed stays removed in stage 2.
    for k in prunable:
        assert not ((stages[1]["state_dict"][k] == 0) & (stages[2]["state_dict"][k] != 0)).any()


@pytest.mark.slow
def test_train_pgd_trains_both_runs_from_one_init(image_folder, tmp_path, capsys):
    out = tmp_path / "pgd"
    rc = run_script("train_pgd", ["--dataset", "folder", "--data", str(image_folder), "--out", str(out),
                                  "--arch", MODEL_ARCH, "--tiny"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "robust_acc" in stdout and "conceptmon compare" in stdout
    standard = assert_dissectable(out / "standard" / "conceptmon.yaml", [0, 1])
    robust = assert_dissectable(out / "robust" / "conceptmon.yaml", [0, 1])
    key = "conv1.weight"
    assert torch.equal(standard[0]["state_dict"][key], robust[0]["state_dict"][key])
    assert not torch.equal(standard[1]["state_dict"][key], robust[1]["state_dict"][key])
    assert 0 <= robust[1]["robust_acc"] <= 1 and robust[1]["mode"] == "robust"


@pytest.mark.slow
def test_finetune_loads_backbone_and_trains_only_the_head_when_frozen(image_folder, tmp_path):
    backbone = small_resnet(num_classes=7)
    torch.save({"state_dict": backbone.state_dict(), "epoch": 99}, tmp_path / "backbone.pt")
    out = tmp_path / "ft"
    rc = run_script("finetune", ["--data", str(image_folder), "--out", str(out),
                                 "--arch", MODEL_ARCH,
                                 "--weights", str(tmp_path / "backbone.pt"), "--freeze-backbone", "--tiny"])
    assert rc == 0
    states = assert_dissectable(out / "conceptmon.yaml", [0, 1])
    sd0, sd1 = states[0]["state_dict"], states[1]["state_dict"]
    assert torch.equal(sd0["conv1.weight"], backbone.state_dict()["conv1.weight"])
    assert torch.equal(sd1["layer4.0.conv2.weight"], sd0["layer4.0.conv2.weight"])  # frozen
    assert sd1["fc.weight"].shape[0] == 2 and not torch.equal(sd1["fc.weight"], sd0["fc.weight"])


def test_finetune_refuses_weights_that_do_not_fit(image_folder, tmp_path, capsys):
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    rc = run_script("finetune", ["--data", str(image_folder), "--out", str(tmp_path / "ft"), "--arch", "resnet18",
                                 "--weights", str(tmp_path / "other.pt"), "--tiny"])
    assert rc == 2
    assert "--weights" in capsys.readouterr().err


@pytest.mark.slow
def test_train_with_monitor_observes_a_plain_loop(tmp_path, capsys):
    out = tmp_path / "monitored"
    load_script("train_with_monitor").main(["--out", str(out), "--epochs", "1", "--images", "32", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1"]
    assert "layer3" in lines[1] and "layer4" in lines[1] and "interpretable" in lines[1]
    assert store.finished_epochs(out) == [0, 1]  # the same files `conceptmon dissect` writes
    table = store.read_dissect(out)
    assert set(table["layer"]) == {"layer3", "layer4"}


def test_training_scripts_find_their_helpers_without_editing_the_import_path():
    # `python scripts/X.py` puts scripts/ on the import path itself; the package is installed.
    sources = [*(SCRIPTS / f"{name}.py" for name in (*SCRIPT_NAMES, "train_with_monitor")),
               *SCRIPTS.glob("casestudies/*.py"), *SCRIPTS.parent.glob("conceptmon/demo/*.py")]
    assert len(sources) == 5 + 7 + 6
    assert [str(path) for path in sources if "sys.path" in path.read_text()] == []


# ----------------------------------------------------------------------------- slurm


def _sbatch(env_extra: dict, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPTS / "slurm_dissect.sbatch"), *args], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.slow
def test_slurm_array_task_becomes_a_shard(tmp_path):
    config = tmp_path / "conceptmon.yaml"
    config.write_text("layers: [layer4]\n")
    env = {"CONCEPTMON": "echo conceptmon", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
           "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_CPUS_PER_TASK": "6"}
    result = _sbatch(env, str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"conceptmon dissect --config {config} --shard 1/3 --num-workers 6 --quiet"


@pytest.mark.slow
def test_slurm_script_refuses_missing_config_and_non_array_runs(tmp_path):
    missing = _sbatch({"SLURM_ARRAY_TASK_ID": "0"}, str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    config = tmp_path / "c.yaml"
    config.write_text("layers: [layer4]\n")
    not_array = _sbatch({"CONCEPTMON": "echo"}, str(config))
    assert not_array.returncode != 0 and "--array" in not_array.stderr


# ----------------------------------------------------------------------------- building blocks


def test_global_magnitude_masks_remove_the_smallest_weights_across_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 9, dtype=torch.float32).view(2, 4))
        model[1].weight.copy_(torch.tensor([[0.5, 9.0], [10.0, 11.0]]))
    masks = global_magnitude_masks(model, 0.25)  # 12 weights -> remove 3: 0.5, 1, 2
    assert masks["1.weight"].tolist() == [[False, True], [True, True]]
    assert masks["0.weight"].flatten().tolist() == [False, False] + [True] * 6
    assert sparsity(masks) == pytest.approx(0.25)
    masks2 = global_magnitude_masks(model, 0.5, masks)  # of the 9 left, remove 4 or 5 (rounded): 3,4,5,6
    assert sparsity(masks2) == pytest.approx(7 / 12)
    apply_masks(model, masks2)
    assert int((model[0].weight == 0).sum()) == 6


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = small_resnet(num_classes=3, widths=(4, 8, 8, 8)).eval()
    x = torch.rand(6, 3, 16, 16)
    y = torch.randint(0, 3, (6,))
    normalize = Normalizer()
    eps = 8 / 255
    adv = pgd_attack(model, x, y, normalize, eps=eps, alpha=2 / 255, steps=5,
                     generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(normalize(adv)), y) > loss(model(normalize(x)), y)


def test_checkpoint_payload_refuses_objects_weights_only_loading_cannot_read():
    with pytest.raises(TypeError, match="plain"):
        checkpoint_payload(small_resnet(), 1, optimizer=torch.optim.SGD(small_resnet().parameters(), lr=0.1))
    payload = checkpoint_payload(small_resnet(), 2, val_acc=0.5, dataset="x")
    assert payload["epoch"] == 2 and all(v.device.type == "cpu" for v in payload["state_dict"].values())
