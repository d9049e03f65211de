"""Build the target architecture from ``model.arch``.

* a torchvision.models name (``resnet18``);
* ``hf:<folder or hub name>``: the transformers class named in its ``config.json``
  (``architectures``, else ``AutoModel``), built offline from the config alone;
* ``timm:<model name>``: ``timm.create_model(name, pretrained=False, **kwargs)``;
* ``package.module:function``: the module is found on ``sys.path``, beside the config
  file, or in the working directory (:func:`conceptmon.registry.import_spec`).

Models are always randomly initialised here and never downloaded: checkpoints provide
the weights.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .config import ModelConfig
from .errors import ConceptmonError
from .registry import RegistryError, did_you_mean, import_spec

HF_PREFIX = "hf:"
TIMM_PREFIX = "timm:"


class ModelError(ConceptmonError):
    """An architecture that cannot be built."""


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load reports off for a moment (errors still raise)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_source(name: str, search: Iterable[Path]) -> str:
    """A local folder for ``name`` (as given, or relative to the config's folder), else the hub name."""
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [given, *(Path(f) / given for f in search)]
    for folder in candidates:
        if folder.is_dir():
            return str(folder)
    return name


def _hf_factory(name: str, search: Iterable[Path]) -> Callable[..., torch.nn.Module]:
    try:
        import transformers
    except ImportError:
        raise ModelError(f"model.arch: {HF_PREFIX}{name} needs transformers: pip install transformers") from None
    source = _hf_source(name, search)

    def build(**overrides) -> torch.nn.Module:
        try:
            with quiet_transformers():
                config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            if Path(source).is_dir():
                raise ModelError(f"model.arch: {HF_PREFIX}{name}: no usable config.json in {source} "
                                 f"({str(e).splitlines()[0]})") from None
            raise ModelError(
                f"model.arch: {HF_PREFIX}{name}: no such folder, and not in the Hugging Face cache (nothing is "
                f"downloaded); fetch it once with `hf download {name}` or point it at a save_pretrained folder"
            ) from None
        for key, value in overrides.items():
            if not hasattr(config, key):
                settings = [*vars(config), *(n for n in dir(type(config))
                                             if isinstance(getattr(type(config), n, None), property))]
                raise ModelError(
                    f"model.kwargs: {key!r} is not a setting of {type(config).__name__} "
                    f"(model.kwargs of hf: models override config.json entries){did_you_mean(key, settings)}"
                )
            setattr(config, key, value)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, architecture, None) if architecture else None
        with quiet_transformers():
            if cls is None:
                return transformers.AutoModel.from_config(config)
            return cls(config)

    return build


def _timm_factory(name: str) -> Callable[..., torch.nn.Module]:
    try:
        import timm
    except ImportError:
        raise ModelError(f"model.arch: {TIMM_PREFIX}{name} needs timm: pip install timm "
                         f"(or pip install conceptmon[timm])") from None
    if not timm.is_model(name):
        raise ModelError(f"model.arch: unknown timm model {name!r}{did_you_mean(name, timm.list_models())}; "
                         f"`python -c \"import timm; print(timm.list_models('*resnet*'))\"` lists them")

    def build(**kwargs) -> torch.nn.Module:
        if kwargs.pop("pretrained", False):
            raise ModelError("model.kwargs: pretrained: true is not used: conceptmon never downloads weights; "
                             "the checkpoints provide them (drop pretrained)")
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _torchvision_factory(arch: str) -> Callable[..., torch.nn.Module]:
    import torchvision

    names = torchvision.models.list_models()
    if arch not in names:
        raise ModelError(
            f"model.arch: unknown architecture {arch!r}{did_you_mean(arch, names)}; use a torchvision.models "
            f"name, hf:<folder>, timm:<name> or 'package.module:function'"
        )
    return lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)


def _factory(arch: str, search: Iterable[Path]) -> Callable[..., torch.nn.Module]:
    if arch.startswith(HF_PREFIX):
        return _hf_factory(arch[len(HF_PREFIX):], search)
    if arch.startswith(TIMM_PREFIX):
        return _timm_factory(arch[len(TIMM_PREFIX):])
    if ":" in arch:
        try:
            factory = import_spec(arch, field="model.arch", search=search)
        except RegistryError as e:
            raise ModelError(str(e)) from None
        if not callable(factory):
            raise ModelError(f"model.arch: {arch} is a {type(factory).__name__}, not a function or class")
        return factory
    return _torchvision_factory(arch)


def config_folders(config_path: str | Path | None) -> list[Path]:
    """Where model specs are looked up besides sys.path and the working directory."""
    return [Path(config_path).resolve().parent] if config_path else []


def build_model(cfg: ModelConfig, *, config_path: str | Path | None = None) -> torch.nn.Module:
    """A fresh, randomly initialised model; checkpoints provide the weights.

    ``config_path`` (``Config.source``): a spec's module or an ``hf:`` folder may sit beside it.
    """
    factory = _factory(cfg.arch, config_folders(config_path))
    try:
        model = factory(**cfg.kwargs)
    except TypeError as e:
        raise ModelError(f"model.kwargs: {cfg.arch} does not accept {cfg.kwargs} ({e})") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model.arch: {cfg.arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else Apple MPS, else the CPU (see conceptmon.devices)."""
    from .devices import resolve_device as resolve

    return resolve(name)
