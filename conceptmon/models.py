"""Build the target architecture: a torchvision model name, or ``package.module:function``."""
from __future__ import annotations

import difflib
import importlib

import torch

from .config import ModelConfig
from .errors import ConceptmonError


class ModelError(ConceptmonError):
    """An architecture that cannot be built."""


def _factory(arch: str):
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelError(f"model.arch: cannot import {module_name!r} ({e})") from None
        try:
            return getattr(module, attr)
        except AttributeError:
            close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelError(f"model.arch: {module_name} has no {attr!r}{hint}") from None
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


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A fresh, randomly initialised model; checkpoints provide the weights."""
    factory = _factory(cfg.arch)
    try:
        model = factory(**cfg.kwargs)
    except TypeError as e:
        raise ModelError(f"model.kwargs: {cfg.arch} does not accept {cfg.kwargs} ({e})") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model.arch: {cfg.arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else Apple MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device: {name} requested but CUDA is not available here (use device: auto or cpu)")
    return dev
