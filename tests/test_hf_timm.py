"""Hugging Face, timm and spec-named models: built offline, loaded, dissected end to end.

Tiny random models are written with ``save_pretrained``; nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conceptmon import store
from conceptmon.checkpoints import CheckpointError, WeightLoader, find_checkpoints
from conceptmon.config import config_from_dict, load_config
from conceptmon.engine import dissect_run
from conceptmon.hooks import LayerTrace
from conceptmon.models import ModelError, build_model
from conceptmon.probes.synthetic import generate_synthetic

from .fixtures_clip import make_tiny_clip

transformers = pytest.importorskip("transformers")

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("probe") / "syn", n=10, size=IMAGE_SIZE, seed=5)


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    return transformers.ViTModel(config)


def tiny_resnet(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], num_labels=3)
    return transformers.ResNetForImageClassification(config)


def save_quietly(model, folder: Path) -> Path:
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder)
    return folder


def trainer_checkpoint(model, root: Path, step: int, epoch: float) -> Path:
    """A Trainer-style checkpoint-N/ folder: weights, config, trainer_state.json, optimizer junk."""
    folder = save_quietly(model, root / f"checkpoint-{step}")
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": step}))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    return folder


def hf_config(arch: str, layers: list[str], probe_root: Path, **extra):
    return config_from_dict({
        "model": {"arch": arch}, "layers": layers, "run": "r",
        "probe": {"name": "synthetic", "root": str(probe_root), "image_size": IMAGE_SIZE},
        "detector": {"quantile": 0.05}, "trust": {"replicates": 0}, "batch_size": 5, "top_k": 2, "device": "cpu",
        **extra,
    })


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- Hugging Face


def test_vit_saved_by_transformers_loads_from_folder_and_plain_file(tmp_path):
    saved = tiny_vit(seed=1)
    folder = save_quietly(saved, tmp_path / "vit")
    from safetensors.torch import load_file

    assert not set(load_file(str(folder / "model.safetensors"))) <= set(saved.state_dict())  # legacy names on disk
    model = build_model(config_from_dict({"model": {"arch": f"hf:{folder}"}, "layers": ["layers.0"]}).model)
    assert type(model).__name__ == "ViTModel" and not same_weights(model, saved)
    loader = WeightLoader(model, log=lambda m: None)
    loader.load(folder)
    assert same_weights(model, saved)
    plain = tmp_path / "epoch_3.safetensors"
    shutil.copy(folder / "model.safetensors", plain)
    other = tiny_vit(seed=2)
    WeightLoader(other, log=lambda m: None).load(plain)
    assert same_weights(other, saved)
    # An older Trainer's checkpoint-N/: pytorch_model.bin with the legacy names, and trainer_state.json.
    old_trainer = tmp_path / "old" / "checkpoint-40"
    old_trainer.mkdir(parents=True)
    torch.save(load_file(str(folder / "model.safetensors")), old_trainer / "pytorch_model.bin")
    (old_trainer / "trainer_state.json").write_text(json.dumps({"epoch": 4.0, "global_step": 40}))
    assert [(c.path.name, c.epoch) for c in find_checkpoints(tmp_path / "old")] == [("checkpoint-40", 4)]
    third = tiny_vit(seed=3)
    WeightLoader(third, log=lambda m: None).load(old_trainer)
    assert same_weights(third, saved)


def test_vit_tokens_dissect_with_clip_pooling(tmp_path, probe_root):
    base = save_quietly(tiny_vit(seed=0), tmp_path / "base")
    ckpts = tmp_path / "trainer"
    for step, epoch, seed in ((4, 1.0, 1), (8, 2.0, 2)):
        trainer_checkpoint(tiny_vit(seed=seed), ckpts, step, epoch)
    clip = make_tiny_clip(tmp_path / "clip")
    cfg = hf_config(f"hf:{base}", ["embeddings.patch_embeddings.projection", "layers.0"], probe_root,
                    detector={"name": "clip-dissect", "clip_model": str(clip)}, concepts="synthetic")
    assert dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None) == [1, 2]
    table = store.read_dissect(tmp_path / "out")
    per_layer = table[table["rank"] == 0].groupby("layer")["neuron"].nunique().to_dict()
    assert per_layer == {"embeddings.patch_embeddings.projection": 16, "layers.0": 16}  # hidden size 16
    assert sorted(table.epoch.unique()) == [1, 2]


def test_resnet_trainer_layout_dissects_end_to_end(tmp_path, probe_root):
    arch_folder = save_quietly(tiny_resnet(seed=0), tmp_path / "arch")
    ckpts = tmp_path / "output_dir"
    for step, epoch, seed in ((5, 1.0, 1), (10, 1.9999999, 2)):  # float sums land just short of 2
        trainer_checkpoint(tiny_resnet(seed=seed), ckpts, step, epoch)
    # The Trainer's final save_model and its arguments sit beside the checkpoint folders.
    save_quietly(tiny_resnet(seed=2), ckpts)
    torch.save({"not": "weights"}, ckpts / "training_args.bin")
    found = find_checkpoints(ckpts)
    assert [(c.path.name, c.epoch) for c in found] == [("checkpoint-5", 1), ("checkpoint-10", 2)]
    layers = ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]
    cfg = hf_config(f"hf:{arch_folder}", layers, probe_root)
    out = tmp_path / "out"
    assert dissect_run(cfg, ckpts=ckpts, out=out, log=lambda m: None) == [1, 2]
    table = store.read_dissect(out)
    assert table[table["rank"] == 0].groupby("layer")["neuron"].nunique().to_dict() == {layers[0]: 8, layers[1]: 12}
    record = store.read_json(store.epoch_record_path(out, 2))
    assert record["checkpoint"].endswith("checkpoint-10")
    # Optimizer state is not part of the weights' hash: a rewritten optimizer.pt is not a new checkpoint.
    torch.save({"state": {1: 2}}, ckpts / "checkpoint-10" / "optimizer.pt")
    assert dissect_run(cfg, ckpts=ckpts, out=out, log=lambda m: None) == []


def test_resnet_plain_files_load_like_any_state_dict(tmp_path, probe_root):
    arch_folder = save_quietly(tiny_resnet(seed=0), tmp_path / "arch")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    from safetensors.torch import save_file

    trained = [tiny_resnet(seed=s) for s in (1, 2)]
    save_file(trained[0].state_dict(), str(ckpts / "epoch_1.safetensors"))
    torch.save({"epoch": 2, "state_dict": trained[1].state_dict()}, ckpts / "weights.bin")
    cfg = hf_config(f"hf:{arch_folder}", ["resnet.embedder"], probe_root)
    assert dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None) == [1, 2]
    model = build_model(cfg.model)
    WeightLoader(model, log=lambda m: None).load(ckpts / "weights.bin")
    assert same_weights(model, trained[1])


def test_model_outputs_are_traced_as_their_hidden_state():
    model = tiny_resnet().eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = model.resnet(x)
        with LayerTrace(model, ["resnet.encoder", "resnet"]) as trace:
            outputs = trace.run(x)
    assert isinstance(reference, transformers.utils.ModelOutput)  # what the hooks saw
    assert torch.equal(outputs["resnet"], reference.last_hidden_state)
    assert outputs["resnet.encoder"].shape == (2, 12, 4, 4)  # the encoder's feature map, not its pooled output


def test_fractional_epochs_that_round_to_one_epoch_are_refused(tmp_path):
    for step, epoch in ((3, 0.5), (6, 0.9)):
        trainer_checkpoint(tiny_resnet(), tmp_path, step, epoch)
    with pytest.raises(CheckpointError, match=r"two checkpoints for epoch 0: checkpoint-3 \(trainer_state.json epoch "
                                              r"0.5\) and checkpoint-6 \(trainer_state.json epoch 0.9\); fractional"):
        find_checkpoints(tmp_path)


def test_trainer_folder_without_state_is_not_read_as_an_epoch(tmp_path):
    save_quietly(tiny_resnet(), tmp_path / "checkpoint-500")
    with pytest.raises(CheckpointError, match=r"checkpoint-500: no trainer_state.json, and the number .* is a step"):
        find_checkpoints(tmp_path)
    shutil.move(tmp_path / "checkpoint-500", tmp_path / "epoch_7")
    assert [c.epoch for c in find_checkpoints(tmp_path)] == [7]


def test_weights_of_another_shape_are_refused_in_one_line(tmp_path):
    folder = save_quietly(tiny_resnet(), tmp_path / "small")
    bigger = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    with pytest.raises(CheckpointError, match=r"weights do not fit model .*other shapes") as e:
        WeightLoader(bigger, log=lambda m: None).load(folder)
    assert "\n" not in str(e.value)


def test_missing_hub_model_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = config_from_dict({"model": {"arch": "hf:nobody/no-such-vit"}, "layers": ["x"]})
    with pytest.raises(ModelError, match=r"hf:nobody/no-such-vit: no such folder, and not in the Hugging Face cache "
                                         r"\(nothing is downloaded\); fetch it once with `hf download nobody/no-such-vit`"):
        build_model(cfg.model)


def test_hf_kwargs_override_the_config_and_typos_are_named(tmp_path):
    folder = save_quietly(tiny_resnet(), tmp_path / "arch")
    model = build_model(config_from_dict({"model": {"arch": f"hf:{folder}", "kwargs": {"num_labels": 5}},
                                          "layers": ["x"]}).model)
    assert model.classifier[-1].out_features == 5
    with pytest.raises(ModelError, match=r"model.kwargs: 'num_label' is not a setting of ResNetConfig "
                                         r".* \(did you mean num_labels"):
        build_model(config_from_dict({"model": {"arch": f"hf:{folder}", "kwargs": {"num_label": 5}},
                                      "layers": ["x"]}).model)


# ----------------------------------------------------------------------------- timm


def test_timm_model_dissects_end_to_end(tmp_path, probe_root):
    timm = pytest.importorskip("timm")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for epoch in (0, 1):
        torch.manual_seed(epoch)
        net = timm.create_model("test_resnet", pretrained=False, num_classes=4)
        torch.save({"epoch": epoch, "model": net.state_dict()}, ckpts / f"e{epoch}.pt")
    cfg = hf_config("timm:test_resnet", ["layer1", "layer2"], probe_root, model={"arch": "timm:test_resnet",
                                                                                  "kwargs": {"num_classes": 4}})
    assert dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None) == [0, 1]
    assert set(store.read_dissect(tmp_path / "out").layer) == {"layer1", "layer2"}


def test_timm_never_downloads_and_names_close_models():
    pytest.importorskip("timm")
    with pytest.raises(ModelError, match=r"pretrained: true is not used"):
        build_model(config_from_dict({"model": {"arch": "timm:test_resnet", "kwargs": {"pretrained": True}},
                                      "layers": ["x"]}).model)
    with pytest.raises(ModelError, match=r"unknown timm model 'test_resnett' \(did you mean test_resnet"):
        build_model(config_from_dict({"model": {"arch": "timm:test_resnett"}, "layers": ["x"]}).model)


# ----------------------------------------------------------------------------- specs beside the config


def test_spec_module_beside_the_config_works_from_another_cwd(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels_h3.py").write_text(textwrap.dedent("""
        import torch

        def small_net(width=4):
            return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU())
    """))
    (project / "conceptmon.yaml").write_text("model:\n  arch: mymodels_h3:small_net\n  kwargs: {width: 5}\nlayers: ['0']\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(project / "conceptmon.yaml")
    model = build_model(cfg.model, config_path=cfg.source)
    assert model[0].out_channels == 5
    sys.modules.pop("mymodels_h3", None)
    with pytest.raises(ModelError, match=r"model.arch: cannot import 'mymodels_h3': no such module"):
        build_model(cfg.model)  # without the config's folder it is not found
