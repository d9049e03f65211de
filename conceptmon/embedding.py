"""The unified embedding: every neuron of every epoch, and any anchor word, in one text space.

**Neuron vectors.** For neuron n at epoch t with top-k concepts w_1..w_k and detector
scores s_1..s_k (higher = closer)::

    λ = softmax(s / T)        u = Σ_i λ_i f(w_i)

f is the text encoder (:mod:`conceptmon.encoders`), k = the run's ``top_k`` (5), T =
``embedding.temperature`` (default 1, as in the paper). The temperature matters: Network
Dissection IoUs lie in [0, ~0.3] and the top five of a neuron typically differ by a few
hundredths, soft-WPMI scores by a few tenths, so at T = 1 softmax(s) is nearly uniform
(every λ_i ≈ 1/k) and u is the plain mean of the k concept vectors. A smaller T (e.g.
0.01 for IoUs) sharpens λ towards the best concept; T -> 0 gives u = f(top-1 concept).
u is not re-normalised (it is exactly the weighted sum); distances are cosine.

**Anchors.** Any word α is encoded by the same f, so neuron->anchor cosine distances
1 - cos(u, f(α)) are comparable across neurons, layers and epochs; an anchor equal to a
neuron's only concept sits at distance 0.

**The 2-D map.** Fitted once and cached under ``<cache>/maps/<key>.parquet``, the key
hashing every input (encoder fingerprint, the fitted words or vectors, method, seed,
parameters). Default (``map_fit=vocabulary``, ``placement=mean``): UMAP (seeded, cosine)
on the concept vocabulary plus the anchors; each neuron is placed at the λ-weighted mean
of its concepts' 2-D positions, anchors at their fitted positions. Placement is then an
exact, pure function of (concepts, scores): a neuron whose concepts and scores do not
change does not move, the same neuron in another run sits at the same point, and no
numba code runs per neuron. ``placement=transform`` uses ``UMAP.transform`` on each
distinct neuron vector instead (about a minute per 46k neurons on two CPU cores, and a
point's position then depends slightly on the batch it was transformed with).
``map_fit=neurons`` fits UMAP on all neurons of all epochs (plus anchors): the layout
follows the neurons, but it is specific to this run. ``map_method=pca`` swaps UMAP for a
2-D PCA (instant, no numba; linear, so mean placement equals transform).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from . import __version__, store
from .config import EmbeddingConfig
from .encoders import EncoderError, create_encoder, encode_cached
from .errors import ConceptmonError
from .registry import Registry

MAP_FITS = ("vocabulary", "neurons")
PLACEMENTS = ("mean", "transform")
UMAP_PARAMS = {"n_neighbors": 15, "min_dist": 0.1, "metric": "cosine"}
MIN_UMAP_POINTS = 5
"""Below this many points UMAP's spectral layout is meaningless; PCA places them instead."""


class EmbedError(ConceptmonError):
    """Embedding outputs or settings that cannot be used."""


# ----------------------------------------------------------------------------- pure maths


def encoder_text(word: str) -> str:
    """The text the encoder sees for a concept or anchor: Broden's ``living_room`` -> ``living room``."""
    return str(word).replace("_", " ").strip()


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax(scores / T) of an (N, k) array; NaN or infinite entries get weight 0."""
    s = np.asarray(scores, dtype=np.float64) / float(temperature)
    valid = np.isfinite(s)
    s = np.where(valid, s, -np.inf)
    row_max = np.max(s, axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(valid, np.exp(s - row_max), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def weighted_rows(index: np.ndarray, weights: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Σ_j weights[n, j] · table[index[n, j]] for every n: (N, k), (N, k), (V, d) -> (N, d).

    One sparse (N x V) @ (V x d) product: 25x faster than k dense gathers of (N, d) rows
    (0.2 s for 46k neurons x 384 dims). A concept listed twice simply adds its weights.
    """
    from scipy import sparse

    n, k = index.shape
    table = np.asarray(table, dtype=np.float64)
    w = sparse.csr_matrix(
        (np.asarray(weights, dtype=np.float64).ravel(), (np.repeat(np.arange(n), k), np.asarray(index).ravel())),
        shape=(n, table.shape[0]),
    )
    return np.asarray(w @ table)


def cosine_distance(u: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(N, A) matrix 1 - cos(u_n, a_j)."""
    un = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    an = anchors / np.maximum(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12)
    return 1.0 - un @ an.T


def top_k_arrays(dissect: pd.DataFrame, top_k: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """One row per (epoch, layer, neuron) plus its (N, k) concepts and scores.

    The rank column gives the position; missing ranks hold concept None and score NaN.
    Returns ``keys`` (epoch, layer, neuron, top_concept, score, interpretable), concepts, scores.
    """
    df = dissect[dissect["rank"] < top_k]
    df = df.sort_values(["epoch", "layer", "neuron", "rank"], kind="stable")
    group = df.groupby(["epoch", "layer", "neuron"], sort=False).ngroup().to_numpy()
    first = np.r_[True, group[1:] != group[:-1]]
    n = int(group.max()) + 1 if len(group) else 0
    rank = df["rank"].to_numpy().astype(np.int64)
    concepts = np.full((n, top_k), None, dtype=object)
    scores = np.full((n, top_k), np.nan, dtype=np.float64)
    concepts[group, rank] = df["concept"].to_numpy(dtype=object)
    scores[group, rank] = df["score"].to_numpy(dtype=np.float64)
    heads = df[first]
    keys = pd.DataFrame(
        {
            "epoch": heads["epoch"].to_numpy(np.int32),
            "layer": heads["layer"].to_numpy(dtype=object),
            "neuron": heads["neuron"].to_numpy(np.int32),
            "top_concept": heads["concept"].to_numpy(dtype=object),
            "score": heads["score"].to_numpy(np.float32),
            "interpretable": heads["interpretable"].to_numpy(bool),
        }
    )
    return keys, concepts, scores


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of ``x`` and, for each row of ``x``, the index of its distinct row."""
    uniq, inverse = np.unique(np.ascontiguousarray(x), axis=0, return_inverse=True)
    return uniq, inverse.reshape(-1)


# ----------------------------------------------------------------------------- 2-D maps


class FittedMap:
    """2-D positions of the fitted points plus a way to place new vectors (``transform``)."""

    def __init__(self, positions: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]):
        self.positions = positions.astype(np.float32)
        self.transform = transform


def fit_pca_map(vectors: np.ndarray, seed: int = 0) -> FittedMap:
    """Deterministic 2-D PCA: components from the SVD, signs fixed so the largest loading is positive."""
    x = np.asarray(vectors, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = np.zeros((2, x.shape[1]))
    comps[: min(2, len(vt))] = vt[:2]
    signs = np.sign(comps[np.arange(2), np.argmax(np.abs(comps), axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]

    def transform(v: np.ndarray) -> np.ndarray:
        return ((np.asarray(v, dtype=np.float64) - mean) @ comps.T).astype(np.float32)

    return FittedMap(transform(x), transform)


def fit_umap_map(vectors: np.ndarray, seed: int = 0) -> FittedMap:
    """Seeded UMAP (cosine); PCA for fewer than MIN_UMAP_POINTS points."""
    x = np.asarray(vectors, dtype=np.float32)
    if len(x) < MIN_UMAP_POINTS:
        return fit_pca_map(x, seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap warns that a seed disables parallelism: that is the point
        import umap

        params = dict(UMAP_PARAMS, n_neighbors=min(UMAP_PARAMS["n_neighbors"], len(x) - 1))
        reducer = umap.UMAP(n_components=2, random_state=seed, **params)
        positions = reducer.fit_transform(x)

    def transform(v: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(reducer.transform(np.asarray(v, dtype=np.float32)), dtype=np.float32)

    return FittedMap(positions, transform)


MAP_METHODS: Registry[Callable[[np.ndarray, int], FittedMap]] = Registry(
    "map method", group="conceptmon.map_methods", field="embedding.map_method",
)
"""2-D projections ``fit(vectors, seed) -> FittedMap`` by name (entry-point group
``conceptmon.map_methods`` for others)."""
MAP_METHODS.register("umap")(fit_umap_map)
MAP_METHODS.register("pca")(fit_pca_map)


def map_key(encoder_fingerprint: str, terms: list[str], vectors: np.ndarray | None, method: str, seed: int) -> str:
    """Cache key of a map: everything its positions depend on."""
    h = hashlib.sha256()
    params = UMAP_PARAMS if method == "umap" else {}
    h.update(json.dumps({"encoder": encoder_fingerprint, "method": method, "seed": seed, "params": params,
                         "min_umap_points": MIN_UMAP_POINTS}, sort_keys=True).encode())
    h.update("\n".join(terms).encode("utf-8"))
    if vectors is not None:
        h.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return h.hexdigest()[:20]


def map_path(cache_dir: Path, key: str) -> Path:
    return store.map_cache_dir(cache_dir) / f"{key}.parquet"


def cached_map(
    terms: list[str], vectors: np.ndarray, *, key: str, method: str, seed: int, cache_dir: Path,
    need_transform: bool, log: Callable[[str], None],
) -> FittedMap:
    """The fitted map for ``terms``: from the cache when present (unless a transform is needed)."""
    path = map_path(cache_dir, key)
    if path.exists() and not need_transform:
        try:
            df = store.read_table(path, store.MAP_POSITIONS)
        except store.StoreError as e:
            log(f"embed: refitting, damaged map cache ({e})")
        else:
            if df["term"].tolist() == list(terms):
                log(f"embed: using cached 2-D map {path.name} ({len(terms)} points)")
                return FittedMap(df[["x", "y"]].to_numpy(np.float32), _no_transform)
    what = "first fit in a process compiles numba, ~15-60 s" if method == "umap" else "instant"
    log(f"embed: fitting {method} map on {len(terms)} points ({what})")
    fitted = MAP_METHODS.get(method)(vectors, seed)
    pos = fitted.positions
    store.write_table(path, pd.DataFrame({"term": list(terms), "x": pos[:, 0], "y": pos[:, 1]}), store.MAP_POSITIONS)
    return fitted


def _no_transform(v: np.ndarray) -> np.ndarray:
    raise RuntimeError("a map loaded from the cache has no transform; refit it")


# ----------------------------------------------------------------------------- settings and freshness


@dataclass
class EmbedSettings(EmbeddingConfig):
    """The config's ``embedding:`` section plus ``top_k``: everything an embedding depends on."""

    top_k: int = 5

    def validate(self) -> "EmbedSettings":
        if not self.temperature > 0:
            raise EmbedError(f"embedding.temperature: must be positive, got {self.temperature}")
        for name, value, choices in (
            ("map_fit", self.map_fit, MAP_FITS),
            ("placement", self.placement, PLACEMENTS),
            ("map_method", self.map_method, MAP_METHODS.names()),
        ):
            if value not in choices:
                raise EmbedError(f"embedding.{name}: expected one of {', '.join(choices)}, got {value!r}")
        bad = [a for a in self.anchors if not encoder_text(a)]
        if bad:
            raise EmbedError(f"--anchors: empty anchor word in {self.anchors!r}")
        return self


def clean_anchors(anchors) -> list[str]:
    """Strip, drop empties and duplicates, keep order; accepts "a,b" or a list."""
    if anchors is None:
        return []
    if isinstance(anchors, str):
        anchors = anchors.split(",")
    return list(dict.fromkeys(str(a).strip() for a in anchors if str(a).strip()))


AUTOMATIC_ANCHORS = 5
"""Without anchors from the user, the run's most frequent top-1 concepts become anchors."""
ANCHOR_SOURCES = ("given", "config", "automatic", "none")


def automatic_anchors(dissect, n: int = AUTOMATIC_ANCHORS) -> list[str]:
    """The ``n`` most frequent top-1 concepts of interpretable neurons at the last epoch
    (all live neurons when none is interpretable), ties by name."""
    last = dissect[(dissect["epoch"] == dissect["epoch"].max()) & (dissect["rank"] == 0)]
    last = last[last["concept"].notna()]
    pool = last[last["interpretable"].astype(bool)] if last["interpretable"].any() else last
    counts = pool.groupby("concept").size().reset_index(name="n")
    counts = counts.sort_values(["n", "concept"], ascending=[False, True], kind="stable")
    return [str(c) for c in counts["concept"].head(n)]


def choose_anchors(given: list[str] | None, previous: dict | None, configured: list[str]) -> tuple[list[str] | None, str]:
    """Which anchors an embedding uses, and why: the same rule for embed, plot and report.

    ``--anchors a,b`` (given) wins and is kept for later calls; ``--anchors auto`` returns
    to automatic ones and ``--anchors none`` drops them. Without ``--anchors``: the anchors
    given to an earlier call, else the config's ``embedding.anchors``, else automatic.
    Returns (anchors, source); anchors is None for automatic (they depend on the tables).
    """
    if given is not None:
        words = clean_anchors(given)
        if words == ["auto"]:
            return None, "automatic"
        if words in ([], ["none"]):
            return [], "none"
        return words, "given"
    previous = previous or {}
    if previous.get("anchor_source") in ("given", "none"):
        return list((previous.get("settings") or {}).get("anchors") or []), previous["anchor_source"]
    if configured:
        return clean_anchors(configured), "config"
    return None, "automatic"


def resolve_settings(manifest: dict, **given) -> EmbedSettings:
    """Explicit values win; the rest come from the manifest's config (``embedding:``, ``top_k``)."""
    cfg = manifest.get("config") or {}
    emb = cfg.get("embedding") or {}
    known = {f.name for f in fields(EmbeddingConfig)}
    s = EmbedSettings(**{k: v for k, v in emb.items() if k in known}, top_k=int(cfg.get("top_k", 5)))
    s.anchors = clean_anchors(s.anchors)
    s.seed = int(s.seed)
    for name, value in given.items():
        if value is not None:
            setattr(s, name, clean_anchors(value) if name == "anchors" else value)
    s.temperature = float(s.temperature)
    return s.validate()


def embed_generation(out: Path, *, require_fresh: bool = True) -> store.Generation | None:
    """The current embedding of ``out`` (None when never embedded).

    With ``require_fresh`` it must have been made from exactly the dissect tables that are
    there now, and its own files must be intact; otherwise :class:`store.StaleError`
    names what changed and the command that refreshes it.
    """
    out = Path(out)
    gen = store.read_generation(out, store.EMBED)
    if gen is None:
        if store.legacy_outputs(out, store.EMBED):
            raise store.StaleError(f"{store.embed_dir(out)}: written by conceptmon 0.1; re-run `conceptmon embed`")
        return None
    if require_fresh:
        problem = staleness(out, gen)
        if problem:
            raise store.StaleError(f"{store.embed_dir(out)}: {problem}; re-run `conceptmon embed --out {out}`")
    return gen


def staleness(out: Path, gen: store.Generation) -> str | None:
    """Why ``gen`` no longer matches the dissect tables of ``out`` (None when it does)."""
    made_from = (gen.record.get("inputs") or {}).get("dissect") or {}
    now = store.dissect_inputs(store.check_dissect_lineage(out))
    if made_from != now:
        changed = sorted({int(e) for e in set(made_from) ^ set(now)}
                         | {int(e) for e in set(made_from) & set(now) if made_from[e] != now[e]})
        return f"made from other dissect tables (epochs {changed} were added, removed or redone since)"
    bad = gen.stale_files()
    if bad:
        return f"{', '.join(bad)} changed on disk since it was written"
    return None


def read_embed_meta(out: Path) -> dict | None:
    """The record of the current embedding (encoder, settings, map key, inputs), or None."""
    gen = store.read_generation(Path(out), store.EMBED)
    return gen.record if gen is not None else None


def _freshness(settings: EmbedSettings, encoder_fp: str, inputs: dict, anchor_source: str | None = None) -> dict:
    fresh = {"settings": asdict(settings), "encoder_fingerprint": encoder_fp, "inputs": {"dissect": inputs}}
    if anchor_source is not None:
        fresh["anchor_source"] = anchor_source
    return fresh


def is_fresh(out: Path, settings: EmbedSettings, encoder_fp: str, anchor_source: str | None = None) -> bool:
    gen = store.read_generation(Path(out), store.EMBED)
    if gen is None or gen.stale_files():
        return False
    expected = _freshness(settings, encoder_fp, store.dissect_inputs(store.check_dissect_lineage(out)),
                          anchor_source)
    return {k: gen.record.get(k) for k in expected} == expected


def same_map(meta_a: dict, meta_b: dict) -> bool:
    """True when two runs' coordinates live on one map (same encoder weights, same fitted map).

    Vocabulary maps of runs with the same concepts, anchors and encoder share a key; maps
    fitted on neurons are specific to their run (their key hashes the neuron vectors).
    """
    keys = ("encoder", "encoder_fingerprint", "map_key")
    return all(meta_a.get(k) is not None and meta_a.get(k) == meta_b.get(k) for k in keys)


# ----------------------------------------------------------------------------- the run


def _vocabulary(manifest: dict, concepts: np.ndarray) -> list[str]:
    names = list((manifest.get("concepts") or {}).get("names") or [])
    present = [c for c in pd.unique(concepts.ravel()) if c is not None]
    return list(dict.fromkeys(names + present))


def embed_run(
    out: Path,
    *,
    anchors: list[str] | None = None,
    encoder: str | None = None,
    temperature: float | None = None,
    map_fit: str | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    placement: str | None = None,
    map_method: str | None = None,
    device: str | None = None,
) -> dict:
    """Embed every neuron of every finished epoch of ``out``; skip when the outputs are fresh.

    Settings not given come from the manifest's config (``embedding:`` and ``top_k``).
    Returns a summary: output paths, encoder, settings, number of neurons, ``skipped``.
    """
    out = Path(out)
    manifest = store.read_manifest(out)
    configured = ((manifest.get("config") or {}).get("embedding") or {}).get("anchors") or []
    chosen, anchor_source = choose_anchors(anchors, read_embed_meta(out), configured)
    if chosen is None:  # automatic: from the last epoch's table (cheap: one file)
        last = max(store.finished_epochs(out), default=None)
        chosen = automatic_anchors(store.read_dissect(out, [last])) if last is not None else []
    settings = resolve_settings(
        manifest, anchors=chosen, encoder=encoder, temperature=temperature, map_fit=map_fit,
        placement=placement, map_method=map_method,
    )
    cfg = manifest.get("config") or {}
    if cache_dir is None:
        cache_dir = store.resolve_cache_dir(cfg.get("cache_dir"))
    text_encoder = create_encoder(settings.encoder, device or cfg.get("device") or "auto")
    encoder_fp = text_encoder.fingerprint()
    summary = {"encoder": settings.encoder, "settings": asdict(settings), "anchor_source": anchor_source}
    if not force and is_fresh(out, settings, encoder_fp, anchor_source):
        meta = read_embed_meta(out)
        log(f"embed: {store.embed_dir(out)} is up to date ({meta.get('n_neurons')} neurons, {settings.encoder})")
        return {**summary, "n_neurons": meta.get("n_neurons"), "epochs": meta.get("epochs"),
                "map_key": meta.get("map_key"), "skipped": True}

    t0 = time.perf_counter()
    records = store.check_dissect_lineage(out)
    inputs = store.dissect_inputs(records)
    epochs = sorted(records)
    dissect = store.read_dissect(out, epochs, check=False)
    if "dead" in dissect.columns:  # dead units have no concept: they stay out of the space
        dissect = dissect[~dissect["dead"].astype(bool)]
    keys, concepts, scores = top_k_arrays(dissect, settings.top_k)
    if len(keys) == 0:
        raise EmbedError(f"{out}: the dissection tables hold no neurons")

    # One text table for the vocabulary and the anchors; concepts index into it.
    vocab = _vocabulary(manifest, concepts)
    terms = sorted(set(map(encoder_text, vocab)) | set(map(encoder_text, settings.anchors)))
    term_index = {t: i for i, t in enumerate(terms)}
    vectors = encode_cached(text_encoder, terms, cache_dir, log)
    concept_row = {c: term_index[encoder_text(c)] for c in vocab}
    flat = pd.Series(concepts.ravel(), dtype=object).map(concept_row)
    index = flat.fillna(0).to_numpy(np.int64).reshape(concepts.shape)  # missing ranks weigh 0
    weights = softmax_weights(scores, settings.temperature)
    u = weighted_rows(index, weights, vectors).astype(np.float32)
    anchor_rows = np.array([term_index[encoder_text(a)] for a in settings.anchors], dtype=np.int64)
    anchor_vecs = vectors[anchor_rows] if len(anchor_rows) else np.zeros((0, vectors.shape[1]), np.float32)

    xy, anchor_xy, key = _place(
        settings, text_encoder.id, encoder_fp, terms, vectors, index, weights, u, anchor_vecs, anchor_rows,
        cache_dir, log,
    )

    neurons = keys.assign(
        x=xy[:, 0].astype(np.float32), y=xy[:, 1].astype(np.float32), embedding=list(u)
    )
    record = {
        **_freshness(settings, encoder_fp, inputs),
        "anchor_source": anchor_source,
        "encoder": text_encoder.id,
        "map_key": key,
        "cache_dir": str(Path(cache_dir).resolve()),
        "epochs": epochs,
        "n_neurons": int(len(keys)),
        "dim": int(vectors.shape[1]),
        "umap_params": UMAP_PARAMS,
        "conceptmon": __version__,
    }
    # All three tables become visible together, or not at all (a kill leaves the old ones).
    with store.new_generation(out, store.EMBED, record) as gen:
        gen.write_table(store.EMBED_FILES["neurons"], neurons, store.EMBED_NEURONS)
        gen.write_table(
            store.EMBED_FILES["anchors"],
            pd.DataFrame({
                "concept": pd.Series(settings.anchors, dtype=object), "x": anchor_xy[:, 0], "y": anchor_xy[:, 1],
                "embedding": pd.Series(list(anchor_vecs), dtype=object),
            }),
            store.ANCHORS,
        )
        gen.write_table(store.EMBED_FILES["neuron_anchor_distance"],
                        anchor_distance_table(keys, u, settings.anchors, anchor_vecs), store.NEURON_ANCHOR_DISTANCE)
    if settings.anchors:
        log(f"embed: anchors ({anchor_source}): {', '.join(settings.anchors)}")
    log(f"embed: {len(keys)} neurons x {len(epochs)} epochs -> {store.embed_dir(out)} "
        f"({settings.encoder}, T={settings.temperature:g}, {time.perf_counter() - t0:.1f} s)")
    return {**summary, "n_neurons": int(len(keys)), "epochs": epochs, "map_key": key, "skipped": False}


def embed_like_before(out: Path, *, anchors: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """``embed_run`` with the settings of the last embedding of ``out`` (encoder, T, anchors,
    map options, cache), so that plot/watch refresh outputs without silently changing them;
    the manifest's config when ``out`` was never embedded. ``anchors`` replaces the old ones.
    """
    prev = read_embed_meta(out) or {}
    given = prev.get("settings") or {}
    cache = prev.get("cache_dir")
    return embed_run(
        out,
        anchors=anchors,  # None keeps the anchors the way choose_anchors says
        encoder=given.get("encoder"), temperature=given.get("temperature"), map_fit=given.get("map_fit"),
        placement=given.get("placement"), map_method=given.get("map_method"),
        cache_dir=Path(cache) if cache and Path(cache).is_dir() else None, log=log,
    )


def _place(settings, encoder_id, encoder_fp, terms, vectors, index, weights, u, anchor_vecs, anchor_rows,
           cache_dir, log) -> tuple[np.ndarray, np.ndarray, str]:
    """2-D positions of the neurons and the anchors, and the map's cache key."""
    method, seed = settings.map_method, settings.seed
    transform = settings.placement == "transform"
    if settings.map_fit == "vocabulary":
        key = map_key(encoder_fp, terms, None, method, seed)
        fitted = cached_map(terms, vectors, key=key, method=method, seed=seed, cache_dir=cache_dir,
                            need_transform=transform, log=log)
        if transform:
            distinct, inverse = unique_rows(u)
            log(f"embed: placing {len(distinct)} distinct neuron vectors with {method} transform")
            xy = fitted.transform(distinct)[inverse]
        else:
            xy = weighted_rows(index, weights, fitted.positions)
        return xy, fitted.positions[anchor_rows].reshape(-1, 2), key
    # map_fit == "neurons": one fit on every distinct neuron vector of every epoch, plus the anchors.
    distinct, inverse = unique_rows(u)
    fit_vectors = np.concatenate([distinct, anchor_vecs]).astype(np.float32)
    fit_terms = [f"neuron:{i}" for i in range(len(distinct))] + [f"anchor:{a}" for a in settings.anchors]
    key = map_key(encoder_fp, fit_terms, fit_vectors, method, seed)
    fitted = cached_map(fit_terms, fit_vectors, key=key, method=method, seed=seed, cache_dir=cache_dir,
                        need_transform=False, log=log)
    return fitted.positions[: len(distinct)][inverse], fitted.positions[len(distinct):].reshape(-1, 2), key


def anchor_distance_table(keys: pd.DataFrame, u: np.ndarray, anchors: list[str], anchor_vecs: np.ndarray) -> pd.DataFrame:
    """Long NEURON_ANCHOR_DISTANCE rows: every neuron x every anchor."""
    n, a = len(keys), len(anchors)
    dist = cosine_distance(u, anchor_vecs) if a else np.zeros((n, 0))
    return pd.DataFrame({
        "epoch": np.repeat(keys["epoch"].to_numpy(np.int32), a),
        "layer": np.repeat(keys["layer"].to_numpy(dtype=object), a),
        "neuron": np.repeat(keys["neuron"].to_numpy(np.int32), a),
        "anchor": np.tile(np.asarray(anchors, dtype=object), n),
        "distance": dist.reshape(-1).astype(np.float32),
    })


# ----------------------------------------------------------------------------- readers


def embed_table_path(out: Path, name: str, *, require_fresh: bool = True) -> Path:
    """The path of table ``name`` (see ``store.EMBED_FILES``) in the current, fresh embedding."""
    gen = embed_generation(out, require_fresh=require_fresh)
    if gen is None:
        raise EmbedError(f"{store.embed_dir(out)}: no embedding yet (run `conceptmon embed --out {out}` first)")
    return gen.path(store.EMBED_FILES[name])


def read_neurons(out: Path, *, with_embedding: bool = False, epochs: list[int] | None = None,
                 require_fresh: bool = True) -> pd.DataFrame:
    """neurons.parquet; without the (large) embedding column unless asked for."""
    path = embed_table_path(out, "neurons", require_fresh=require_fresh)
    columns = [c for c in store.EMBED_NEURONS.names if with_embedding or c != "embedding"]
    try:
        table = pq.read_table(path, columns=columns, filters=[("epoch", "in", epochs)] if epochs else None)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise store.StoreError(f"{path}: not a readable Parquet file ({e})") from None
    return table.to_pandas()


def read_anchors(out: Path, *, require_fresh: bool = True) -> pd.DataFrame:
    return store.read_table(embed_table_path(out, "anchors", require_fresh=require_fresh), store.ANCHORS)


def read_anchor_distances(out: Path, *, require_fresh: bool = True) -> pd.DataFrame:
    return store.read_table(embed_table_path(out, "neuron_anchor_distance", require_fresh=require_fresh),
                            store.NEURON_ANCHOR_DISTANCE)


def embedding_matrix(neurons: pd.DataFrame) -> np.ndarray:
    """The list<float32> ``embedding`` column as one (N, d) array."""
    if len(neurons) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(neurons["embedding"].to_numpy()).astype(np.float32, copy=False)


__all__ = [
    "EmbedError", "EmbedSettings", "EncoderError", "anchor_distance_table", "cosine_distance", "embed_generation",
    "embed_like_before", "embed_run", "embed_table_path",
    "embedding_matrix", "encoder_text", "fit_pca_map", "fit_umap_map", "read_anchor_distances", "read_anchors",
    "read_embed_meta", "read_neurons", "same_map", "softmax_weights", "top_k_arrays", "weighted_rows",
]
