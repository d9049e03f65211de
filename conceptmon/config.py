"""Typed configuration, read from YAML and validated once.

Every error names the file and the dotted field (``config.yaml: detector.quantile: ...``)
and says what would be valid. CLI options override fields through :func:`override`.
"""
from __future__ import annotations

from .errors import ConceptmonError

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = "conceptmon.yaml"
DEFAULT_OUT = "conceptmon_out"


class ConfigError(ConceptmonError):
    """A config value that is missing, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    """A torchvision.models name, or "package.module:function"."""
    kwargs: dict = field(default_factory=dict)


@dataclass
class ProbeConfig:
    name: str = "synthetic"
    """broden | synthetic | cifar100 | folder."""
    root: str | None = None
    image_size: int | None = None
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    limit: int | None = None
    split: str | None = None
    """cifar100: train | test; broden: keep only rows of this split (null keeps all)."""
    n: int = 1000
    """synthetic only: number of images to generate when ``root`` holds none yet."""
    seed: int = 0
    """synthetic only: generator seed."""


@dataclass
class DetectorConfig:
    name: str = "netdissect"
    quantile: float = 0.005
    """Network Dissection: a unit is 'on' above its (1 - quantile) activation quantile."""
    threshold: float | None = None
    """A neuron is interpretable when its best score >= this; null = the detector's default."""
    similarity: str = "soft_wpmi"
    params: dict = field(default_factory=dict)
    clip_model: str = "openai/clip-vit-base-patch16"
    pool: str = "avg"
    clip_batch_size: int = 64


@dataclass
class EmbeddingConfig:
    encoder: str = "minilm"
    """minilm (offline sentence encoder) or clip:<hf name or folder>."""
    temperature: float = 1.0
    anchors: list[str] = field(default_factory=list)
    map_fit: str = "vocabulary"
    """vocabulary (concepts + anchors, default) or neurons (all neurons of all epochs)."""
    placement: str = "mean"
    """mean (lambda-weighted mean of the concepts' map positions, exact and fast) or transform (UMAP.transform)."""
    map_method: str = "umap"
    """umap or pca (instant, linear)."""
    seed: int = 0


@dataclass
class TrustConfig:
    replicates: int = 50
    """Bootstrap resamples of the probe images for each label's confidence; 0 turns it off."""
    seed: int = 0
    """Seeds the resampling weights: the same seed gives the same confidences."""
    level: float = 0.9
    """A label is *confident* when its confidence is at least this (changes between two
    confident labels are confident changes)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    layers: list[str] = field(default_factory=list)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    concepts: str | None = None
    """Concept set for detectors that need one: broden | cifar100 | synthetic | path/to/words.txt."""
    checkpoints: str | None = None
    out: str | None = None
    run: str | None = None
    top_k: int = 5
    batch_size: int = 64
    device: str = "auto"
    num_workers: int = 0
    amp: bool = False
    cache_dir: str | None = None
    source: str | None = field(default=None, metadata={"internal": True})
    """The YAML file this came from (set by load_config; not a YAML key)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


# ----------------------------------------------------------------------------- parsing


def _close(name: str, choices) -> str:
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where + ".")
    if origin is list:
        if isinstance(value, str):  # "a,b" is accepted where a list is expected
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{prefix}{k}: unknown key{_close(str(k), fields)}; valid keys here: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Range checks that types alone do not catch; raises ConfigError naming the field."""
    if not 0 < cfg.detector.quantile < 1:
        raise ConfigError(f"detector.quantile: must be between 0 and 1, got {cfg.detector.quantile}")
    if cfg.top_k < 1:
        raise ConfigError(f"top_k: must be at least 1, got {cfg.top_k}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size: must be at least 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers: must be 0 or more, got {cfg.num_workers}")
    if cfg.probe.limit is not None and cfg.probe.limit < 1:
        raise ConfigError(f"probe.limit: must be at least 1, got {cfg.probe.limit}")
    if cfg.probe.image_size is not None and cfg.probe.image_size < 8:
        raise ConfigError(f"probe.image_size: must be at least 8 pixels, got {cfg.probe.image_size}")
    for key in ("mean", "std"):
        v = getattr(cfg.probe, key)
        if len(v) != 3:
            raise ConfigError(f"probe.{key}: expected 3 numbers (R, G, B in [0,1] units), got {v}")
    if any(s <= 0 for s in cfg.probe.std):
        raise ConfigError(f"probe.std: must be positive, got {cfg.probe.std}")
    if cfg.trust.replicates < 0 or cfg.trust.replicates > 10000:
        raise ConfigError(f"trust.replicates: must be between 0 (off) and 10000, got {cfg.trust.replicates}")
    if not 0 < cfg.trust.level <= 1:
        raise ConfigError(f"trust.level: must be in (0, 1], got {cfg.trust.level}")
    if cfg.embedding.temperature <= 0:
        raise ConfigError(f"embedding.temperature: must be positive, got {cfg.embedding.temperature}")
    if cfg.embedding.map_fit not in ("vocabulary", "neurons"):
        raise ConfigError(
            f"embedding.map_fit: expected vocabulary or neurons, got {cfg.embedding.map_fit!r}"
        )
    if cfg.embedding.placement not in ("mean", "transform"):
        raise ConfigError(f"embedding.placement: expected mean or transform, got {cfg.embedding.placement!r}")
    if cfg.embedding.map_method not in ("umap", "pca"):
        raise ConfigError(f"embedding.map_method: expected umap or pca, got {cfg.embedding.map_method!r}")
    if cfg.detector.pool not in ("avg", "max"):
        raise ConfigError(f"detector.pool: expected avg or max, got {cfg.detector.pool!r}")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")):
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    return cfg


def config_from_dict(data: dict | None, source: str | None = None) -> Config:
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = validate(_build(Config, data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    cfg.source = source
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """Read ``path`` (default ./conceptmon.yaml). A missing default file says how to make one."""
    explicit = path is not None
    path = Path(path if explicit else DEFAULT_CONFIG)
    if not path.exists():
        if explicit:
            raise ConfigError(f"{path}: config file not found")
        raise ConfigError(
            f"no config: ./{DEFAULT_CONFIG} not found; pass --config PATH or create one with "
            f"`conceptmon init` (e.g. `conceptmon init --arch resnet18 --probe synthetic`)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    return config_from_dict(data, source=str(path))


def override(cfg: Config, **values) -> Config:
    """Apply CLI overrides given as dotted keys (``probe.limit=10``); None means 'not given'."""
    data = cfg.to_dict()
    changed = False
    for dotted, value in values.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
        changed = True
    if not changed:
        return cfg
    return config_from_dict(data, source=cfg.source)


def resolve_out(cfg: Config | None, out: str | None) -> Path:
    """The output folder: --out, else the config's ``out:``, else ./conceptmon_out."""
    if out:
        return Path(out)
    if cfg is not None and cfg.out:
        return Path(cfg.out)
    return Path(DEFAULT_OUT)


def run_name(cfg: Config, out: Path) -> str:
    return cfg.run or Path(out).resolve().name
