"""The concept-detector interface.

A detector labels neurons with concepts. The engine runs **one** forward pass per
batch of probe images and hands every configured layer's activations to each layer's
accumulator; the detector never runs the target model itself::

    detector = DETECTORS.get("netdissect")(options, probe, concepts, ctx)
    detector.prepare()                       # probe-level work, cached across checkpoints
    acc = detector.accumulator("layer4", n_units=512)
    for acts, index in batches:              # acts: (B, U, H, W) or (B, U) on ctx.device
        acc.add(acts, index)
    result = acc.scores()                    # LayerScores: (U, M) scores, higher = closer,
                                             # plus dead units and bootstrap confidence

Rows, ranks, ``interpretable`` flags and the Parquet tables are the engine's job.

**Label confidence.** With ``ctx.trust.replicates = B > 0`` an accumulator may resample
the probe images B times (Poisson(1) weights per image and replicate, drawn by
:func:`poisson_weights` so every detector resamples the same way) and summarise the
replicate scores with :func:`bootstrap_summary`: per unit, the share of replicates whose
top-1 concept is the reported one, and a 90 % interval of the reported concept's score.
Ranking is always :func:`rank_concepts` (score descending, lower concept index first on
ties), so "the reported top-1" means the same thing everywhere.
"""
from __future__ import annotations

from ..errors import ConceptmonError

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..concepts import ConceptSet
from ..config import DetectorOptions
from ..probes.base import ProbeSet


class DetectorError(ConceptmonError):
    """A detector that cannot run with this probe set or configuration."""


@dataclass(frozen=True)
class TrustSettings:
    """Bootstrap of label confidence: ``replicates`` resamples (0 = off), seeded by ``seed``."""

    replicates: int = 0
    seed: int = 0


@dataclass
class RunContext:
    device: torch.device
    cache_dir: Path
    batch_size: int = 64
    num_workers: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)
    trust: TrustSettings = field(default_factory=TrustSettings)


@dataclass
class LayerScores:
    """What an accumulator returns for one layer.

    ``scores`` (U, M) float32, higher = closer. ``dead`` (U,) bool: units with no signal
    at all (no active pixel, constant activation); they get no concept. ``confidence``
    (U,) in [0, 1] and ``score_low``/``score_high`` (U,) come from the bootstrap (None when
    it is off or the detector does not resample). ``interpretable`` (U,) bool, when the
    detector decides it by its own rule (e.g. a calibrated null); None = best score >=
    the detector's threshold.
    """

    scores: torch.Tensor
    dead: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    score_low: torch.Tensor | None = None
    score_high: torch.Tensor | None = None
    interpretable: torch.Tensor | None = None

    @classmethod
    def of(cls, value: "LayerScores | torch.Tensor") -> "LayerScores":
        """Accept a bare (U, M) tensor from simple detectors."""
        return value if isinstance(value, LayerScores) else cls(scores=value)


# ----------------------------------------------------------------------------- shared maths


def rank_concepts(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, indices) per row: score descending, ties to the lower concept index.

    ``torch.topk`` does not define the order of ties; a stable sort does, so the reported
    top-1, the bootstrap's top-1 and the tables always agree.
    """
    k = min(int(k), scores.shape[-1])
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def poisson_weights(n_images: int, replicates: int, seed: int, device=None) -> torch.Tensor:
    """(replicates, n_images) float32 Poisson(1) bootstrap weights, the same for every
    detector, layer and device given (n_images, replicates, seed)."""
    generator = torch.Generator().manual_seed(int(seed))
    weights = torch.poisson(torch.ones(replicates, n_images), generator=generator)
    return weights.to(device) if device is not None else weights


def bootstrap_summary(
    replicate_scores: torch.Tensor, reported: torch.Tensor, interval: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per unit: share of replicates whose top-1 is ``reported``, and the ``interval``
    (default 90 %) range of the reported concept's replicate score.

    replicate_scores (B, U, M); reported (U,) long concept indices. A unit can be
    summarised in chunks of units: nothing here mixes units.
    """
    b = replicate_scores.shape[0]
    _, top = rank_concepts(replicate_scores, 1)  # (B, U, 1)
    idx = reported.view(1, -1, 1).expand(b, -1, 1)
    own = torch.gather(replicate_scores, 2, idx)[..., 0]  # (B, U)
    return summarise_replicates(top[..., 0], own, reported, interval)


def summarise_replicates(top1: torch.Tensor, own: torch.Tensor, reported: torch.Tensor,
                         interval: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From each replicate's top-1 concept (B, U) and its score of the reported concept
    (B, U): the share of replicates agreeing with ``reported`` (U,) and the score interval."""
    confidence = (top1 == reported.to(top1.device)[None, :]).float().mean(dim=0)
    tail = (1.0 - interval) / 2
    own = own.float()
    return confidence, torch.quantile(own, tail, dim=0), torch.quantile(own, 1.0 - tail, dim=0)


@dataclass(frozen=True)
class MapExtrema:
    """A batch's reductions that the engine needs anyway (the finite check, top images) and
    shares with accumulators: each (image, unit)'s maximum (B, U), each unit's minimum (U,)."""

    map_max: torch.Tensor
    unit_min: torch.Tensor

    @classmethod
    def of(cls, acts: torch.Tensor) -> "MapExtrema":
        """acts: (B, U, H, W) maps or (B, U) linear outputs. NaN propagates into both."""
        if acts.dim() == 2:
            return cls(acts, acts.amin(dim=0))
        return cls(acts.amax(dim=(2, 3)), acts.amin(dim=(2, 3)).amin(dim=0))  # (contiguous reductions: faster)


class LayerAccumulator(ABC):
    """Streams one layer's activations over the probe set; O(units) memory, not O(images)."""

    @abstractmethod
    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        """acts: (B, U, ...) activations of images ``index`` (B,) int64 probe indices."""

    def add_with_extrema(self, acts: torch.Tensor, index: torch.Tensor, extrema: MapExtrema) -> None:
        """What the engine calls, with the batch's :class:`MapExtrema`: an accumulator that
        needs them overrides this rather than computing them again. By default ``add``."""
        self.add(acts, index)

    def needs_another_pass(self) -> bool:
        """Asked after each pass over the whole probe set: True to be fed the same batches
        once more (through ``add_with_extrema``) before ``scores()``. By default False."""
        return False

    @abstractmethod
    def scores(self) -> "LayerScores | torch.Tensor":
        """:class:`LayerScores` (or a bare (U, n_concepts) tensor): higher means closer."""


class Detector(ABC):
    """Labels neurons with concepts from activations streamed over a probe set.

    Class attributes: ``name`` (registry name), ``Options`` (its options dataclass,
    extending DetectorOptions), ``default_threshold``, ``needs_masks`` (probe sets with
    segmentation masks only), ``uses_probe_labels`` (its concepts are the probe's own
    mask labels rather than the config's ``concepts:``), ``reads_in_random_order`` (the
    engine reads the probe in one fixed random order, for running estimates that assume
    none; results must not depend on the order), ``version`` (bump when results change
    for the same inputs: it is part of every result's fingerprint).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = DetectorOptions
    default_threshold: ClassVar[float]
    needs_masks: ClassVar[bool] = False
    reads_in_random_order: ClassVar[bool] = False
    uses_probe_labels: ClassVar[bool] = False
    version: ClassVar[int] = 1

    def __init__(self, options, probe: ProbeSet, concepts: ConceptSet, ctx: RunContext):
        self.options = options if options is not None else self.Options()
        self.probe = probe
        self._concepts = concepts
        self.ctx = ctx

    @property
    def concepts(self) -> ConceptSet:
        """The concepts that ``scores()`` columns refer to."""
        return self._concepts

    @property
    def threshold(self) -> float:
        t = getattr(self.options, "threshold", None)
        return self.default_threshold if t is None else t

    def prepare(self) -> None:
        """Probe-level work done once per run and cached (masks, CLIP features)."""

    def settings(self) -> dict:
        """What changes this detector's output, recorded in the manifest and checked on
        re-runs: its name, version, options and resolved threshold (JSON-serialisable)."""
        import dataclasses

        options = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}
        return {**options, "name": self.name, "version": self.version, "threshold": self.threshold}

    @abstractmethod
    def accumulator(self, layer: str, n_units: int) -> LayerAccumulator: ...
