import pytest
import torch

from conceptmon.hooks import LayerError, LayerTrace, resolve_layers

from .fakes import TinyConv


def n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_captures_layers_in_one_pass_and_stops_early():
    model = TinyConv()
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append(1))
    before = n_hooks(model)
    with LayerTrace(model, ["conv1", "conv2"]) as trace:
        out = trace.run(torch.zeros(2, 3, 8, 8))
    assert out["conv1"].shape == (2, 6, 8, 8) and out["conv2"].shape == (2, 6, 4, 4)
    assert calls == []  # the head after the last requested layer never ran
    assert n_hooks(model) == before


def test_hooks_removed_after_exception():
    model = TinyConv()
    before = n_hooks(model)
    with pytest.raises(RuntimeError):
        with LayerTrace(model, ["conv2"]) as trace:
            trace.run(torch.zeros(2, 5, 8, 8))  # wrong channel count
    assert n_hooks(model) == before


def test_unknown_layer_suggests_close_names():
    with pytest.raises(LayerError, match=r"no layer named 'conv3'.*did you mean conv2, conv1"):
        resolve_layers(TinyConv(), ["conv3"])


def test_resnet_dotted_names():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(LayerError, match="layer4.1.conv2"):
        resolve_layers(model, ["layer4.1.conv3"])
    assert set(resolve_layers(model, ["layer4.1.conv2", "layer2"])) == {"layer4.1.conv2", "layer2"}
