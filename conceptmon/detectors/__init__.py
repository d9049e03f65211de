"""Concept detectors behind one registry (``create_detector``, ``list_detectors``).

Add one by subclassing :class:`Detector` and decorating it with ``@register_detector``.
"""
from __future__ import annotations

import difflib

from ..config import Config
from ..probes.base import ProbeSet
from .base import (
    Detector, DetectorError, LayerAccumulator, LayerScores, RunContext, TrustSettings, bootstrap_summary,
    poisson_weights, rank_concepts,
)

_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import importlib

    for module in ("netdissect", "clipdissect"):
        importlib.import_module(f"{__name__}.{module}")


def list_detectors() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def detector_class(name: str) -> type[Detector]:
    _load_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DetectorError(f"detector.name: unknown detector {name!r}{hint}; choices: {', '.join(list_detectors())}")
    return _REGISTRY[name]


def create_detector(cfg: Config, probe: ProbeSet, ctx: RunContext) -> Detector:
    cls = detector_class(cfg.detector.name)
    if cls.needs_masks and not probe.has_masks:
        raise DetectorError(
            f"detector.name: {cls.name} needs segmentation masks, but probe {probe.name!r} has none; "
            f"use probe broden or synthetic, or detector clip-dissect"
        )
    return cls(cfg, probe, ctx)


__all__ = [
    "Detector", "DetectorError", "LayerAccumulator", "LayerScores", "RunContext", "TrustSettings", "bootstrap_summary",
    "create_detector", "list_detectors", "poisson_weights", "rank_concepts", "register_detector",
]
