import pytest

from conceptmon.config import ConfigError, config_from_dict, load_config, override, resolve_out


def test_defaults_and_nested_values():
    cfg = config_from_dict({"layers": ["layer2", "layer4"], "detector": {"quantile": 0.01}})
    assert cfg.layers == ["layer2", "layer4"]
    assert cfg.detector.quantile == 0.01
    assert cfg.detector.name == "netdissect"
    assert cfg.device == "auto" and cfg.top_k == 5


def test_unknown_key_names_field_and_close_match():
    with pytest.raises(ConfigError, match=r"detector\.quantil: unknown key \(did you mean quantile\?\)"):
        config_from_dict({"detector": {"quantil": 0.01}})
    with pytest.raises(ConfigError, match=r"^lyers: unknown key \(did you mean layers\?\)"):
        config_from_dict({"lyers": ["a"]})


@pytest.mark.parametrize(
    "data,message",
    [
        ({"detector": {"quantile": 2}}, r"detector\.quantile: must be between 0 and 1"),
        ({"detector": {"quantile": "high"}}, r"detector\.quantile: expected a number"),
        ({"top_k": 0}, r"top_k: must be at least 1"),
        ({"batch_size": 2.5}, r"batch_size: expected an integer"),
        ({"probe": {"mean": [0.5, 0.5]}}, r"probe\.mean: expected 3 numbers"),
        ({"probe": {"limit": True}}, r"probe\.limit: expected an integer"),
        ({"device": "gpu"}, r"device: expected auto, cpu"),
        ({"model": "resnet18"}, r"model: expected a mapping"),
        ({"embedding": {"temperature": 0}}, r"embedding\.temperature: must be positive"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_missing_default_config_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="conceptmon init"):
        load_config()
    with pytest.raises(ConfigError, match="other.yaml: config file not found"):
        load_config(tmp_path / "other.yaml")


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("layers: [a, b\nmodel: {arch: x}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line \d+ invalid YAML"):
        load_config(path)
    path.write_text("detector:\n  name: netdissect\n  treshold: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: detector\.treshold: unknown key \(did you mean threshold\?\)"):
        load_config(path)


def test_overrides_are_validated_like_the_file():
    cfg = config_from_dict({"layers": ["a"]})
    new = override(cfg, layers=["b", "c"], **{"probe.limit": 10, "device": None})
    assert new.layers == ["b", "c"] and new.probe.limit == 10 and new.device == "auto"
    with pytest.raises(ConfigError, match="probe.limit"):
        override(cfg, **{"probe.limit": 0})


def test_out_resolution(tmp_path):
    cfg = config_from_dict({"out": "from_config"})
    assert str(resolve_out(cfg, "cli")) == "cli"
    assert str(resolve_out(cfg, None)) == "from_config"
    assert str(resolve_out(config_from_dict({}), None)) == "conceptmon_out"


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path)
        assert cfg.layers, path


def test_readme_config_block_is_valid_and_complete():
    """Every config key, and every option of every built-in detector and probe, is documented."""
    import dataclasses
    from pathlib import Path

    import yaml

    from conceptmon.config import ComponentSpec, Config
    from conceptmon.detectors import DETECTORS
    from conceptmon.probes import PROBES

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Configuration\n")[1].split("\n## ")[0]
    blocks = [b.split("```")[0] for b in section.split("```yaml\n")[1:]]
    assert blocks, "no yaml block under ## Configuration"
    for block in blocks:
        config_from_dict(yaml.safe_load(block))  # every key documented there is a real key

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            factory = f.default_factory
            if factory is not dataclasses.MISSING and isinstance(factory, type) and issubclass(factory, ComponentSpec):
                yield f"{prefix}{f.name}.name"
                yield from (f"{prefix}{f.name}.{k}" for k in factory.fixed)
            elif factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
                yield from keys(factory, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    for name in DETECTORS.names():
        yield_from = [f"detector.{f.name}" for f in dataclasses.fields(DETECTORS.get(name).Options)]
        documented_somewhere = [k for k in yield_from if f"  {k.split('.', 1)[1]}:" in section]
        assert documented_somewhere == yield_from, f"options of detector {name} missing from the README"
    for name in PROBES.names():
        options = PROBES.get(name).options
        for f in dataclasses.fields(options) if options else []:
            assert f"  {f.name}:" in section, f"option {f.name} of probe {name} missing from the README"

    documented = set()
    for block in blocks:
        for k, v in yaml.safe_load(block).items():
            documented |= {f"{k}.{kk}" for kk in v} if isinstance(v, dict) else {k}
    missing = sorted(set(keys(Config)) - documented)
    assert not missing, f"config keys missing from the README: {missing}"
