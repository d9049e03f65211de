"""Every common layer layout: detection, canonical form, and dissection equal to the NCHW result."""
import pandas as pd
import pytest
import torch

from conceptmon.config import LayerSpec, config_from_dict
from conceptmon.engine import Dissector
from conceptmon.layouts import LayoutError, ResolvedLayout, canonical, infer_token_grid, resolve_layout

from .fakes import TinyConv


def conv(c):
    return torch.nn.Conv2d(3, c, 1)


@pytest.mark.parametrize("shape,module,want", [
    ((2, 128, 14, 14), conv(128), ("nchw", 128, (14, 14))),
    ((2, 28, 28, 96), torch.nn.LayerNorm(96), ("nhwc", 96, (28, 28))),
    ((2, 8, 8, 8), conv(8), ("nchw", 8, (8, 8))),            # shape alone is ambiguous: the conv decides
    ((2, 8, 8, 8), torch.nn.Linear(4, 8), ("nhwc", 8, (8, 8))),  # ... a channels-last Linear the other way
    ((2, 10), torch.nn.Linear(4, 10), ("linear", 10, None)),
])
def test_layout_detection(shape, module, want):
    got = resolve_layout(LayerSpec("x"), module, shape, (112, 112))
    assert (got.layout, got.channels, got.grid) == want


@pytest.mark.parametrize("tokens,hw,want", [
    (50, (112, 112), (1, (7, 7))),      # ViT-B/16 at 112 px: class token + 7x7 patches
    (197, (224, 224), (1, (14, 14))),
    (196, (224, 224), (0, (14, 14))),   # no class token
    (201, (224, 224), (5, (14, 14))),   # class token + 4 registers
    (33, (64, 128), (1, (4, 8))),       # a non-square input
])
def test_token_grids(tokens, hw, want):
    assert infer_token_grid(tokens, hw) == want


def test_ambiguous_and_unsupported_shapes_are_one_line():
    with pytest.raises(LayoutError, match=r"^layer x: output \(2, 8, 8, 8\) could be \(B, C, H, W\) or \(B, H, W, C\); "
                                          r"set its layout .*nchw \(B, C, H, W\), nhwc"):
        resolve_layout(LayerSpec("x"), torch.nn.ReLU(), (2, 8, 8, 8), (32, 32))
    with pytest.raises(LayoutError, match=r"^layer head: output \(2,\) has no unit dimension \(one value per image\); dissect a layer"):
        resolve_layout(LayerSpec("head"), torch.nn.ReLU(), (2,), (32, 32))
    with pytest.raises(LayoutError, match=r"no prefix \+ h x w grid of square patches fits a 32x32 input"):
        resolve_layout(LayerSpec("t"), torch.nn.ReLU(), (2, 47, 16), (32, 32))
    with pytest.raises(LayoutError, match=r"is \(B, C\), not layout nhwc"):
        resolve_layout(LayerSpec("x", "nhwc"), torch.nn.ReLU(), (2, 8), (32, 32))


def test_canonical_forms():
    maps = torch.randn(2, 3, 4, 5)
    assert torch.equal(canonical(maps.permute(0, 2, 3, 1), ResolvedLayout("nhwc", 3, 0, (4, 5))), maps)
    tokens = torch.cat([torch.randn(2, 1, 3), maps.flatten(2).transpose(1, 2)], dim=1)
    assert torch.equal(canonical(tokens, ResolvedLayout("tokens", 3, 1, (4, 5))), maps)
    assert torch.equal(canonical(tokens, ResolvedLayout("tokens", 3, 1, (4, 5)), class_token=True), tokens[:, 0])


class Relayout(torch.nn.Module):
    """TinyConv whose conv2 output is re-emitted as NHWC, as tokens with a class token, or
    as a scalar per image, by extra modules named like the layers under test."""

    class Emit(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def forward(self, x):
            if self.kind == "nhwc":
                return x.permute(0, 2, 3, 1)
            if self.kind == "tokens":
                cls = x.mean(dim=(2, 3))[:, None, :]
                return torch.cat([cls, x.flatten(2).transpose(1, 2)], dim=1)
            return x.sum(dim=(1, 2, 3))  # (B,): nothing to dissect

    def __init__(self, seed=0):
        super().__init__()
        self.inner = TinyConv(seed=seed)
        self.nhwc = self.Emit("nhwc")
        self.tokens = self.Emit("tokens")
        self.scalar = self.Emit("scalar")

    def forward(self, x):
        a = self.inner.conv2(torch.relu(self.inner.conv1(x)))
        self.nhwc(a)
        self.tokens(a)
        self.scalar(a)
        return self.inner.head(torch.relu(a).mean(dim=(2, 3)))


def _dissect(array_probe_config, tmp_path, layers, name):
    cfg = config_from_dict({**array_probe_config, "model": {"arch": "tests.test_layouts:Relayout"},
                            "layers": layers, "run": "same"})
    out = tmp_path / name
    dissector = Dissector(cfg, out, model=Relayout(seed=3), log=lambda m: None)
    table, _ = dissector.dissect_current(0, "(test)", "sha")
    return dissector, table


def test_nhwc_and_token_layers_dissect_exactly_like_the_nchw_map(netdissect_backend, array_probe_config, tmp_path):
    """The NCHW result equals the brute-force reference (test_netdissect); the same map read
    as NHWC or as patch tokens behind a class token must give the same table row for row."""
    _, nchw = _dissect(array_probe_config, tmp_path, ["inner.conv2"], "nchw")
    dissector, others = _dissect(array_probe_config, tmp_path, ["nhwc", "tokens"], "others")
    assert dissector.layouts["nhwc"].layout == "nhwc" and dissector.layouts["tokens"].layout == "tokens"
    assert dissector.layouts["tokens"].prefix_tokens == 1
    reference = nchw.drop(columns="layer").reset_index(drop=True)
    for layer in ("nhwc", "tokens"):
        got = others[others.layer == layer].drop(columns="layer").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, reference)
    assert reference.score.max() > 0


def test_a_layer_without_units_is_refused_before_any_output(array_probe_config, tmp_path):
    with pytest.raises(LayoutError, match=r"^layer scalar: output \(2,\) has no unit dimension"):
        _dissect(array_probe_config, tmp_path, ["scalar"], "scalar")
    assert not (tmp_path / "scalar").exists()


def test_configured_layout_is_used_and_in_the_fingerprint(array_probe_config, tmp_path):
    auto, _ = _dissect(array_probe_config, tmp_path, ["tokens"], "a")
    given, _ = _dissect(array_probe_config, tmp_path,
                        [{"name": "tokens", "layout": "tokens", "prefix_tokens": 1, "grid": [8, 8]}], "b")
    assert given.layouts["tokens"] == auto.layouts["tokens"]
    assert given.fingerprint == auto.fingerprint  # same resolved layout, same results
    with pytest.raises(LayoutError, match=r"^layer tokens: output \(2, 65, 6\) looks like tokens"):
        _dissect(array_probe_config, tmp_path, [{"name": "tokens", "grid": [4, 4], "prefix_tokens": 1}], "c")
    cfg = config_from_dict({**array_probe_config, "layers": [{"name": "conv2", "layout": "linear"}]})
    with pytest.raises(LayoutError, match=r"^layer conv2: output \(2, 6, 8, 8\) is 4-D, not layout linear"):
        Dissector(cfg, tmp_path / "d", model=TinyConv(), log=lambda m: None)
    nhwc = config_from_dict({**array_probe_config, "layers": [{"name": "conv2", "layout": "nhwc"}]})
    assert Dissector(nhwc, tmp_path / "e", model=TinyConv(), log=lambda m: None).layouts["conv2"].channels == 8


@pytest.mark.slow
def test_swin_and_vit_blocks_dissect_one_row_set_per_channel(tmp_path):
    import torchvision

    from conceptmon.probes.synthetic import generate_synthetic

    probe = generate_synthetic(tmp_path / "probe", n=24, size=112, seed=0)
    cases = [("swin_t", {}, "features.1", 96, "nhwc"),
             ("vit_b_16", {"image_size": 112}, "encoder.layers.encoder_layer_5", 768, "tokens")]
    for arch, kwargs, layer, channels, layout in cases:
        cfg = config_from_dict({"model": {"arch": arch, "kwargs": kwargs}, "layers": [layer],
                                "probe": {"name": "synthetic", "root": str(probe), "image_size": 112},
                                "batch_size": 12, "trust": {"replicates": 0}})
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        dissector = Dissector(cfg, tmp_path / arch, model=model, log=lambda m: None)
        assert dissector.layouts[layer].layout == layout and dissector.layouts[layer].channels == channels
        table, _ = dissector.dissect_current(0, "(random init)", "sha")
        best = table[table["rank"] == 0]
        assert sorted(best.neuron) == list(range(channels)), arch
        assert best.score.max() > 0.01, arch
