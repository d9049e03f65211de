"""CLIP-Dissect (Oikarinen & Weng): label neurons by comparing their activations over the
probe images with CLIP's image-concept similarities.

* ``prepare()`` makes C = normalised CLIP image features · normalised text features
  (N images x M concepts, no logit scale). C depends only on the probe set, the concept
  set and the CLIP model, so it is computed once and cached under ``ctx.cache_dir/clip``,
  keyed by the fingerprints of all three; every checkpoint (and every later run) reuses
  it. CLIP's image features are cached on their own too (keyed by probe and model), so a
  new concept set costs only the text tower. Images go through CLIP's own preprocessing.
* Each layer's accumulator keeps one pooled activation per image and unit (N x U): the
  spatial mean (``detector.pool: avg``) or max of conv maps, linear outputs as they are, the
  CLS token of (B, tokens, D) transformer outputs. These depend on the weights and are
  never cached.
* ``scores()`` applies ``detector.similarity`` (conceptmon.similarity) with
  ``detector.params``; ``detector.threshold`` (default: similarity.default_threshold)
  decides which neurons are interpretable.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import clip, similarity, store
from ..config import ConfigError, DetectorOptions
from ..registry import did_you_mean
from ..store import atomic_path
from . import register_detector
from .base import (
    Detector, DetectorError, LayerAccumulator, LayerScores, poisson_weights, rank_concepts, summarise_replicates,
)

CACHE_FORMAT = 1

# Parameter ranges worth refusing early, with the reason shown to the user.
_PARAM_RULES = {
    "top_k": (lambda v: v >= 1, "at least 1"),
    "p_start": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "p_end": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_prob": (lambda v: v > 0, "positive"),
    "min_norm": (lambda v: v > 0, "positive"),
    "top_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "p": (lambda v: v > 0, "positive"),
    "n_baseline": (lambda v: v >= 1, "at least 1"),
}


def similarity_name(name: str) -> str:
    """``soft-wpmi`` and ``soft_wpmi`` both mean soft_wpmi; unknown names fail with choices."""
    key = name.strip().lower().replace("-", "_")
    if key not in similarity.SIMILARITIES:
        choices = similarity.SIMILARITIES.names()
        raise DetectorError(f"detector.similarity: unknown {name!r}{did_you_mean(key, choices, n=2)}; "
                            f"choices: {', '.join(choices)}")
    return key


def resolve_params(name: str, given: dict) -> dict:
    """The similarity's defaults updated by ``detector.params``, type- and range-checked."""
    defaults = similarity.default_params(name)
    params = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise DetectorError(f"detector.params.{key}: not a parameter of similarity {name}; valid: {valid}")
        default = defaults[key]
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise DetectorError(f"detector.params.{key}: expected an integer, got {value!r}")
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DetectorError(f"detector.params.{key}: expected a number, got {value!r}")
            value = float(value)
        rule = _PARAM_RULES.get(key)
        if rule and not rule[0](value):
            raise DetectorError(f"detector.params.{key}: must be {rule[1]}, got {value!r}")
        params[key] = value
    return params


def pool_activations(acts: torch.Tensor, n_units: int, pool: str = "avg") -> torch.Tensor:
    """(B, U) per-image values from the engine's canonical forms: (B, U) as is (linear
    outputs, or the class token when ``pool: cls`` asked the engine for it); (B, U, H, W)
    maps and patch-token grids -> the mean (avg) or max over space."""
    if acts.shape[1] != n_units:
        raise DetectorError(f"activations of shape {tuple(acts.shape)} do not have {n_units} units on dim 1")
    if acts.dim() == 2:
        return acts
    dims = tuple(range(2, acts.dim()))
    return acts.amax(dim=dims) if pool == "max" else acts.mean(dim=dims)


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class _ClipPixels(torch.utils.data.Dataset):
    """Probe images through CLIP's preprocessing (run in DataLoader workers when there are any)."""

    def __init__(self, probe, processor, n_images: int):
        self.probe, self.processor, self.n = probe, processor, n_images

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return clip.preprocess_images(self.processor, [self.probe.load_image(i)])[0]


POOLS = ("avg", "max", "cls")


@dataclass
class ClipDissectOptions(DetectorOptions):
    similarity: str = "soft_wpmi"
    """soft_wpmi | wpmi | cos_similarity_cubed | cos_similarity | rank_reorder (or a registered one)."""
    params: dict = field(default_factory=dict)
    """The similarity's parameters (defaults: its signature)."""
    clip_model: str = "openai/clip-vit-base-patch16"
    """A Hugging Face name (cached) or a save_pretrained folder."""
    pool: str = "avg"
    """How a map or token sequence becomes one value per image: avg | max over space or patch
    tokens, or cls (the first token of a token sequence)."""
    clip_batch_size: int = 64
    interpretable: str = "calibrated"
    """calibrated: interpretable when the best score beats the layer's null (activations paired
    with permuted images) at ``null_quantile``; threshold: best score >= ``threshold`` (or the
    similarity's default threshold)."""
    null_permutations: int = 4
    null_quantile: float = 0.99
    bootstrap_candidates: int = 20
    """Concepts per neuron (its best on the full data) that compete in each bootstrap replicate."""

    def check(self) -> None:
        if self.interpretable not in ("calibrated", "threshold"):
            raise ConfigError(f"interpretable: expected calibrated or threshold, got {self.interpretable!r}")
        if self.null_permutations < 1:
            raise ConfigError(f"null_permutations: must be at least 1, got {self.null_permutations}")
        if not 0 < self.null_quantile < 1:
            raise ConfigError(f"null_quantile: must be between 0 and 1, got {self.null_quantile}")
        if self.bootstrap_candidates < 1:
            raise ConfigError(f"bootstrap_candidates: must be at least 1, got {self.bootstrap_candidates}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool: expected one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.clip_batch_size < 1:
            raise ConfigError(f"clip_batch_size: must be at least 1, got {self.clip_batch_size}")
        try:
            self.similarity = similarity_name(self.similarity)
            resolve_params(self.similarity, self.params)
        except DetectorError as e:
            raise ConfigError(str(e).removeprefix("detector.")) from None


@register_detector
class ClipDissect(Detector):
    """CLIP-Dissect with a configurable similarity function.

    Default thresholds (``detector.threshold: null``), see similarity.default_threshold:
    soft_wpmi and wpmi: chance score + 1 nat (1.0 for soft_wpmi with lam = 1: the concept is
    e times likelier under the neuron's top images than under the layer's average neuron;
    soft-WPMI is not bounded to [0, 1] and shifts with the concept-set size and layer width);
    cos_similarity_cubed 0.2; cos_similarity 0.5; rank_reorder -1.0.
    """

    name = "clip-dissect"
    Options = ClipDissectOptions
    default_threshold = 1.0
    needs_masks = False

    def __init__(self, options, probe, concepts, ctx):
        super().__init__(options, probe, concepts, ctx)
        self.similarity = similarity_name(self.options.similarity)
        self.params = resolve_params(self.similarity, self.options.params)
        self.similarity_fn = similarity.SIMILARITIES[self.similarity]
        self.clip_model = self.options.clip_model
        self.pool = self.options.pool
        if len(self._concepts) < 2:
            raise DetectorError(f"concepts: CLIP-Dissect needs at least 2 concepts, got {len(self._concepts)}")
        self.n_images = len(probe)
        self.clip_sim: torch.Tensor | None = None
        self.null_thresholds: dict[str, float] = {}
        """Per layer, the null-calibrated cut of the last scoring (``interpretable: calibrated``)."""

    @property
    def wants_class_token(self) -> bool:
        """Token layers arrive as their class token (B, C) rather than the patch grid."""
        return self.pool == "cls"

    @property
    def threshold(self) -> float:
        t = self.options.threshold
        if t is not None:
            return t
        return similarity.default_threshold(self.similarity, len(self._concepts), self.params)

    def settings(self) -> dict:
        return {
            **super().settings(),
            "similarity": self.similarity,
            "params": dict(self.params),
            "concepts_fingerprint": self._concepts.fingerprint(),
            "n_concepts": len(self._concepts),
        }

    # ------------------------------------------------------------------------- the cached C

    def cache_keys(self) -> tuple[str, str]:
        """(image-feature key, C key): every input each depends on, and nothing else."""
        images = _hash(
            {
                "format": CACHE_FORMAT,
                "probe": self.probe.fingerprint(),
                "n_images": self.n_images,
                "clip": self.clip_model,
                "clip_weights": clip.model_fingerprint(self.clip_model),
            }
        )
        words = "\n".join(self._concepts.names)
        sim = _hash({"images": images, "concepts": hashlib.sha256(words.encode()).hexdigest()})
        return images, sim

    def cache_paths(self) -> tuple[Path, Path]:
        images, sim = self.cache_keys()
        folder = store.clip_cache_dir(self.ctx.cache_dir)
        return folder / f"image_features_{images}.pt", folder / f"clip_sim_{sim}.pt"

    def prepare(self) -> None:
        if self.clip_sim is not None:
            return
        image_path, sim_path = self.cache_paths()
        cached = _load_tensor(sim_path, "clip_sim", (self.n_images, len(self._concepts)))
        if cached is not None:
            self.ctx.log(f"clip-dissect: reusing cached CLIP similarities {sim_path.name}")
            self.clip_sim = cached.to(self.ctx.device)
            return
        model, processor = clip.load_clip(self.clip_model, self.ctx.device)
        image_features = _load_tensor(image_path, "features", (self.n_images, None))
        if image_features is None:
            image_features = self._encode_probe(model, processor)
            _save_tensor(image_path, "features", image_features)
        text_features = clip.encode_texts(model, processor, list(self._concepts.names), self.ctx.device)
        clip_sim = (image_features @ text_features.t()).float()
        _save_tensor(sim_path, "clip_sim", clip_sim)
        self.ctx.log(
            f"clip-dissect: cached CLIP similarities ({self.n_images} images x {len(self._concepts)} concepts) "
            f"in {sim_path.parent}"
        )
        self.clip_sim = clip_sim.to(self.ctx.device)

    def _encode_probe(self, model, processor) -> torch.Tensor:
        self.ctx.log(f"clip-dissect: encoding {self.n_images} probe images with {self.clip_model} on {self.ctx.device}")
        loader = torch.utils.data.DataLoader(
            _ClipPixels(self.probe, processor, self.n_images),
            batch_size=max(1, self.options.clip_batch_size),
            shuffle=False,
            num_workers=self.ctx.num_workers,
        )
        parts = [clip.encode_images(model, processor, pixels, self.ctx.device) for pixels in loader]
        return torch.cat(parts)

    def accumulator(self, layer: str, n_units: int) -> LayerAccumulator:
        return ClipDissectAccumulator(self, layer, n_units)


class ClipDissectAccumulator(LayerAccumulator):
    """Pooled activations of every probe image (N x U floats), scored once complete."""

    def __init__(self, detector: ClipDissect, layer: str, n_units: int):
        self.detector = detector
        self.layer = layer
        self.n_units = n_units
        self.values: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        pooled = pool_activations(acts, self.n_units, self.detector.pool).float()
        n = self.detector.n_images
        if self.values is None:
            self.values = torch.zeros(n, self.n_units, device=pooled.device)
            self.seen = torch.zeros(n, dtype=torch.bool, device=pooled.device)
        index = index.to(pooled.device)
        if len(index) and int(index.max()) >= n:
            raise DetectorError(
                f"layer {self.layer}: probe image {int(index.max())} is beyond the {n} images CLIP-Dissect prepared"
            )
        self.values[index] = pooled
        self.seen[index] = True

    def scores(self) -> LayerScores:
        det = self.detector
        n = det.n_images
        missing = n if self.seen is None else int((~self.seen).sum())
        if missing:
            raise DetectorError(f"layer {self.layer}: activations of {missing} of {n} probe images never arrived")
        det.prepare()
        C, A = det.clip_sim, self.values
        scores = det.similarity_fn(C, A, **det.params)
        # A unit whose pooled activation never varies carries no signal about any image.
        dead = (A.amax(dim=0) - A.amin(dim=0)) <= 0
        result = LayerScores(scores=scores, dead=dead)
        trust = det.ctx.trust
        if trust.replicates > 0:
            weights = poisson_weights(n, trust.replicates, trust.seed)
            result.confidence, result.score_low, result.score_high = bootstrap_similarity(
                det.similarity_fn, C, A, det.params, scores, weights, candidates=det.options.bootstrap_candidates)
        if det.options.interpretable == "calibrated":
            cut = null_threshold(det.similarity_fn, C, A, det.params, permutations=det.options.null_permutations,
                                 quantile=det.options.null_quantile, seed=trust.seed)
            result.interpretable = rank_concepts(scores, 1)[0][:, 0] > cut
            det.null_thresholds[self.layer] = float(cut)
        return result


# ----------------------------------------------------------------------------- trust


def bootstrap_similarity(sim, clip_sim: torch.Tensor, acts: torch.Tensor, params: dict, scores: torch.Tensor,
                         weights: torch.Tensor, candidates: int = 20):
    """Confidence and 90 % score interval per neuron by resampling the probe images.

    Each replicate draws every image Poisson(1) times (``weights``, (B, N)) and recomputes
    the similarity on the resampled images (an image drawn twice takes two of a neuron's
    top-image slots). To stay cheap the replicates are computed on the union of every
    neuron's ``candidates`` best concepts of the full data (exactly, see
    ``Similarity.on_columns``); a concept outside that union is taken never to win a
    replicate. Returns (confidence, low, high), each (J,).
    """
    n_neurons, n_concepts = scores.shape
    reported = rank_concepts(scores, 1)[1][:, 0]
    top = rank_concepts(scores, min(candidates, n_concepts))[1]
    columns, position = torch.unique(top.flatten(), return_inverse=True)
    position = position.view(top.shape)
    reported_col = position[:, 0]  # the reported concept's place among the columns
    top1, own = [], []
    for w in weights.to(torch.long):
        index = torch.repeat_interleave(torch.arange(len(w)), w).to(acts.device)
        if index.numel() < 2:
            index = torch.arange(len(w), device=acts.device)
        s = sim.on_columns(clip_sim[index], acts[index], columns, **params)
        # Only a neuron's own candidates compete for its top-1 in a replicate.
        own_cols = torch.full_like(s, -torch.inf)
        own_cols.scatter_(1, position.to(s.device), s.gather(1, position.to(s.device)))
        top1.append(rank_concepts(own_cols, 1)[1][:, 0])
        own.append(s.gather(1, reported_col.to(s.device)[:, None])[:, 0])
    del reported
    return summarise_replicates(torch.stack(top1), torch.stack(own), reported_col.to(scores.device))


def null_threshold(sim, clip_sim: torch.Tensor, acts: torch.Tensor, params: dict, *, permutations: int,
                   quantile: float, seed: int) -> float:
    """The ``quantile`` of the best score a neuron reaches when its activations are paired
    with the wrong images (rows of A permuted): a per-layer score that chance alone beats
    with probability 1 - quantile. A neuron is interpretable above it."""
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    best = []
    for _ in range(max(1, permutations)):
        perm = torch.randperm(acts.shape[0], generator=generator).to(acts.device)
        best.append(sim(clip_sim, acts[perm], **params).amax(dim=1))
    return float(torch.quantile(torch.cat(best).float(), quantile))


# ----------------------------------------------------------------------------- cache files


def _load_tensor(path: Path, key: str, shape: tuple[int, int | None]) -> torch.Tensor | None:
    """The cached tensor, or None when absent, unreadable or of another shape (then recomputed)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        tensor = data[key]
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] != shape[0]:
        return None
    if shape[1] is not None and tensor.shape[1] != shape[1]:
        return None
    return tensor.float()


def _save_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        torch.save({key: tensor.detach().cpu().contiguous(), "format": CACHE_FORMAT}, tmp)
