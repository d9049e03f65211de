"""Typed configuration, read from YAML and validated once.

Every error names the file and the dotted field (``config.yaml: detector.quantile: ...``)
and says what would be valid. CLI options override fields through :func:`override`.

**Components own their options.** ``detector:`` and ``probe:`` name a registered
component (``name: netdissect``) and carry that component's own options next to the
name (``quantile: 0.005``). Each component declares an options dataclass (a detector's
``Options``, a probe's ``options=`` at registration); the config validates the keys
against it, with the same one-line errors as every other field, and the component
receives only its options. Keys that 0.1 accepted for every detector or probe
(``similarity`` beside ``name: netdissect``, say) still load and are ignored.

**Layers** are names, or mappings that say how to read the layer's output::

    layers: [layer3, {name: features.1, layout: nhwc}, {name: blocks.5, layout: tokens, prefix_tokens: 1}]
"""
from __future__ import annotations

from .errors import ConceptmonError

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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


LAYOUTS = ("auto", "nchw", "nhwc", "tokens", "linear")
"""How a layer's output is read: ``auto`` detects it from the module and output shape."""


class LayerSpec(str):
    """A layer name (it *is* the string) plus how to read its output.

    ``layout``: auto | nchw (B, C, H, W) | nhwc (B, H, W, C: Swin, ConvNeXt blocks) |
    tokens (B, prefix + h*w, C: ViT; the prefix tokens -- class, registers -- are left out)
    | linear (B, C). ``prefix_tokens`` and ``grid`` ([h, w]) are for tokens, inferred from
    the token count and the input size when null.
    """

    layout: str
    prefix_tokens: int | None
    grid: tuple[int, int] | None

    def __new__(cls, name: str, layout: str = "auto", prefix_tokens: int | None = None, grid=None):
        obj = super().__new__(cls, name)
        obj.layout = layout
        obj.prefix_tokens = prefix_tokens
        obj.grid = tuple(grid) if grid is not None else None
        return obj

    @property
    def name(self) -> str:
        return str.__str__(self)

    def to_value(self):
        """What YAML and JSON hold: the bare name unless something is set."""
        if self.layout == "auto" and self.prefix_tokens is None and self.grid is None:
            return self.name
        value: dict[str, Any] = {"name": self.name, "layout": self.layout}
        if self.prefix_tokens is not None:
            value["prefix_tokens"] = self.prefix_tokens
        if self.grid is not None:
            value["grid"] = list(self.grid)
        return value

    def __reduce__(self):
        return (LayerSpec, (self.name, self.layout, self.prefix_tokens, self.grid))

    def __deepcopy__(self, memo):
        return self


def parse_layer(value, where: str) -> LayerSpec:
    if isinstance(value, LayerSpec):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{where}: empty layer name")
        return LayerSpec(value.strip())
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a layer name or {{name: ..., layout: ...}}, got {value!r}")
    known = ("name", "layout", "prefix_tokens", "grid")
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key{_close(str(unknown[0]), known)}; "
                          f"valid keys here: {', '.join(known)}")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name: expected the layer's dotted module name, got {name!r}")
    layout = value.get("layout", "auto")
    if layout not in LAYOUTS:
        raise ConfigError(f"{where}.layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}"
                          f"{_close(str(layout), LAYOUTS)}")
    prefix = value.get("prefix_tokens")
    if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
        raise ConfigError(f"{where}.prefix_tokens: expected a whole number >= 0, got {prefix!r}")
    grid = value.get("grid")
    if grid is not None:
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
            raise ConfigError(f"{where}.grid: expected [height, width] in patches, got {grid!r}")
    if (prefix is not None or grid is not None) and layout not in ("tokens", "auto"):
        raise ConfigError(f"{where}: prefix_tokens and grid apply to layout tokens, not {layout}")
    return LayerSpec(name.strip(), "tokens" if layout == "auto" and (prefix is not None or grid is not None)
                     else layout, prefix, grid)


class ComponentSpec:
    """``name`` plus the options the named component declares; see the module docstring.

    Subclasses set ``section`` (the config key), ``default_name``, ``fixed`` (keys that
    belong to the spec itself, with their types and defaults) and ``legacy`` (0.1 keys
    accepted and ignored when the component has no such option). Options are read as
    attributes too (``cfg.detector.quantile``).
    """

    section: ClassVar[str]
    default_name: ClassVar[str]
    fixed: ClassVar[dict[str, tuple[Any, Any]]] = {}
    legacy: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str | None = None, options: Any = None, **values):
        self.name = str(name if name is not None else self.default_name)
        hints = {k: tp for k, (tp, _) in self.fixed.items()}
        for key, (tp, default) in self.fixed.items():
            value = values.pop(key, default() if callable(default) else default)
            setattr(self, key, _coerce(value, tp, f"{self.section}.{key}") if key in hints else value)
        self.ignored: tuple[str, ...] = ()
        if options is None:
            options_cls = self.options_class(self.name)
            unused = [k for k in values if k in self.legacy and k not in _field_names(options_cls)]
            self.ignored = tuple(unused)
            kept = {k: v for k, v in values.items() if k not in unused}
            options = _build_options(options_cls, kept, f"{self.section}.")
        elif values:
            raise TypeError(f"give either options= or option values, not both ({', '.join(values)})")
        self.options = options

    @classmethod
    def options_class(cls, name: str) -> type | None:
        """The options dataclass the registered component declares (None: no options)."""
        raise NotImplementedError

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        options = self.__dict__.get("options")
        if options is not None and key in _field_names(type(options)):
            return getattr(options, key)
        raise AttributeError(f"{self.section} {self.__dict__.get('name')!r} has no option {key!r}")

    def option_values(self) -> dict:
        return dataclasses.asdict(self.options) if self.options is not None else {}

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: getattr(self, k) for k in self.fixed}, **self.option_values()}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"

    def __deepcopy__(self, memo):
        import copy

        new = object.__new__(type(self))
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)) if cls is not None else ()


def _build_options(options_cls, values: dict, prefix: str):
    if options_cls is None:
        if values:
            k = next(iter(values))
            raise ConfigError(f"{prefix}{k}: unknown key; this component takes no options")
        return None
    options = _build(options_cls, values, prefix)
    check = getattr(options, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return options


class DetectorSpec(ComponentSpec):
    """``detector: {name: netdissect, quantile: 0.005}``: a registered detector and its options."""

    section = "detector"
    default_name = "netdissect"
    legacy = frozenset({"quantile", "threshold", "similarity", "params", "clip_model", "pool", "clip_batch_size"})

    @classmethod
    def options_class(cls, name: str):
        from .detectors import DETECTORS

        return getattr(DETECTORS.get(name), "Options", None)


class ProbeConfig(ComponentSpec):
    """``probe: {name: synthetic, root: ..., n: 1000}``: a registered probe set, the keys
    every probe shares (root, image_size, mean, std, limit) and the probe's own options."""

    section = "probe"
    default_name = "synthetic"
    fixed = {
        "root": (str | None, None),
        "image_size": (int | None, None),
        "mean": (list[float], lambda: [0.485, 0.456, 0.406]),
        "std": (list[float], lambda: [0.229, 0.224, 0.225]),
        "limit": (int | None, None),
    }
    legacy = frozenset({"split", "n", "seed"})

    @classmethod
    def options_class(cls, name: str):
        from .probes import PROBES

        return PROBES.get(name).options


@dataclass
class DetectorOptions:
    """What every detector accepts; a detector's ``Options`` extends it."""

    threshold: float | None = None
    """A neuron is interpretable when its best score >= this; null = the detector's default."""


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
    layers: list[LayerSpec] = field(default_factory=list)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    detector: DetectorSpec = field(default_factory=DetectorSpec)
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
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}
        for key, value in d.items():
            if isinstance(value, ComponentSpec):
                d[key] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                d[key] = dataclasses.asdict(value)
        d["layers"] = [layer.to_value() if isinstance(layer, LayerSpec) else layer for layer in self.layers]
        return _plain(d)

    @property
    def base_dir(self) -> Path | None:
        """The folder of the YAML file this came from (relative paths and modules are found there)."""
        return Path(self.source).resolve().parent if self.source else None


def _plain(value):
    """Deep copy into plain dicts, lists and scalars (what YAML and JSON hold)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, LayerSpec):
        return value.to_value()
    return value


# ----------------------------------------------------------------------------- parsing


def _close(name: str, choices) -> str:
    from .registry import did_you_mean

    return did_you_mean(name, choices)


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
    if isinstance(tp, type) and issubclass(tp, ComponentSpec):
        if value is None:
            value = {}
        if isinstance(value, ComponentSpec):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        from .registry import RegistryError

        try:
            return tp(**value)
        except RegistryError as e:
            raise ConfigError(str(e)) from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
    if tp is LayerSpec:
        return parse_layer(value, where)
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
    from .embedding import MAP_METHODS

    if cfg.embedding.map_method not in MAP_METHODS:
        raise ConfigError(f"embedding.map_method: expected one of {', '.join(MAP_METHODS.names())}, "
                          f"got {cfg.embedding.map_method!r}")
    names = [layer.name for layer in cfg.layers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"layers: {duplicates[0]} is listed twice")
    import re

    if not re.match(r"^(auto|cpu|mps|cuda(:\d+)?)$", cfg.device):  # conceptmon.devices checks presence
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
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


def _read_yaml(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    size = expanded_size(data)
    if size > MAX_CONFIG_VALUES:
        raise ConfigError(f"{path}: holds {size:.3g} values once YAML aliases are expanded (limit "
                          f"{MAX_CONFIG_VALUES:,}); write the values out instead of nesting aliases")
    return data


MAX_CONFIG_VALUES = 100_000
"""A config with more values than this once YAML aliases are expanded is refused: PyYAML
shares aliased objects, but anything that walks the config (validation, hashing,
JSON) expands them, and nine aliases of aliases become billions of values."""


def expanded_size(value, _memo: dict | None = None) -> int:
    """Number of values in ``value`` with shared (aliased) parts counted every time they appear."""
    memo = {} if _memo is None else _memo
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a self-referencing alias (&a [*a]) counts once instead of recursing forever
    children = value.values() if isinstance(value, dict) else value
    memo[key] = 1 + sum(expanded_size(v, memo) for v in children)
    return memo[key]


def read_out_setting(path: str | Path) -> str | None:
    """Only the ``out:`` value of a config file (None when absent or not a string)."""
    data = _read_yaml(Path(path))
    value = data.get("out") if isinstance(data, dict) else None
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


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
    return config_from_dict(_read_yaml(path), source=str(path))


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
