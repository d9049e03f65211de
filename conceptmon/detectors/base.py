"""The concept-detector interface.

A detector labels neurons with concepts. The engine runs **one** forward pass per
batch of probe images and hands every configured layer's activations to each layer's
accumulator; the detector never runs the target model itself::

    detector = create_detector(cfg, probe, ctx)
    detector.prepare()                       # probe-level work, cached across checkpoints
    acc = detector.accumulator("layer4", n_units=512)
    for acts, index in batches:              # acts: (B, U, H, W) or (B, U) on ctx.device
        acc.add(acts, index)
    scores = acc.scores()                    # (U, len(detector.concepts)), higher = closer

Rows, ranks, ``interpretable`` flags and the Parquet tables are the engine's job.
"""
from __future__ import annotations

from ..errors import ConceptmonError

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..concepts import ConceptSet
from ..config import Config
from ..probes.base import ProbeSet


class DetectorError(ConceptmonError):
    """A detector that cannot run with this probe set or configuration."""


@dataclass
class RunContext:
    device: torch.device
    cache_dir: Path
    batch_size: int = 64
    num_workers: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)


class LayerAccumulator(ABC):
    """Streams one layer's activations over the probe set; O(units) memory, not O(images)."""

    @abstractmethod
    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        """acts: (B, U, ...) activations of images ``index`` (B,) int64 probe indices."""

    @abstractmethod
    def scores(self) -> torch.Tensor:
        """(U, n_concepts) float32 on any device: higher means the concept fits better."""


class Detector(ABC):
    name: ClassVar[str]
    default_threshold: ClassVar[float]
    needs_masks: ClassVar[bool] = False

    def __init__(self, cfg: Config, probe: ProbeSet, ctx: RunContext):
        self.cfg = cfg
        self.probe = probe
        self.ctx = ctx

    @property
    @abstractmethod
    def concepts(self) -> ConceptSet:
        """The concepts that ``scores()`` columns refer to."""

    @property
    def threshold(self) -> float:
        t = self.cfg.detector.threshold
        return self.default_threshold if t is None else t

    def prepare(self) -> None:
        """Probe-level work done once per run and cached (masks, CLIP features)."""

    def settings(self) -> dict:
        """What changes this detector's output, recorded in the manifest and checked on re-runs."""
        return {"name": self.name, "threshold": self.threshold}

    @abstractmethod
    def accumulator(self, layer: str, n_units: int) -> LayerAccumulator: ...
