"""Planted units: a self-test of the dissection pipeline on the synthetic probe set.

:class:`PlantedUnits` is a torch module whose output channels are detectors with known
concepts, computed from the input pixels alone (no labels): a few palette colours
(exact RGB match), the ``striped`` texture (two colours in near-equal shares, unchanged
by a shift along one direction), the ``beach`` scene (a layout rule, below), one dead
unit (constant 0) and one noise unit. :func:`run_planted_check` dissects it with the
engine's one-model path (``collect_layers``) and reports, per unit, the expected and the
reported concept, the expected concept's rank and score, and pass or fail. If the probe,
the mask decoding, the detector or the ranking break, the check fails.

Why the units look as they do:

* **No flat regions.** Every firing unit is ``indicator * (1 + 0.05 * j)`` with ``j`` a
  per-pixel pseudo-random jitter in [0, 1) (1,024 levels, an integer hash of the
  pixel's position and the image's content, so it is exact on every device). Network
  Dissection's active region is then the unit's top ``quantile`` of values, the same
  with or without a tie rule for flat tops, and whichever rule the detector uses.
* **Ceilings.** A unit whose values vary inside its concept can make at most a
  ``quantile`` share of the probe's pixels active, so its IoU is at most
  ``quantile / coverage`` (coverage: the concept's share of all probe pixels). At the
  default quantile 0.005: striped (3 % of the images) 0.167, beach (35 % / 6 = 5.8 %)
  0.086, a colour (about 9 % of all pixels) 0.05-0.06. So the colour units take the
  probe's *least* covered colours (``colours=None``), read from the decoded masks.
* **Beach from pixels.** At mask resolution, at least half of the columns run exactly
  three colours top to bottom (sky, sea, sand), the same three, all different; the first
  change (the horizon) sits on one row in all of them and the second (the shore) does
  not (it is wavy). Only the synthetic beach layout has a straight horizon over a wavy
  shore (see :mod:`conceptmon.probes.synthetic`); over seeds 0-2 and 400 images at 32,
  48, 64 and 112 px the rule had no false positive and found 60-70 % of the beaches. A
  scene unit only needs its top values on true beaches, so precision is what counts.

Inputs are the probe images exactly (no resizing: ``probe.image_size`` must stay null),
normalised with ``mean``/``std`` that the module undoes.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ConceptmonError
from .probes.base import ProbeSet
from .probes.synthetic import COLORS, PALETTE

TEXTURE = "striped"
SCENE = "beach"
DEFAULT_COLOURS = 3
JITTER = 0.05
JITTER_LEVELS = 1024

_MODULUS = 2_147_483_647  # 2**31 - 1: every product below stays under 2**63 (exact int64)


class PlantedCheckError(ConceptmonError):
    """A probe set or setting the planted-unit check cannot use."""


# ----------------------------------------------------------------------------- pixel rules


def colour_codes(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, H, W) int64 codes R + 256 G + 65536 B of the 8-bit pixels."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    rgb = ((x * s + m) * 255).round().clamp(0, 255).long()
    return rgb[:, 0] + 256 * rgb[:, 1] + 65536 * rgb[:, 2]


def rgb_code(rgb: tuple[int, int, int]) -> int:
    return rgb[0] + 256 * rgb[1] + 65536 * rgb[2]


def pixel_hash(codes: torch.Tensor, salt: int) -> torch.Tensor:
    """(B, h, w) int64 -> (B, h, w) pseudo-random int64 in [0, 2**31 - 1), from each pixel's
    position and its image's content. Integer arithmetic only, so every device agrees."""
    b, h, w = codes.shape
    image_key = (codes % 1_000_003).sum(dim=(1, 2)) % 1_000_003  # (B,)
    pos = torch.arange(h * w, device=codes.device, dtype=torch.int64).view(1, h, w)
    v = (image_key.view(b, 1, 1) * 7_919 + pos * 104_729 + salt) % _MODULUS
    for _ in range(3):  # Lehmer steps mix the bits (48271 * v < 2**47)
        v = (v * 48_271) % _MODULUS
    return v


def is_striped(codes: torch.Tensor, shift: int = 3) -> bool:
    """One image's (h, w) codes at mask resolution: two colours in near-equal shares (36-64 %),
    unchanged by a shift of ``shift`` pixels along one direction (0, 45, 90 or 135 degrees),
    alternating at least five times across the middle row or column."""
    h, w = codes.shape
    colours, counts = codes.unique(return_counts=True)
    # Striped halves share the image (the minority colour has >= 37 %); lined's thin lines have <= 34 %.
    if len(colours) != 2 or counts.min().item() / codes.numel() < 0.36:
        return False
    invariance = 0.0
    for dy, dx in ((0, shift), (shift, 0), (shift, shift), (shift, -shift)):
        a = codes[: h - dy, max(0, -dx): w - max(0, dx)]
        c = codes[dy:, max(0, dx): w - max(0, -dx)]
        invariance = max(invariance, (a == c).float().mean().item())
    row, col = codes[h // 2], codes[:, w // 2]
    changes = max(int((row[1:] != row[:-1]).sum()), int((col[1:] != col[:-1]).sum()))
    return invariance > 0.97 and changes >= 5


def is_beach(codes: torch.Tensor) -> bool:
    """One image's (h, w) codes at mask resolution: a straight horizon over a wavy shore.

    At least half of the columns hold exactly three runs of colour top to bottom, with the
    same three distinct colours; in all of those the first change is on one row and the
    second is not.
    """
    h, w = codes.shape
    change = codes[1:] != codes[:-1]  # (h - 1, w)
    cols = torch.nonzero(1 + change.sum(0) == 3)[:, 0]
    if len(cols) < w / 2:
        return False
    ch = change[:, cols]
    rows = torch.arange(h - 1, device=codes.device)[:, None].expand_as(ch)
    first = torch.where(ch, rows, h).amin(0)
    second = torch.where(ch & (rows > first), rows, h).amin(0)
    top, mid, bottom = codes[0, cols], codes[first + 1, cols], codes[-1, cols]
    distinct = (top != mid) & (mid != bottom) & (top != bottom)
    if int(distinct.sum()) < w / 2:
        return False
    triples = torch.stack([top, mid, bottom], 1)[distinct]
    _, which, counts = torch.unique(triples, dim=0, return_inverse=True, return_counts=True)
    best = int(counts.argmax())
    if counts[best] < w / 2:
        return False
    same = which == best
    horizon, shore = first[distinct][same], second[distinct][same]
    return bool((horizon == horizon[0]).all()) and bool((shore != shore[0]).any())


# ----------------------------------------------------------------------------- the module


class PlantedUnits(torch.nn.Module):
    """Channels: one per colour in ``colours``, then striped, beach, dead (0) and noise.

    Output (B, k + 4, H // 2, W // 2): the synthetic probe's mask resolution (its images
    are drawn in 2x2 blocks, so the top-left pixel of each block is the block).
    """

    def __init__(self, colours: Sequence[str] = COLORS[:DEFAULT_COLOURS], *,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        unknown = [c for c in colours if c not in PALETTE]
        if unknown or not colours:
            raise PlantedCheckError(f"planted colours: expected some of {', '.join(COLORS)}, got {list(colours)}")
        self.colours = tuple(colours)
        self.mean, self.std = tuple(mean), tuple(std)
        self.register_buffer("codes", torch.tensor([rgb_code(PALETTE[c]) for c in self.colours]), persistent=False)

    def planted_expectations(self) -> list[tuple[int, str | None]]:
        """(unit index, expected concept); None for the dead and the noise unit."""
        names = [*self.colours, TEXTURE, SCENE, None, None]
        return list(enumerate(names))

    def unit_names(self) -> list[str]:
        return [*self.colours, TEXTURE, SCENE, "dead", "noise"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        m_h, m_w = height // 2, width // 2
        codes = colour_codes(x, self.mean, self.std)[:, : 2 * m_h: 2, : 2 * m_w: 2]  # (B, h, w)
        jitter = 1 + JITTER * (pixel_hash(codes, 1) % JITTER_LEVELS).to(x.dtype) / JITTER_LEVELS
        colour = (codes[:, None] == self.codes.view(1, -1, 1, 1)).to(x.dtype)  # (B, k, h, w)
        flags = torch.tensor([[is_striped(c), is_beach(c)] for c in codes], dtype=x.dtype, device=x.device)
        whole = flags.view(b, 2, 1, 1).expand(b, 2, m_h, m_w)
        dead = torch.zeros(b, 1, m_h, m_w, dtype=x.dtype, device=x.device)
        noise = (pixel_hash(codes, 2) % 65_536).to(x.dtype)[:, None] / 65_536
        return torch.cat([torch.cat([colour, whole], 1) * jitter[:, None], dead, noise], 1)


class PlantedNet(torch.nn.Module):
    """A model with one dissectable layer, ``units``."""

    def __init__(self, units: PlantedUnits):
        super().__init__()
        self.units = units

    def forward(self, x):
        return self.units(x)


# ----------------------------------------------------------------------------- the check


@dataclass
class UnitResult:
    unit: int
    planted: str
    expected: str | None
    got: str | None
    """The reported top-1 concept; None when the unit is dead or not interpretable."""
    score: float
    """The top-1 score."""
    expected_rank: int | None
    """0-based rank of the expected concept among all concepts (None when nothing is expected)."""
    expected_score: float | None
    runner_up: str
    """The concept ranked second, with its score: how close the call was."""
    runner_up_score: float
    dead: bool
    passed: bool


@dataclass
class PlantedReport:
    units: list[UnitResult]
    settings: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(u.passed for u in self.units)

    def lines(self) -> list[str]:
        out = []
        for u in self.units:
            want = u.expected or "nothing"
            got = u.got or ("dead" if u.dead else "nothing interpretable")
            detail = (f"rank {u.expected_rank}, score {u.expected_score:.3f}; next {u.runner_up} {u.runner_up_score:.3f}"
                      if u.expected else f"best {u.score:.3f}")
            out.append(f"unit {u.unit} ({u.planted}): expected {want}, got {got} ({detail}): "
                       f"{'pass' if u.passed else 'FAIL'}")
        failed = sum(not u.passed for u in self.units)
        out.append(f"planted check: {'passed' if not failed else f'{failed} of {len(self.units)} units failed'}")
        return out

    def to_dict(self) -> dict:
        return {"passed": self.passed, "settings": self.settings, "units": [asdict(u) for u in self.units]}


def judge(scores: torch.Tensor, dead: torch.Tensor | None, concepts: Sequence[str],
          expectations: list[tuple[int, str | None]], threshold: float, planted: Sequence[str]) -> list[UnitResult]:
    """Per planted unit: pass when the expected concept is the top-1 and scores >= threshold;
    a unit expecting nothing passes when it is dead or its best score is below threshold."""
    from .detectors import rank_concepts

    scores = scores.float().cpu()
    order = rank_concepts(scores, scores.shape[1])[1]
    dead = dead.cpu().bool() if dead is not None else torch.zeros(scores.shape[0], dtype=torch.bool)
    results = []
    for unit, expected in expectations:
        best = int(order[unit, 0])
        top = float(scores[unit, best])
        is_dead = bool(dead[unit])
        shown = not is_dead and top >= threshold
        got = concepts[best] if shown else None
        rank = score = None
        if expected is not None:
            k = concepts.index(expected)
            rank = int((order[unit] == k).nonzero()[0, 0])
            score = float(scores[unit, k])
        passed = got == expected if expected is not None else not shown
        second = int(order[unit, 1]) if scores.shape[1] > 1 else best
        results.append(UnitResult(unit, planted[unit], expected, got, top, rank, score, concepts[second],
                                  float(scores[unit, second]), is_dead, passed))
    return results


def probe_masks(probe: ProbeSet, cache: Path, log):
    """The probe's decoded masks (label areas pick the least covered colours), whatever the detector."""
    from . import store
    from .detectors.netdissect import build_mask_cache

    return build_mask_cache(probe, store.mask_cache_dir(cache, probe.fingerprint()), log)


def _open_probe(probe: ProbeSet | str | Path) -> ProbeSet:
    if isinstance(probe, ProbeSet):
        return probe
    from .probes.synthetic import SyntheticProbe

    return SyntheticProbe(probe)


def least_covered_colours(label_area, concepts: Sequence[str], k: int) -> list[str]:
    """The ``k`` palette colours present in the probe with the smallest labelled area."""
    area = {c: float(label_area[concepts.index(c)]) for c in COLORS if c in concepts}
    present = sorted((a, COLORS.index(c), c) for c, a in area.items() if a > 0)
    return [c for _, _, c in present[:k]]


def run_planted_check(
    probe: ProbeSet | str | Path,
    *,
    quantile: float = 0.005,
    threshold: float | None = None,
    device: str = "auto",
    batch_size: int = 64,
    n_colours: int = DEFAULT_COLOURS,
    units: PlantedUnits | None = None,
    cache_dir: str | Path | None = None,
    detector: dict | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> PlantedReport:
    """Dissect :class:`PlantedUnits` on a synthetic probe set (a folder or an open probe)
    with Network Dissection and compare every unit's label with what was planted.

    ``units`` replaces the planted module (tests break it on purpose); by default it plants
    the probe's ``n_colours`` least covered colours. ``cache_dir`` holds the decoded masks
    (default: a temporary folder, removed afterwards). ``detector`` (a config ``detector:``
    section, e.g. a plugin's) replaces Network Dissection with ``quantile``/``threshold``.
    """
    from .config import config_from_dict
    from .detectors import RunContext, TrustSettings, create_detector
    from .engine import collect_layers, make_loader
    from .models import resolve_device

    probe = _open_probe(probe)
    names = list(probe.concepts.names) if probe.concepts is not None else []
    needed = [c for c in (TEXTURE, SCENE, *COLORS) if c not in names]
    if needed or not probe.has_masks:
        raise PlantedCheckError(
            f"probe {probe.root}: the planted check needs the synthetic probe set's masks and vocabulary "
            f"(missing {', '.join(needed) or 'masks'}); make one with `conceptmon probe synthetic DIR`"
        )
    cfg = config_from_dict({
        "layers": ["units"],
        "probe": {"name": probe.name, "root": str(probe.root), "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "detector": detector or {"name": "netdissect", "quantile": quantile, "threshold": threshold},
        "batch_size": batch_size,
        "device": device,
    })
    dev = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="conceptmon-planted-") as scratch:
        ctx = RunContext(device=dev, cache_dir=Path(cache_dir or scratch), batch_size=batch_size, log=log,
                         trust=TrustSettings(0, 0))
        detector = create_detector(cfg, probe, ctx)
        detector.prepare()
        masks = probe_masks(probe, Path(cache_dir or scratch), log)
        for concept in (TEXTURE, SCENE):
            if masks.label_area[names.index(concept)] == 0:
                raise PlantedCheckError(
                    f"probe {probe.root}: no {concept} images among its {len(probe)} images; "
                    f"the planted check needs a synthetic probe set of at least 60 images"
                )
        if units is None:
            units = PlantedUnits(least_covered_colours(masks.label_area, names, n_colours))
        log(f"planted check: {len(units.unit_names())} units ({', '.join(units.unit_names())}) "
            f"on {len(probe)} probe images, device {dev}")
        results = collect_layers(PlantedNet(units), ["units"], make_loader(probe, cfg, dev), detector, dev,
                                 mean=units.mean, std=units.std)
    labels = results["units"].labels
    unit_results = judge(labels.scores, labels.dead, names, units.planted_expectations(), detector.threshold,
                         units.unit_names())
    settings = {"detector": detector.settings(), "device": str(dev), "n_images": len(probe),
                "probe": str(probe.root)}
    return PlantedReport(unit_results, settings)
