"""Every extension point by kind, and what is registered in each (``conceptmon plugins``).

Each kind is one :class:`~conceptmon.registry.Registry`; other packages add to it through
the entry-point group shown here (``[project.entry-points."conceptmon.detectors"]``).
"""
from __future__ import annotations

import importlib

from .registry import Registry, RegistryError, did_you_mean

KINDS: dict[str, str] = {
    "detectors": "conceptmon.detectors:DETECTORS",
    "probes": "conceptmon.probes:PROBES",
    "encoders": "conceptmon.encoders:ENCODERS",
    "similarities": "conceptmon.similarity:SIMILARITIES",
    "map-methods": "conceptmon.embedding:MAP_METHODS",
    "statistics": "conceptmon.stats:STATISTICS",
    "report-sections": "conceptmon.report:REPORT_SECTIONS",
}
"""Kind -> where its registry lives (imported only when listed)."""


def registry(kind: str) -> Registry:
    if kind not in KINDS:
        raise RegistryError(f"plugins: unknown kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
    module, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def listing(kinds: list[str] | None = None) -> list[dict]:
    """One row per registered component: kind, name, source, entry-point group."""
    rows = []
    for kind in kinds or list(KINDS):
        reg = registry(kind)
        for entry in reg.entries():
            rows.append({"kind": kind, "name": entry.name, "source": entry.source, "group": reg.group})
    return rows


__all__ = ["KINDS", "listing", "registry"]
