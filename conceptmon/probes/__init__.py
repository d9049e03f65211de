"""Probe sets behind one registry: ``create_probe(cfg.probe)``, ``list_probes()``."""
from __future__ import annotations

import difflib
from typing import Callable

from ..config import ProbeConfig
from .base import Annotation, ProbeError, ProbeSet

_REGISTRY: dict[str, Callable[[ProbeConfig], ProbeSet]] = {}


def register_probe(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def list_probes() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_probe(cfg: ProbeConfig) -> ProbeSet:
    _load_builtin()
    if cfg.name not in _REGISTRY:
        close = difflib.get_close_matches(cfg.name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ProbeError(f"probe.name: unknown probe set {cfg.name!r}{hint}; choices: {', '.join(list_probes())}")
    return _REGISTRY[cfg.name](cfg)


def _load_builtin() -> None:
    # Imported lazily so that importing conceptmon stays cheap.
    import importlib

    for module in ("broden", "synthetic", "cifar", "folder"):
        importlib.import_module(f"{__name__}.{module}")


__all__ = ["Annotation", "ProbeError", "ProbeSet", "create_probe", "list_probes", "register_probe"]
