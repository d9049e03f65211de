"""CLIP-Dissect's similarity functions: neuron activations vs. CLIP's image-concept matrix.

Every function has the signature ``NAME(clip_sim, activations, **params) -> (J, M)``:

* ``clip_sim`` C, (N images, M concepts): normalised CLIP image features · normalised
  text features, no logit scale;
* ``activations`` A, (N images, J neurons): one pooled value per image and neuron;
* the result S, (J, M): higher means concept m describes neuron j better.

They are pure tensor functions: they run on the device of ``activations`` (``clip_sim``
is moved there), never loop over single neurons in Python, and process neurons in
chunks so that the (neurons x top images x concepts) intermediate stays bounded.
The formulas follow Oikarinen & Weng, "CLIP-Dissect" (ICLR 2023) and its reference code;
deviations are named where they occur.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .registry import Registry, RegistryError

# Neurons per chunk are chosen so a chunk's (neurons x top images x concepts) block
# holds at most this many float32 values (64 MiB).
MAX_CHUNK_ELEMENTS = 1 << 24

# Column norms below this are treated as this (dead neurons, constant concepts).
_TINY = 1e-12


def _prepare(clip_sim: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if clip_sim.dim() != 2 or activations.dim() != 2:
        raise ValueError(
            f"expected clip_sim (images, concepts) and activations (images, neurons), "
            f"got shapes {tuple(clip_sim.shape)} and {tuple(activations.shape)}"
        )
    if clip_sim.shape[0] != activations.shape[0]:
        raise ValueError(
            f"clip_sim has {clip_sim.shape[0]} images but activations have {activations.shape[0]}"
        )
    acts = activations.float()
    return clip_sim.to(device=acts.device, dtype=torch.float32), acts


def _neuron_chunks(n_neurons: int, per_neuron: int, max_elements: int = MAX_CHUNK_ELEMENTS):
    step = max(1, max_elements // max(1, per_neuron))
    for start in range(0, n_neurons, step):
        yield slice(start, min(n_neurons, start + step))


def _gather_top(matrix: torch.Tensor, top_index: torch.Tensor) -> torch.Tensor:
    """Rows of ``matrix`` (N, M) at ``top_index`` (k, J) -> (J, k, M)."""
    k, j = top_index.shape
    return matrix.index_select(0, top_index.t().reshape(-1)).view(j, k, matrix.shape[1])


def top_image_weights(top_k: int, p_start: float, p_end: float, device=None) -> torch.Tensor:
    """p_r = p_start - (r / k)(p_start - p_end) for ranks r = 0..k-1 (soft-WPMI's weights)."""
    r = torch.arange(top_k, dtype=torch.float32, device=device)
    return p_start - (r / top_k) * (p_start - p_end)


def _concept_probabilities(clip_sim: torch.Tensor, a: float, columns: torch.Tensor | None) -> torch.Tensor:
    """P = softmax(a·C) over all concepts, then only ``columns`` of it when given."""
    P = torch.softmax(a * clip_sim, dim=1)
    return P if columns is None else P[:, columns.to(P.device)]


def _top_image_sums(per_image: torch.Tensor, activations: torch.Tensor, k: int,
                    term: Callable[[torch.Tensor], torch.Tensor] = lambda block: block) -> torch.Tensor:
    """L[j, m] = Σ over neuron j's top-k images r of term(per_image[r, m]), in neuron chunks."""
    top = activations.topk(k, dim=0).indices  # (k, J)
    L = torch.empty(activations.shape[1], per_image.shape[1], device=activations.device)
    for chunk in _neuron_chunks(activations.shape[1], k * per_image.shape[1]):
        L[chunk] = term(_gather_top(per_image, top[:, chunk])).sum(dim=1)  # (Jc, k, M) -> (Jc, M)
    return L


def pmi_from_likelihood(log_likelihood: torch.Tensor, lam: float) -> torch.Tensor:
    """S = L - lam * log p(m), with log p(m) = logsumexp_j L[j, m] - log J over these neurons."""
    n_neurons = log_likelihood.shape[0]
    log_p_concept = torch.logsumexp(log_likelihood, dim=0, keepdim=True) - math.log(n_neurons)
    return log_likelihood - lam * log_p_concept


def soft_wpmi(
    clip_sim: torch.Tensor,
    activations: torch.Tensor,
    *,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    p_start: float = 0.998,
    p_end: float = 0.97,
    min_prob: float = 1e-7,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft weighted pointwise mutual information (CLIP-Dissect's default).

    P = softmax(a·C) over concepts. For neuron j with top-k images r (descending
    activation), L[j, m] = Σ_r log(1 − p_r + p_r·P[r, m] + min_prob), p_r falling linearly
    from p_start to p_end; then S = L − lam·log p(m) (see :func:`pmi_from_likelihood`).
    With fewer than ``top_k`` images, k is the number of images. ``columns`` computes only
    those concepts' columns (exactly as in the full result: P is normalised over all).
    """
    C, A = _prepare(clip_sim, activations)
    k = min(int(top_k), A.shape[0])
    p = top_image_weights(k, p_start, p_end, device=A.device).view(1, k, 1)
    offset = 1.0 - p + min_prob
    P = _concept_probabilities(C, a, columns)
    return pmi_from_likelihood(_top_image_sums(P, A, k, lambda block: block.mul_(p).add_(offset).log_()), lam)


def wpmi(
    clip_sim: torch.Tensor,
    activations: torch.Tensor,
    *,
    top_k: int = 28,
    a: float = 2.0,
    lam: float = 0.6,
    min_prob: float = 1e-7,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted pointwise mutual information: L[j, m] = Σ_r log(P[r, m] + min_prob) over the
    neuron's top-k images, then S = L − lam·log p(m) as in :func:`soft_wpmi`."""
    C, A = _prepare(clip_sim, activations)
    k = min(int(top_k), A.shape[0])
    log_P = _concept_probabilities(C, a, columns).add_(min_prob).log_()
    return pmi_from_likelihood(_top_image_sums(log_P, A, k), lam)


def cos_similarity_cubed(
    clip_sim: torch.Tensor, activations: torch.Tensor, *, min_norm: float = 1e-3
) -> torch.Tensor:
    """Centre C and A over images, cube elementwise, divide each column by max(its L2 norm,
    min_norm), S = Aᵀ C."""
    C, A = _prepare(clip_sim, activations)

    def centred_cubed_unit(x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(dim=0, keepdim=True)).pow_(3)
        return x / x.norm(dim=0, keepdim=True).clamp_min(min_norm)

    return centred_cubed_unit(A).t() @ centred_cubed_unit(C)


def cos_similarity(clip_sim: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Plain cosine between each neuron's and each concept's column over images, S = Âᵀ Ĉ.
    A neuron that never fires (zero column) scores 0 rather than NaN."""
    C, A = _prepare(clip_sim, activations)
    C = C / C.norm(dim=0, keepdim=True).clamp_min(_TINY)
    A = A / A.norm(dim=0, keepdim=True).clamp_min(_TINY)
    return A.t() @ C


def rank_reorder(
    clip_sim: torch.Tensor,
    activations: torch.Tensor,
    *,
    top_fraction: float = 0.05,
    p: float = 3.0,
    scale_p: float = 0.5,
    n_baseline: int = 5,
    seed: int = 0,
) -> torch.Tensor:
    """Rank reordering: how well does sorting a neuron's top images by a concept's CLIP
    score reproduce the neuron's own activation order?

    For neuron j, take its top n = max(2, ⌊N·top_fraction⌋) images with activations t
    (descending). For concept m, give the image with the r-th lowest CLIP score the r-th
    lowest of those activations; error = mean_r |t_r − reordered_r|^p, divided by the same
    error for ``n_baseline`` random orders (drawn from ``seed``, so results repeat) and by
    mean_r(C[r, m])^scale_p. S = −error: 0 is a perfect match, about −1/√(mean C) is chance.

    Deviations from the reference code, both to keep S finite: a neuron whose top
    activations are all equal (no order to match) gets error 1, "as good as random", and the
    mean CLIP score is floored at 1e-6 before the power (negative cosines would give NaN).
    """
    C, A = _prepare(clip_sim, activations)
    n_images, n_neurons = A.shape
    n_top = min(n_images, max(2, int(n_images * top_fraction)))
    top = A.topk(n_top, dim=0)
    values, index = top.values, top.indices  # (n_top, J), descending
    generator = torch.Generator().manual_seed(int(seed))
    # Drawn up front on the CPU so the result does not depend on chunk size or device.
    perms = torch.rand(n_neurons, n_baseline, n_top, generator=generator).argsort(dim=-1).to(A.device)
    out = torch.empty(n_neurons, C.shape[1], device=A.device)
    for chunk in _neuron_chunks(n_neurons, 3 * n_top * C.shape[1]):
        desc = values[:, chunk].t()  # (Jc, n)
        asc = desc.flip(1)
        clip_top = _gather_top(C, index[:, chunk])  # (Jc, n, M)
        mean_clip = clip_top.mean(dim=1)  # (Jc, M)
        ranks = clip_top.argsort(dim=1).argsort(dim=1)
        del clip_top
        reordered = asc.unsqueeze(2).expand(-1, -1, ranks.shape[2]).gather(1, ranks)
        error = (desc.unsqueeze(2) - reordered).abs_().pow_(p).mean(dim=1)  # (Jc, M)
        jc = desc.shape[0]
        shuffled = asc.gather(1, perms[chunk].reshape(jc, -1)).view(jc, n_baseline, n_top)
        baseline = (asc.unsqueeze(1) - shuffled).abs_().pow_(p).mean(dim=(1, 2))  # (Jc,)
        ratio = torch.where(baseline.unsqueeze(1) > 0, error / baseline.clamp_min(_TINY).unsqueeze(1), 1.0)
        out[chunk] = -ratio / mean_clip.clamp_min(1e-6).pow(scale_p)
    return out


@dataclass(frozen=True)
class Similarity:
    """A similarity function declared once: its function (parameters = its keyword-only
    arguments with defaults), its default interpretability threshold (a number or
    ``threshold(n_concepts, params) -> float``), and whether each concept's column depends
    only on that concept's column of C (then a few columns are cheap to compute)."""

    name: str
    fn: Callable[..., torch.Tensor]
    threshold: float | Callable[[int, dict], float]
    column_independent: bool = False

    def __call__(self, clip_sim: torch.Tensor, activations: torch.Tensor, **params) -> torch.Tensor:
        return self.fn(clip_sim, activations, **params)

    def default_params(self) -> dict:
        sig = inspect.signature(self.fn)
        return {k: v.default for k, v in sig.parameters.items()
                if v.kind is inspect.Parameter.KEYWORD_ONLY and k != "columns"}

    def on_columns(self, clip_sim: torch.Tensor, activations: torch.Tensor, columns: torch.Tensor,
                   **params) -> torch.Tensor:
        """S[:, columns], exactly as in the full result, at the cost of those columns where possible."""
        if "columns" in inspect.signature(self.fn).parameters:
            return self.fn(clip_sim, activations, columns=columns, **params)
        if self.column_independent:
            return self.fn(clip_sim[:, columns.to(clip_sim.device)], activations, **params)
        return self.fn(clip_sim, activations, **params)[:, columns.to(activations.device)]

    def default_threshold(self, n_concepts: int, params: dict) -> float:
        return float(self.threshold(n_concepts, params) if callable(self.threshold) else self.threshold)


def _check_similarity(name: str, obj) -> None:
    if not isinstance(obj, Similarity):
        raise RegistryError(f"detector.similarity: {name} is not a conceptmon.similarity.Similarity")


SIMILARITIES: Registry[Similarity] = Registry(
    "similarity", group="conceptmon.similarities", field="detector.similarity", check=_check_similarity,
)
"""Every similarity by name; other packages add theirs through the entry-point group
``conceptmon.similarities`` (an entry point naming a :class:`Similarity`)."""


def register_similarity(name: str, threshold: float | Callable[[int, dict], float], *,
                        column_independent: bool = False):
    """Decorator: declare ``fn`` as similarity ``name`` with its default threshold."""

    def deco(fn):
        SIMILARITIES.register(name)(Similarity(name, fn, threshold, column_independent))
        return fn

    return deco


def default_params(name: str) -> dict:
    """The keyword parameters of similarity ``name`` with their defaults."""
    return SIMILARITIES.get(name).default_params()


register_similarity("soft_wpmi", lambda m, p: chance_pmi_score("soft_wpmi", m, p) + 1.0)(soft_wpmi)
register_similarity("wpmi", lambda m, p: chance_pmi_score("wpmi", m, p) + 1.0)(wpmi)
register_similarity("cos_similarity_cubed", 0.2, column_independent=True)(cos_similarity_cubed)
register_similarity("cos_similarity", 0.5, column_independent=True)(cos_similarity)
register_similarity("rank_reorder", -1.0, column_independent=True)(rank_reorder)


# ----------------------------------------------------------------------------- thresholds


def chance_pmi_score(name: str, n_concepts: int, params: dict) -> float:
    """The (soft-)WPMI score every neuron gets in a layer where no neuron's top images favour
    any concept (P = 1/M everywhere): then log p(m) = L and S = (1 − lam)·L."""
    p = {**default_params(name), **params}
    uniform = 1.0 / n_concepts
    if name == "soft_wpmi":
        weights = top_image_weights(int(p["top_k"]), p["p_start"], p["p_end"]).double()
        L = torch.log(1 - weights + weights * uniform + p["min_prob"]).sum().item()
    elif name == "wpmi":
        L = int(p["top_k"]) * math.log(uniform + p["min_prob"])
    else:
        raise ValueError(f"{name} is not a PMI similarity")
    return (1.0 - p["lam"]) * L


def default_threshold(name: str, n_concepts: int, params: dict | None = None) -> float:
    """The interpretability cut used when ``detector.threshold`` is null, and why:

    * soft_wpmi, wpmi: chance score + 1 nat. With lam = 1, S = log of how many times more
      likely the concept is under this neuron's top images than under the layer's average
      neuron's, and chance is 0, so the default is 1.0 ("e times the layer average"). The
      scale is not [0, 1]: it grows up to log J with the layer width J and shifts with the
      concept-set size M and with lam, top_k, a, which is why wpmi (lam = 0.6, scores near
      −(1 − lam)·top_k·log M) needs the chance offset to mean anything.
    * cos_similarity_cubed: 0.2. Values are cosines in [−1, 1]; for a neuron unrelated to
      every concept they scatter with standard deviation about 1/√N, so with N ≥ 1000 probe
      images its best of ~1000 concepts stays near 0.1.
    * cos_similarity: 0.5. Uncentred cosines between non-negative activations and positive
      CLIP scores are positive for every pair and grow with how often the neuron fires (an
      unrelated neuron active on a fraction f of the images scores roughly √f), so no cut is
      neutral: 0.5 suits sparse neurons (f ≲ 0.2). Prefer soft_wpmi or cos_similarity_cubed.
    * rank_reorder: −1.0. Chance is about −1/√(mean CLIP score) ≈ −2 at typical cosines
      (0.25); −1 asks for half the random-order error.
    """
    return SIMILARITIES.get(name).default_threshold(n_concepts, params or {})


# ----------------------------------------------------------------------------- benchmark


def bench_soft_wpmi(
    n_images: int, n_concepts: int, n_neurons: int, device="cpu", repeats: int = 3, seed: int = 0
) -> float:
    """Best-of-``repeats`` seconds for one soft_wpmi call on random inputs of this size
    (the issue's target: 10,000 x 1,197 x 512 in under 3 s on a laptop-class CPU)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    clip_sim = (0.2 + 0.05 * torch.randn(n_images, n_concepts, generator=g)).to(device)
    acts = torch.relu(torch.randn(n_images, n_neurons, generator=g)).to(device)
    best = math.inf
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        soft_wpmi(clip_sim, acts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best
