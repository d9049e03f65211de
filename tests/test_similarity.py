import math

import pytest
import torch

from conceptmon import similarity
from conceptmon.similarity import (
    SIMILARITIES,
    cos_similarity,
    cos_similarity_cubed,
    default_threshold,
    rank_reorder,
    soft_wpmi,
    wpmi,
)

# Three images, two concepts, two neurons: small enough to check against the formulas by hand.
C = torch.tensor([[0.30, 0.10], [0.20, 0.25], [0.05, 0.40]])
A = torch.tensor([[3.0, 0.0], [2.0, 1.0], [0.0, 5.0]])  # neuron 0 ranks images 0,1,2; neuron 1 ranks 2,1,0


def softmax_rows(x, a):
    return [[math.exp(a * v) / sum(math.exp(a * w) for w in row) for v in row] for row in x.tolist()]


def pmi(L, lam):
    J = len(L)
    out = []
    for j in range(J):
        row = []
        for m in range(len(L[0])):
            log_p = math.log(sum(math.exp(L[i][m]) for i in range(J))) - math.log(J)
            row.append(L[j][m] - lam * log_p)
        out.append(row)
    return torch.tensor(out)


def test_soft_wpmi_matches_its_formula():
    k, a, lam, p0, p1, eps = 2, 10.0, 1.0, 0.998, 0.97, 1e-7
    P = softmax_rows(C, a)
    tops = [[0, 1], [2, 1]]  # top-2 images per neuron, descending activation
    weights = [p0 - (r / k) * (p0 - p1) for r in range(k)]
    L = [
        [sum(math.log(1 - weights[r] + weights[r] * P[img][m] + eps) for r, img in enumerate(tops[j])) for m in range(2)]
        for j in range(2)
    ]
    got = soft_wpmi(C, A, top_k=k, a=a, lam=lam, p_start=p0, p_end=p1, min_prob=eps)
    torch.testing.assert_close(got, pmi(L, lam), rtol=1e-5, atol=1e-5)
    # lam scales only the log p(m) term
    got_half = soft_wpmi(C, A, top_k=k, lam=0.5)
    torch.testing.assert_close(got_half, pmi(L, 0.5), rtol=1e-5, atol=1e-5)


def test_wpmi_matches_its_formula():
    k, a, lam, eps = 2, 2.0, 0.6, 1e-7
    P = softmax_rows(C, a)
    tops = [[0, 1], [2, 1]]
    L = [[sum(math.log(P[img][m] + eps) for img in tops[j]) for m in range(2)] for j in range(2)]
    torch.testing.assert_close(wpmi(C, A, top_k=k, a=a, lam=lam), pmi(L, lam), rtol=1e-5, atol=1e-5)


def test_top_k_larger_than_the_probe_uses_every_image():
    k = 3
    P = softmax_rows(C, 10.0)
    weights = [0.998 - (r / k) * (0.998 - 0.97) for r in range(k)]
    tops = [[0, 1, 2], [2, 1, 0]]
    L = [
        [sum(math.log(1 - weights[r] + weights[r] * P[img][m] + 1e-7) for r, img in enumerate(tops[j])) for m in range(2)]
        for j in range(2)
    ]
    torch.testing.assert_close(soft_wpmi(C, A, top_k=100), pmi(L, 1.0), rtol=1e-5, atol=1e-5)


def test_cos_similarity_cubed_matches_its_formula():
    def unit(x, min_norm=1e-3):
        x = (x - x.mean(0)) ** 3
        return x / torch.clamp(x.norm(dim=0), min=min_norm)

    expected = unit(A.double()).T @ unit(C.double())
    torch.testing.assert_close(cos_similarity_cubed(C, A), expected.float(), rtol=1e-5, atol=1e-6)
    # A column whose cubed, centred norm is below 1e-3 is divided by 1e-3, not by its norm.
    tiny = torch.tensor([[0.0], [0.01], [0.02]])
    centred_cubed = (tiny - tiny.mean()) ** 3
    got = cos_similarity_cubed(C, tiny)
    torch.testing.assert_close(got, (centred_cubed / 1e-3).T @ unit(C), rtol=1e-4, atol=1e-9)


def test_cos_similarity_matches_its_formula_and_a_dead_neuron_scores_zero():
    expected = torch.tensor(
        [
            [sum(A[i, j] * C[i, m] for i in range(3)) / (A[:, j].norm() * C[:, m].norm()) for m in range(2)]
            for j in range(2)
        ]
    )
    torch.testing.assert_close(cos_similarity(C, A), expected, rtol=1e-5, atol=1e-6)
    dead = cos_similarity(C, torch.zeros(3, 1))
    assert torch.equal(dead, torch.zeros(1, 2))


def rank_reorder_reference(C, A, top_fraction, p, scale_p, n_baseline, seed):
    """The reference algorithm one neuron and one concept at a time."""
    n, J = A.shape
    n_top = min(n, max(2, int(n * top_fraction)))
    values, index = A.topk(n_top, dim=0)
    perms = torch.rand(J, n_baseline, n_top, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    out = torch.zeros(J, C.shape[1])
    for j in range(J):
        t = values[:, j]
        asc = t.flip(0)
        baseline = torch.stack([(asc - asc[perms[j, b]]).abs().pow(p).mean() for b in range(n_baseline)]).mean()
        for m in range(C.shape[1]):
            c = C[index[:, j], m]
            rank = c.argsort().argsort()
            err = (t - asc[rank]).abs().pow(p).mean() / baseline
            out[j, m] = -err / c.mean().clamp_min(1e-6) ** scale_p
    return out


def test_rank_reorder_matches_the_reference_loop_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    clip_sim = 0.2 + 0.1 * torch.rand(60, 7, generator=g)
    acts = torch.rand(60, 4, generator=g)
    got = rank_reorder(clip_sim, acts, top_fraction=0.2, seed=3)
    torch.testing.assert_close(got, rank_reorder_reference(clip_sim, acts, 0.2, 3.0, 0.5, 5, 3), rtol=1e-4, atol=1e-5)
    assert torch.equal(got, rank_reorder(clip_sim, acts, top_fraction=0.2, seed=3))
    assert not torch.equal(got, rank_reorder(clip_sim, acts, top_fraction=0.2, seed=4))


def test_rank_reorder_scores_a_perfectly_ordered_concept_zero():
    clip_sim = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    acts = torch.tensor([[4.0], [3.0], [1.0], [2.0]])  # same order as concept 0
    got = rank_reorder(clip_sim, acts, top_fraction=1.0)
    assert got[0, 0] == 0 and got[0, 1] < -1


def test_chunking_does_not_change_results(monkeypatch):
    g = torch.Generator().manual_seed(0)
    clip_sim, acts = torch.rand(50, 9, generator=g), torch.rand(50, 11, generator=g)
    whole = {name: fn(clip_sim, acts) for name, fn in SIMILARITIES.items()}
    monkeypatch.setattr(similarity, "MAX_CHUNK_ELEMENTS", 7)
    for name, fn in SIMILARITIES.items():
        torch.testing.assert_close(fn(clip_sim, acts), whole[name], msg=name)


def concept_following_layer(n_images=300, n_concepts=6, seed=0):
    """C for images that each show one concept, and neurons j that follow concept order[j]."""
    g = torch.Generator().manual_seed(seed)
    shown = torch.randint(0, n_concepts, (n_images,), generator=g)
    clip_sim = 0.2 + 0.02 * torch.randn(n_images, n_concepts, generator=g)
    clip_sim[torch.arange(n_images), shown] += 0.1 + 0.05 * torch.rand(n_images, generator=g)
    order = torch.randperm(n_concepts, generator=g)
    acts = torch.relu(clip_sim[:, order] - 0.25) * 10  # fires only on images of its concept
    return clip_sim, acts, order


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_a_neuron_built_to_follow_concept_m_is_labelled_m(name):
    clip_sim, acts, order = concept_following_layer()
    scores = SIMILARITIES[name](clip_sim, acts)
    assert scores.shape == (acts.shape[1], clip_sim.shape[1])
    assert torch.equal(scores.argmax(dim=1), order)
    assert torch.isfinite(scores).all()
    # ...and counts as interpretable under the default threshold
    assert (scores.max(dim=1).values >= default_threshold(name, clip_sim.shape[1])).all()


def test_default_thresholds_follow_their_documented_rule():
    assert default_threshold("soft_wpmi", 1197) == pytest.approx(1.0)
    expected = (1 - 0.6) * 28 * math.log(1 / 20 + 1e-7) + 1
    assert default_threshold("wpmi", 20) == pytest.approx(expected)
    # soft-WPMI chance with lam < 1 shifts with the concept-set size
    assert default_threshold("soft_wpmi", 20, {"lam": 0.5}) > default_threshold("soft_wpmi", 2000, {"lam": 0.5})
    assert default_threshold("cos_similarity_cubed", 5) == 0.2


def test_uninformative_layer_scores_chance_for_pmi():
    """A layer whose every neuron sees P = 1/M scores exactly the chance value for every concept."""
    clip_sim = torch.zeros(40, 8)  # softmax of equal scores is uniform
    acts = torch.rand(40, 5, generator=torch.Generator().manual_seed(0))
    for name in ("soft_wpmi", "wpmi"):
        params = {"top_k": 28, "lam": 0.6}
        chance = similarity.chance_pmi_score(name, 8, params)
        assert chance < -1  # not trivially zero
        got = SIMILARITIES[name](clip_sim, acts, **params)
        torch.testing.assert_close(got, torch.full((5, 8), chance), rtol=1e-4, atol=1e-3)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="clip_sim has 3 images but activations have 4"):
        soft_wpmi(C, torch.zeros(4, 2))


@pytest.mark.slow
def test_soft_wpmi_benchmark_size_is_fast():
    seconds = similarity.bench_soft_wpmi(10_000, 1_197, 512, "cpu", repeats=1)
    # Target 3 s; doubled because the test machine's two cores are shared.
    assert seconds < 6.0
