"""Concept detectors behind one registry (``DETECTORS``).

A detector subclasses :class:`Detector`, declares its ``Options`` dataclass (extending
:class:`~conceptmon.config.DetectorOptions`) and registers itself::

    @register_detector
    class MyDetector(Detector):
        name = "mine"
        Options = MyOptions

or from another package through the entry-point group ``conceptmon.detectors``. The
config's ``detector: {name: mine, ...}`` is then validated against ``MyOptions``, and
the detector is built with only what it needs: its options, the probe set, the concept
set and the run context.
"""
from __future__ import annotations

from ..registry import Registry, RegistryError
from .base import (
    Detector, DetectorError, LayerAccumulator, LayerScores, MapExtrema, RunContext, TrustSettings, bootstrap_summary,
    poisson_weights, rank_concepts, summarise_replicates,
)


def _check_detector(name: str, obj) -> None:
    if not (isinstance(obj, type) and issubclass(obj, Detector)):
        raise RegistryError(f"detector.name: {name} is not a conceptmon.detectors.Detector subclass")


DETECTORS: Registry[type[Detector]] = Registry(
    "detector", group="conceptmon.detectors", field="detector.name", check=_check_detector,
    builtins={
        "netdissect": "conceptmon.detectors.netdissect:NetDissect",
        "clip-dissect": "conceptmon.detectors.clipdissect:ClipDissect",
    },
)


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: registers ``cls`` under ``cls.name``."""
    return DETECTORS.register(cls.name)(cls)


def list_detectors() -> list[str]:
    return DETECTORS.names()


def detector_class(name: str) -> type[Detector]:
    return DETECTORS.get(name)


def create_detector(cfg, probe, ctx: RunContext) -> Detector:
    """Build the configured detector for ``probe`` from a whole Config (a convenience for
    scripts and tests; the detector itself receives only its options, probe, concepts, ctx)."""
    from ..concept_sets import concepts_for

    cls = detector_class(cfg.detector.name)
    if cls.needs_masks and not probe.has_masks:
        raise DetectorError(
            f"detector.name: {cls.name} needs segmentation masks, but probe {probe.name!r} has none; "
            f"use probe broden or synthetic, or detector clip-dissect"
        )
    concepts = concepts_for(cls, cfg.concepts, probe, base=cfg.base_dir, log=ctx.log)
    return cls(cfg.detector.options, probe, concepts, ctx)


__all__ = [
    "DETECTORS", "Detector", "DetectorError", "LayerAccumulator", "LayerScores", "MapExtrema", "RunContext", "TrustSettings",
    "bootstrap_summary", "create_detector", "detector_class", "list_detectors", "poisson_weights",
    "rank_concepts", "register_detector", "summarise_replicates",
]
