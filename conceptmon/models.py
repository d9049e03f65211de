"""Build the target architecture: a torchvision model name, or ``package.module:function``."""
from __future__ import annotations

import difflib

import torch

from .config import ModelConfig
from .errors import ConceptmonError


class ModelError(ConceptmonError):
    """An architecture that cannot be built."""


def _factory(arch: str, base=None):
    if ":" in arch:
        from .registry import RegistryError, import_spec

        try:
            return import_spec(arch, field="model.arch", search=[base])
        except RegistryError as e:
            raise ModelError(str(e)) from None
    import torchvision

    names = torchvision.models.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(
            f"model.arch: unknown architecture {arch!r}{hint}; use a torchvision.models name "
            f"or 'package.module:function'"
        )
    return lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)


def build_model(cfg: ModelConfig, base=None) -> torch.nn.Module:
    """A fresh, randomly initialised model; checkpoints provide the weights.

    ``package.module:function`` is looked up on sys.path, then in ``base`` (the config
    file's folder) and the working directory."""
    factory = _factory(cfg.arch, base)
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
