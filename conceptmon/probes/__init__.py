"""Probe sets behind one registry (``PROBES``): ``create_probe(cfg.probe)``, ``list_probes()``.

A probe set is registered as a factory that opens it from the ``probe:`` config section,
with the options dataclass it accepts and, optionally, the named concept set it offers
to detectors that take one (``concepts: cifar100``, ``concepts: broden:/path``)::

    @register_probe("mine", options=MineOptions, vocabulary=mine_concepts)
    def open_mine(cfg: ProbeConfig) -> ProbeSet: ...

Other packages register through the entry-point group ``conceptmon.probes`` (the entry
point names a ``ProbeType``, or a factory function carrying ``options``/``vocabulary``
attributes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry, RegistryError, origin_of
from .base import Annotation, ProbeError, ProbeSet


@dataclass(frozen=True)
class ProbeType:
    """A registered probe set: how to open it, what options it takes, what words it offers."""

    name: str
    open: Callable
    options: type | None = None
    """Dataclass of the options next to ``name`` in ``probe:`` (beyond root, image_size, mean, std, limit)."""
    vocabulary: Callable | None = None
    """``vocabulary(argument, probe) -> ConceptSet`` for ``concepts: <name>[:argument]``."""
    example: Callable | None = None
    """``example(folder) -> dict``: writes a small instance into ``folder`` and returns its
    ``probe:`` config section; the contract tests run every probe set that has one."""

    def __call__(self, cfg):
        return self.open(cfg)


def _as_probe_type(name: str, obj) -> ProbeType:
    if isinstance(obj, ProbeType):
        return obj
    if callable(obj):
        return ProbeType(name, obj, getattr(obj, "options", None), getattr(obj, "vocabulary", None),
                         getattr(obj, "example", None))
    raise RegistryError(f"probe.name: {name} is not a probe factory")


class _ProbeRegistry(Registry[ProbeType]):
    def _add(self, name, obj, source):
        super()._add(name, _as_probe_type(name, obj), source)

    def get(self, name, *, search=()):
        return _as_probe_type(str(name), super().get(name, search=search))


PROBES: Registry[ProbeType] = _ProbeRegistry(
    "probe set", group="conceptmon.probes", field="probe.name",
    builtins={
        "synthetic": "conceptmon.probes.synthetic:synthetic_from_config",
        "broden": "conceptmon.probes.broden:broden_from_config",
        "cifar100": "conceptmon.probes.cifar:cifar_from_config",
        "folder": "conceptmon.probes.folder:folder_from_config",
    },
)


def register_probe(name: str, *, options: type | None = None, vocabulary: Callable | None = None,
                   example: Callable | None = None):
    """Decorator for a factory ``(ProbeConfig) -> ProbeSet``; returns the factory unchanged."""

    def deco(factory):
        PROBES.register(name, source=origin_of(factory))(ProbeType(name, factory, options, vocabulary, example))
        return factory

    return deco


def list_probes() -> list[str]:
    return PROBES.names()


def create_probe(cfg) -> ProbeSet:
    return PROBES.get(cfg.name).open(cfg)


__all__ = ["Annotation", "PROBES", "ProbeError", "ProbeSet", "ProbeType", "create_probe", "list_probes",
           "register_probe"]
