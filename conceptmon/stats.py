"""Training statistics: every statistic is a small pure function of tables.

Inputs are the dissection rows (``store.DISSECT``), and, where available, the embedding
outputs (``store.EMBED_NEURONS``, ``store.NEURON_ANCHOR_DISTANCE``). :func:`stats_run`
does the I/O: it reads ``OUT``, computes every table and writes ``OUT/stats/<name>.parquet``.

Definitions (the issue leaves these open; they are fixed here and in the README):

* A neuron's **top-1 concept** is its ``rank == 0`` row; its **best score** is that
  row's score; it is **interpretable** when the ``interpretable`` flag of its rows is
  true (best score >= the detector threshold).
* **interpretable**: per (epoch, layer), ``n_neurons`` = neurons in the table,
  ``n_interpretable``, ``share_interpretable`` = n_interpretable / n_neurons.
* **categories**: interpretable neurons counted by the category of their top-1
  concept, per (epoch, layer, category); every category of the concept set appears
  (zero when no neuron has it). ``share_of_interpretable`` divides by the layer's
  interpretable neurons (0 when there are none), ``share_of_neurons`` by all its neurons.
* **concepts**: per (epoch, layer, top-1 concept), ``n_neurons`` = neurons whose top-1
  concept it is and ``n_interpretable`` = those of them that are interpretable
  ("17 neurons detect car in layer4" reads ``n_interpretable``). Only concepts that
  are some neuron's top-1 appear.
* **changes**: consecutive checkpoints are consecutive epochs among those dissected
  (after ``--layers`` filtering, over the whole table). A change is a neuron present
  at both epochs whose top-1 concept differs; one row per change, from -> to.
* **stability**: per layer and consecutive pair, ``n_kept`` neurons keep their top-1
  concept out of ``n_neurons`` present at both epochs; layer ``all`` pools the layers.
* **retention** (the paper's Fig. 5b): at the reference epoch (default: the first),
  rank a layer's neurons by best score, highest first, ties broken by lower neuron id;
  for x in 5, 10, ..., 100 % take the top ``ceil(x/100 * n)`` neurons and report the
  share whose top-1 concept at each *later* epoch equals their reference concept (a
  neuron missing at that epoch counts as not kept). Layer ``all`` pools the per-layer
  selections: sum of kept / sum of selected (scores of different layers are not
  ranked against each other).
* **diversity**: per (epoch, layer), over *all* neurons' top-1 concepts: the number of
  distinct concepts, the Shannon entropy of their distribution in **bits** (log2), the
  number of distinct top-1 concepts among interpretable neurons, and the mean pairwise
  cosine distance ``1 - cos(u_i, u_j)`` over all unordered pairs of the layer's neuron
  embeddings (zero vectors left out; null when the embedding outputs are missing or a
  layer has fewer than two neurons).
* **anchor_neighbors**: per (anchor, epoch), the ``k`` (default 10) neurons of all
  layers nearest to the anchor by the embedding's neuron->anchor distance, ties by
  (layer, neuron); **anchor_distance**: per (anchor, epoch, layer), the mean distance
  of the k nearest neurons of that layer, and layer ``all`` over all layers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import store
from .errors import ConceptmonError

ALL_LAYERS = "all"
"""Layer name of rows that pool every layer."""
RETENTION_PERCENTS = tuple(range(5, 101, 5))
DEFAULT_ANCHOR_K = 10

# The order tables are computed, written and printed in.
TABLES = (
    "interpretable",
    "categories",
    "concepts",
    "changes",
    "stability",
    "retention",
    "diversity",
    "anchor_neighbors",
    "anchor_distance",
)


class StatsError(ConceptmonError):
    """Statistics asked for with arguments the results cannot satisfy."""


# ----------------------------------------------------------------------------- helpers


def top1(dissect: pd.DataFrame) -> pd.DataFrame:
    """One row per (epoch, layer, neuron): its top-1 concept, category, best score, flag."""
    cols = ["epoch", "layer", "neuron", "concept", "category", "score", "interpretable"]
    rows = dissect.loc[dissect["rank"] == 0, cols]
    return rows.sort_values(["epoch", "layer", "neuron"], kind="stable").reset_index(drop=True)


def epochs_of(table: pd.DataFrame) -> list[int]:
    return sorted(int(e) for e in pd.unique(table["epoch"]))


def _concept_matrix(first: pd.DataFrame):
    """Top-1 concepts as a (neurons x epochs) code matrix, -1 where a neuron is missing.

    Returns the (layer, neuron) index, the epoch list, the codes, the concept names
    (codes index them) and the best scores (NaN where missing).
    """
    codes, names = pd.factorize(first["concept"], sort=True)
    frame = first[["layer", "neuron", "epoch", "score"]].assign(code=codes)
    wide_code = frame.pivot(index=["layer", "neuron"], columns="epoch", values="code")
    wide_score = frame.pivot(index=["layer", "neuron"], columns="epoch", values="score")
    code_matrix = wide_code.fillna(-1).to_numpy(dtype=np.int64)
    score_matrix = wide_score.to_numpy(dtype=np.float64)
    return wide_code.index, [int(e) for e in wide_code.columns], code_matrix, np.asarray(names), score_matrix


# ----------------------------------------------------------------------------- statistics


def interpretable_counts(dissect: pd.DataFrame) -> pd.DataFrame:
    """Interpretable neurons per (epoch, layer): count and share."""
    first = top1(dissect)
    grouped = first.groupby(["epoch", "layer"], sort=True)["interpretable"]
    table = grouped.agg(n_neurons="size", n_interpretable="sum").reset_index()
    table["n_interpretable"] = table["n_interpretable"].astype(np.int64)
    table["n_neurons"] = table["n_neurons"].astype(np.int64)
    table["share_interpretable"] = table["n_interpretable"] / table["n_neurons"]
    return table


def category_counts(dissect: pd.DataFrame, categories: Iterable[str] | None = None) -> pd.DataFrame:
    """Interpretable neurons per (epoch, layer, category of their top-1 concept).

    ``categories`` (e.g. the concept set's) are all listed, with zeros; categories that
    occur in the table but not in ``categories`` are added after them.
    """
    first = top1(dissect)
    seen = sorted(c for c in pd.unique(first["category"]) if isinstance(c, str))  # dead units have none
    order = list(dict.fromkeys([*(categories or []), *seen]))
    layer_totals = first.groupby(["epoch", "layer"], sort=True)["interpretable"].agg(
        n_neurons="size", n_layer_interpretable="sum"
    )
    counts = (
        first[first["interpretable"]]
        .groupby(["epoch", "layer", "category"])
        .size()
        .rename("n_interpretable")
    )
    grid = pd.MultiIndex.from_tuples(
        [(e, l, c) for (e, l) in layer_totals.index for c in order],
        names=["epoch", "layer", "category"],
    )
    table = counts.reindex(grid, fill_value=0).reset_index()
    table = table.join(layer_totals, on=["epoch", "layer"])
    table["n_interpretable"] = table["n_interpretable"].astype(np.int64)
    denominator = table["n_layer_interpretable"].where(table["n_layer_interpretable"] > 0)
    table["share_of_interpretable"] = (table["n_interpretable"] / denominator).fillna(0.0)
    table["share_of_neurons"] = table["n_interpretable"] / table["n_neurons"]
    return table[["epoch", "layer", "category", "n_interpretable", "share_of_interpretable", "share_of_neurons"]]


def concept_counts(dissect: pd.DataFrame) -> pd.DataFrame:
    """Neurons per top-1 concept per (epoch, layer), all and interpretable ones.

    Sorted by epoch, layer, then most interpretable neurons first (concept name breaks ties).
    """
    first = top1(dissect)
    table = (
        first.groupby(["epoch", "layer", "concept", "category"], sort=False)["interpretable"]
        .agg(n_neurons="size", n_interpretable="sum")
        .reset_index()
    )
    table["n_neurons"] = table["n_neurons"].astype(np.int64)
    table["n_interpretable"] = table["n_interpretable"].astype(np.int64)
    table = table.sort_values(
        ["epoch", "layer", "n_interpretable", "n_neurons", "concept"],
        ascending=[True, True, False, False, True],
        kind="stable",
    )
    return table.reset_index(drop=True)


def concept_changes(dissect: pd.DataFrame) -> pd.DataFrame:
    """One row per top-1 concept change of a neuron between consecutive checkpoints."""
    columns = ["layer", "neuron", "epoch_from", "epoch_to", "concept_from", "concept_to", "score_from", "score_to"]
    first = top1(dissect)
    epochs = epochs_of(first)
    if len(epochs) < 2:
        return pd.DataFrame({c: pd.Series(dtype=_CHANGE_DTYPES[c]) for c in columns})
    index, epochs, codes, names, scores = _concept_matrix(first)
    before, after = codes[:, :-1], codes[:, 1:]
    changed = (before >= 0) & (after >= 0) & (before != after)
    rows, pairs = np.nonzero(changed)
    table = pd.DataFrame(
        {
            "layer": index.get_level_values("layer")[rows],
            "neuron": index.get_level_values("neuron")[rows].astype(np.int64),
            "epoch_from": np.asarray(epochs)[pairs],
            "epoch_to": np.asarray(epochs)[pairs + 1],
            "concept_from": names[before[rows, pairs]] if len(rows) else np.array([], dtype=object),
            "concept_to": names[after[rows, pairs]] if len(rows) else np.array([], dtype=object),
            "score_from": scores[rows, pairs],
            "score_to": scores[rows, pairs + 1],
        }
    )
    table = table.sort_values(["layer", "neuron", "epoch_from"], kind="stable").reset_index(drop=True)
    return table.astype(_CHANGE_DTYPES)


_CHANGE_DTYPES = {
    "layer": object, "neuron": np.int64, "epoch_from": np.int64, "epoch_to": np.int64,
    "concept_from": object, "concept_to": object, "score_from": np.float64, "score_to": np.float64,
}


def concept_stability(dissect: pd.DataFrame) -> pd.DataFrame:
    """Share of neurons keeping their top-1 concept between consecutive checkpoints.

    Per layer and pooled (layer ``all``); only neurons present at both epochs count.
    """
    columns = ["layer", "epoch_from", "epoch_to", "n_neurons", "n_kept", "share_kept"]
    first = top1(dissect)
    if len(epochs_of(first)) < 2:
        return _empty(columns, {"layer": object, "share_kept": np.float64})
    index, epochs, codes, _, _ = _concept_matrix(first)
    before, after = codes[:, :-1], codes[:, 1:]
    present = (before >= 0) & (after >= 0)
    kept = present & (before == after)
    layers = index.get_level_values("layer")
    frames = []
    for name, rows in [*((l, layers == l) for l in sorted(pd.unique(layers))), (ALL_LAYERS, slice(None))]:
        frames.append(
            pd.DataFrame(
                {
                    "layer": name,
                    "epoch_from": epochs[:-1],
                    "epoch_to": epochs[1:],
                    "n_neurons": present[rows].sum(axis=0).astype(np.int64),
                    "n_kept": kept[rows].sum(axis=0).astype(np.int64),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    denominator = table["n_neurons"].where(table["n_neurons"] > 0)
    table["share_kept"] = table["n_kept"] / denominator
    return table[columns]


def retention(
    dissect: pd.DataFrame,
    reference: int | None = None,
    percents: Iterable[int] = RETENTION_PERCENTS,
) -> pd.DataFrame:
    """Share of the reference's top-x % most interpretable neurons that keep their concept.

    See the module docstring for the exact selection rule; one row per
    (layer or ``all``, later epoch, percent).
    """
    columns = ["reference_epoch", "layer", "epoch", "percent", "n_selected", "n_kept", "share_kept"]
    first = top1(dissect)
    epochs = epochs_of(first)
    if reference is None:
        reference = epochs[0]
    if reference not in epochs:
        raise StatsError(f"--reference {reference}: epoch not in the results; available epochs: {format_epochs(epochs)}")
    percents = [int(p) for p in percents]
    bad = [p for p in percents if not 0 < p <= 100]
    if bad:
        raise StatsError(f"retention percents {bad}: each must be in 1..100")
    later = [e for e in epochs if e > reference]
    if not later:
        return _empty(columns, {"layer": object, "share_kept": np.float64})
    index, epochs, codes, _, scores = _concept_matrix(first)
    ref_col = epochs.index(reference)
    later_cols = [epochs.index(e) for e in later]
    layers = index.get_level_values("layer")
    neurons = index.get_level_values("neuron").to_numpy()
    selected_total = np.zeros(len(percents), dtype=np.int64)
    kept_total = np.zeros((len(later), len(percents)), dtype=np.int64)
    frames = []
    for layer in sorted(pd.unique(layers)):
        rows = np.nonzero((layers == layer) & (codes[:, ref_col] >= 0))[0]
        # Highest best score first; lexsort's last key is primary, so -score, then neuron id.
        order = rows[np.lexsort((neurons[rows], -scores[rows, ref_col]))]
        n = len(order)
        ref_codes = codes[order, ref_col]
        kept = codes[order][:, later_cols] == ref_codes[:, None]  # (n, later)
        kept_cum = np.vstack([np.zeros((1, len(later)), dtype=np.int64), np.cumsum(kept, axis=0)])
        # Integer ceil(p * n / 100): float p/100*n can land just above an integer (0.35*20).
        n_selected = np.array([-(-p * n // 100) for p in percents], dtype=np.int64)
        n_kept = kept_cum[n_selected].T  # (later, percents)
        selected_total += n_selected
        kept_total += n_kept
        frames.append(_retention_frame(reference, layer, later, percents, n_selected, n_kept))
    frames.append(_retention_frame(reference, ALL_LAYERS, later, percents, selected_total, kept_total))
    table = pd.concat(frames, ignore_index=True)
    return table[columns]


def _retention_frame(reference, layer, later, percents, n_selected, n_kept) -> pd.DataFrame:
    n_later, n_percents = len(later), len(percents)
    selected = np.tile(n_selected, n_later)
    kept = np.asarray(n_kept).reshape(-1)
    return pd.DataFrame(
        {
            "reference_epoch": np.int64(reference),
            "layer": layer,
            "epoch": np.repeat(np.asarray(later, dtype=np.int64), n_percents),
            "percent": np.tile(np.asarray(percents, dtype=np.int64), n_later),
            "n_selected": selected,
            "n_kept": kept,
            "share_kept": np.where(selected > 0, kept / np.maximum(selected, 1), np.nan),
        }
    )


def concept_diversity(dissect: pd.DataFrame) -> pd.DataFrame:
    """Distinct top-1 concepts and their entropy (bits) per (epoch, layer)."""
    first = top1(dissect)
    per_concept = first.groupby(["epoch", "layer", "concept"], sort=True).size().rename("n").reset_index()
    total = per_concept.groupby(["epoch", "layer"])["n"].transform("sum")
    p = per_concept["n"] / total
    per_concept["plogp"] = -p * np.log2(p)
    table = per_concept.groupby(["epoch", "layer"], sort=True).agg(
        n_neurons=("n", "sum"), n_distinct_concepts=("concept", "size"), entropy_bits=("plogp", "sum")
    )
    interpretable = first[first["interpretable"]].groupby(["epoch", "layer"])["concept"].nunique()
    table["n_distinct_interpretable"] = interpretable.reindex(table.index, fill_value=0).astype(np.int64)
    table = table.reset_index()
    table["n_neurons"] = table["n_neurons"].astype(np.int64)
    table["n_distinct_concepts"] = table["n_distinct_concepts"].astype(np.int64)
    # A single concept has entropy 0; -0.0 from the sum would print oddly.
    table["entropy_bits"] = table["entropy_bits"].abs()
    return table


def embedding_spread(neurons: pd.DataFrame, vectors: np.ndarray | None = None) -> pd.DataFrame:
    """Mean pairwise cosine distance of neuron embeddings per (epoch, layer).

    ``vectors`` (one row per row of ``neurons``) saves stacking the ``embedding`` column.
    With unit vectors, the sum over ordered pairs i != j of cos(u_i, u_j) is
    |sum u|^2 - n, so the mean over pairs needs one sum per group, not n^2 products.
    """
    columns = ["epoch", "layer", "mean_cosine_distance"]
    if neurons.empty:
        return _empty(columns, {"layer": object, "mean_cosine_distance": np.float64})
    if vectors is None:
        vectors = np.stack([np.asarray(v) for v in neurons["embedding"].to_numpy()])
    groups = neurons.reset_index(drop=True).groupby(["epoch", "layer"], sort=True).indices
    rows = []
    # One block per (epoch, layer), in float64: whole-table float64 copies of ~50k x 384
    # embeddings cost more in memory traffic than the arithmetic.
    for (epoch, layer), index in groups.items():
        block = np.asarray(vectors[index], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        unit = block[norms > 0] / norms[norms > 0, None]
        n = len(unit)
        if n < 2:
            rows.append((int(epoch), layer, np.nan))
            continue
        total = unit.sum(axis=0)
        mean_cos = (total @ total - n) / (n * (n - 1))
        rows.append((int(epoch), layer, 1.0 - mean_cos))
    table = pd.DataFrame(rows, columns=columns)
    table["epoch"] = table["epoch"].astype(np.int64)
    return table


def anchor_neighbors(distances: pd.DataFrame, first: pd.DataFrame | None = None, k: int = DEFAULT_ANCHOR_K) -> pd.DataFrame:
    """The k neurons nearest to each anchor per epoch, over all layers.

    ``first`` (the :func:`top1` table) adds each neuron's top-1 concept when given.
    """
    _check_k(k)
    ordered = distances.sort_values(["anchor", "epoch", "distance", "layer", "neuron"], kind="stable")
    nearest = ordered.groupby(["anchor", "epoch"], sort=False).head(k).copy()
    nearest["rank"] = nearest.groupby(["anchor", "epoch"], sort=False).cumcount().astype(np.int64)
    if first is not None:
        nearest = nearest.merge(first[["epoch", "layer", "neuron", "concept"]], on=["epoch", "layer", "neuron"], how="left")
    else:
        nearest["concept"] = None
    nearest["epoch"] = nearest["epoch"].astype(np.int64)
    nearest["neuron"] = nearest["neuron"].astype(np.int64)
    nearest["distance"] = nearest["distance"].astype(np.float64)
    columns = ["anchor", "epoch", "rank", "layer", "neuron", "concept", "distance"]
    return nearest[columns].sort_values(["anchor", "epoch", "rank"]).reset_index(drop=True)


def anchor_mean_distance(distances: pd.DataFrame, k: int = DEFAULT_ANCHOR_K) -> pd.DataFrame:
    """Mean distance of the k nearest neurons per (anchor, epoch, layer) and over all layers."""
    _check_k(k)
    ordered = distances.sort_values(["anchor", "epoch", "distance", "layer", "neuron"], kind="stable")
    per_layer = (
        ordered.groupby(["anchor", "epoch", "layer"], sort=True).head(k)
        .groupby(["anchor", "epoch", "layer"], sort=True)["distance"]
        .agg(n_neighbors="size", mean_distance="mean")
        .reset_index()
    )
    pooled = (
        ordered.groupby(["anchor", "epoch"], sort=True).head(k)
        .groupby(["anchor", "epoch"], sort=True)["distance"]
        .agg(n_neighbors="size", mean_distance="mean")
        .reset_index()
        .assign(layer=ALL_LAYERS)
    )
    table = pd.concat([per_layer, pooled], ignore_index=True)
    table["k"] = np.int64(k)
    table["epoch"] = table["epoch"].astype(np.int64)
    table["n_neighbors"] = table["n_neighbors"].astype(np.int64)
    table["mean_distance"] = table["mean_distance"].astype(np.float64)
    table = table.sort_values(["anchor", "epoch", "layer"], kind="stable").reset_index(drop=True)
    return table[["anchor", "epoch", "layer", "k", "n_neighbors", "mean_distance"]]


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise StatsError(f"--k {k}: the number of nearest neurons per anchor must be at least 1")


def _empty(columns: list[str], dtypes: dict) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, np.int64)) for c in columns})


def format_epochs(epochs: list[int]) -> str:
    if len(epochs) > 12:
        return ", ".join(map(str, epochs[:5])) + f", ... ({len(epochs)} epochs), " + str(epochs[-1])
    return ", ".join(map(str, epochs))


# ----------------------------------------------------------------------------- all at once


def compute_stats(
    dissect: pd.DataFrame,
    *,
    categories: Iterable[str] | None = None,
    neurons: pd.DataFrame | None = None,
    vectors: np.ndarray | None = None,
    distances: pd.DataFrame | None = None,
    reference: int | None = None,
    anchor_k: int = DEFAULT_ANCHOR_K,
) -> dict[str, pd.DataFrame]:
    """Every statistic from in-memory tables; anchor tables only when ``distances`` is given.

    ``vectors``: the neurons' embeddings as one (len(neurons), d) array, when ``neurons``
    has no ``embedding`` column.
    """
    if dissect.empty:
        raise StatsError("no dissection rows to compute statistics from")
    tables = {
        "interpretable": interpretable_counts(dissect),
        "categories": category_counts(dissect, categories),
        "concepts": concept_counts(dissect),
        "changes": concept_changes(dissect),
        "stability": concept_stability(dissect),
        "retention": retention(dissect, reference),
    }
    diversity = concept_diversity(dissect)
    if neurons is not None:
        spread = embedding_spread(neurons, vectors)
        diversity = diversity.merge(spread, on=["epoch", "layer"], how="left")
    else:
        diversity["mean_cosine_distance"] = np.nan
    tables["diversity"] = diversity
    if distances is not None:
        tables["anchor_neighbors"] = anchor_neighbors(distances, top1(dissect), anchor_k)
        tables["anchor_distance"] = anchor_mean_distance(distances, anchor_k)
    return tables


def filter_layers(table: pd.DataFrame, layers: list[str] | None, available: list[str], where: str) -> pd.DataFrame:
    if layers is None:
        return table
    unknown = [l for l in layers if l not in available]
    if unknown:
        raise StatsError(f"--layers {','.join(unknown)}: not in {where}; available layers: {', '.join(available)}")
    return table[table["layer"].isin(layers)]


def _arrow_table(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Like ``store.read_table``, but the Arrow table (store.read_table returns pandas)."""
    columns = columns or list(schema.names)
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for a damaged file or missing columns
        raise store.StoreError(f"{path}: not a readable {', '.join(schema.names)} table ({e})") from None
    return table.cast(pa.schema([schema.field(c) for c in columns]))


def read_neuron_embeddings(
    path: Path, layers: list[str] | None = None, with_vectors: bool = True
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """EMBED_NEURONS rows without the embedding column, and the embeddings as one (N, d) array.

    Converting the list column to pandas makes one small array per row (seconds for
    ~50k neurons); flattening it in Arrow is one copy. ``with_vectors=False`` skips
    reading the embeddings at all (the map needs only coordinates).
    """
    import pyarrow.compute as pc

    names = [n for n in store.EMBED_NEURONS.names if with_vectors or n != "embedding"]
    table = _arrow_table(path, store.EMBED_NEURONS, names)
    if layers is not None:
        table = table.filter(pc.is_in(table.column("layer"), value_set=pa.array(layers, pa.string())))
    if not with_vectors:
        return table.to_pandas(), None
    column = table.column("embedding").combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != lengths.max() or column.null_count):
        raise StatsError(f"{path}: embeddings of different lengths ({lengths.min()}..{lengths.max()}); "
                         "re-run `conceptmon embed --force`")
    dim = int(lengths[0]) if len(lengths) else 0
    values = column.flatten().to_numpy(zero_copy_only=False)
    neurons = table.drop_columns(["embedding"]).to_pandas()
    return neurons, values.reshape(len(neurons), dim)


def load_inputs(out: Path, layers: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Read what the statistics need from ``out``; embedding inputs are None when absent.

    Keys: dissect, categories (the concept set's), neurons (EMBED_NEURONS rows without the
    embedding column), vectors (their embeddings, (N, d)), distances, manifest.
    """
    out = Path(out)
    dissect = store.read_dissect(out)
    available = sorted(pd.unique(dissect["layer"]))
    dissect = filter_layers(dissect, layers, available, f"{out}/dissect")
    try:
        manifest = store.read_manifest(out)
        categories = list(dict.fromkeys(manifest.get("concepts", {}).get("categories", []) or []))
    except store.StoreError:
        manifest, categories = {}, []
    neurons_path = store.embed_dir(out) / "neurons.parquet"
    distance_path = store.embed_dir(out) / "neuron_anchor_distance.parquet"
    neurons = vectors = distances = None
    if neurons_path.exists():
        neurons, vectors = read_neuron_embeddings(neurons_path, layers)
    else:
        log(f"notice: {neurons_path} missing: diversity.mean_cosine_distance left empty; "
            f"run `conceptmon embed --out {out}` to add it")
    if distance_path.exists():
        distances = store.read_table(distance_path, store.NEURON_ANCHOR_DISTANCE)
        if layers is not None:
            distances = distances[distances["layer"].isin(layers)]
    else:
        log(f"notice: {distance_path} missing: anchor statistics omitted; "
            f"run `conceptmon embed --out {out} --anchors WORD,...` to add them")
    return {"dissect": dissect, "categories": categories, "neurons": neurons, "vectors": vectors,
            "distances": distances, "manifest": manifest}


STATS_RECORD = "stats.json"
"""Written last by stats_run: the inputs and options the tables in OUT/stats were computed from."""


def input_state(out: Path) -> dict[str, list[int] | None]:
    """Size and modification time of every input file: a cheap "has anything changed" key.

    Outputs are replaced by atomic renames, so a re-dissected epoch or a new embedding
    always changes its file's mtime.
    """
    out = Path(out)
    paths = [out / store.MANIFEST]
    for epoch in store.finished_epochs(out):
        paths += [store.epoch_record_path(out, epoch), store.dissect_path(out, epoch)]
    paths += [store.embed_dir(out) / name for name in ("neurons.parquet", "neuron_anchor_distance.parquet")]
    state = {}
    for path in paths:
        try:
            info = path.stat()
            state[str(path.relative_to(out))] = [info.st_size, info.st_mtime_ns]
        except FileNotFoundError:
            state[str(path.relative_to(out))] = None
    return state


def read_fresh_stats(out: Path) -> dict[str, pd.DataFrame] | None:
    """The tables in OUT/stats when they were computed with default options from the
    current inputs; None when they are missing, stale or made with --layers/--reference/--k."""
    out = Path(out)
    record_path = store.stats_dir(out) / STATS_RECORD
    if not record_path.exists():
        return None
    try:
        record = store.read_json(record_path)
    except store.StoreError:
        return None
    defaults = {"layers": None, "reference": None, "anchor_k": DEFAULT_ANCHOR_K}
    if any(record.get(k) != v for k, v in defaults.items()) or record.get("inputs") != input_state(out):
        return None
    try:
        return {name: store.read_table(store.stats_dir(out) / f"{name}.parquet", store.STATS_SCHEMAS[name])
                for name in record.get("tables", [])}
    except store.StoreError:
        return None


def stats_run(
    out: Path,
    *,
    layers: list[str] | None = None,
    reference: int | None = None,
    anchor_k: int = DEFAULT_ANCHOR_K,
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """Compute every statistic for the run in ``out`` and write ``OUT/stats/<name>.parquet``.

    Tables whose inputs are missing (anchors without embedding outputs) are omitted,
    with a notice through ``log``, and any stale file of theirs is removed so that
    ``OUT/stats`` always describes the current results. ``OUT/stats/stats.json``,
    written last, records the inputs and options (the report reuses fresh tables).
    """
    out = Path(out)
    state = input_state(out)
    inputs = load_inputs(out, layers, log)
    tables = compute_stats(
        inputs["dissect"],
        categories=inputs["categories"],
        neurons=inputs["neurons"],
        vectors=inputs["vectors"],
        distances=inputs["distances"],
        reference=reference,
        anchor_k=anchor_k,
    )
    directory = store.stats_dir(out)
    record_path = directory / STATS_RECORD
    if record_path.exists():
        record_path.unlink()  # the tables below are about to change
    for name in TABLES:
        path = directory / f"{name}.parquet"
        if name in tables:
            store.write_table(path, tables[name], store.STATS_SCHEMAS[name])
        elif path.exists():
            path.unlink()
    store.write_json(record_path, {"inputs": state, "layers": layers, "reference": reference, "anchor_k": anchor_k,
                                   "tables": [n for n in TABLES if n in tables]})
    log(f"wrote {len(tables)} tables to {directory}")
    return tables


# ----------------------------------------------------------------------------- presentation


def table_records(table: pd.DataFrame) -> list[dict]:
    """Rows as plain Python values for JSON: numpy scalars unwrapped, NaN and infinities as None."""
    records = []
    columns = list(table.columns)
    for row in table.itertuples(index=False, name=None):
        records.append({c: _plain(v) for c, v in zip(columns, row)})
    return records


def _plain(value):
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None  # JSON has no NaN or infinity
    if value is None or (not isinstance(value, (str, list, np.ndarray)) and pd.isna(value)):
        return None
    return value


def spread_epochs(epochs: list[int], limit: int = 8) -> list[int]:
    """At most ``limit`` epochs, evenly spaced, always with the first and the last."""
    if len(epochs) <= limit:
        return list(epochs)
    picks = np.unique(np.round(np.linspace(0, len(epochs) - 1, limit)).astype(int))
    return [epochs[i] for i in picks]


def format_summary(tables: dict[str, pd.DataFrame], max_epochs: int = 8, top_concepts: int = 5) -> str:
    """A compact, readable digest of the statistics tables (the full tables are in OUT/stats)."""
    lines: list[str] = []
    counts = tables["interpretable"]
    epochs = sorted(int(e) for e in counts["epoch"].unique())
    last = epochs[-1]
    shown = spread_epochs(epochs, max_epochs)
    cells = counts[counts["epoch"].isin(shown)].assign(
        cell=lambda t: t["n_interpretable"].astype(str) + "/" + t["n_neurons"].astype(str)
    )
    grid = cells.pivot(index="layer", columns="epoch", values="cell")
    grid.columns = [f"ep {c}" for c in grid.columns]
    note = "" if len(shown) == len(epochs) else f" ({len(shown)} of {len(epochs)} epochs shown)"
    lines += [f"interpretable neurons per layer (interpretable/all){note}", indent(grid.to_string()), ""]

    concepts = tables["concepts"]
    lines.append(f"top concepts at epoch {last} (interpretable neurons)")
    for layer, group in concepts[concepts["epoch"] == last].groupby("layer", sort=True):
        best = group[group["n_interpretable"] > 0].head(top_concepts)
        text = ", ".join(f"{r.concept} {r.n_interpretable}" for r in best.itertuples()) or "none"
        lines.append(f"  {layer}: {text}")
    lines.append("")

    categories = tables["categories"]
    at_last = categories[categories["epoch"] == last]
    by_category = at_last.pivot(index="layer", columns="category", values="n_interpretable")
    by_category = by_category.loc[:, by_category.sum(axis=0) > 0] if not by_category.empty else by_category
    if by_category.shape[1]:
        lines += [f"interpretable neurons per category at epoch {last}", indent(by_category.to_string()), ""]

    stability = tables["stability"]
    if not stability.empty:
        changes = tables["changes"]
        mean_kept = stability.groupby("layer", sort=False)["share_kept"].mean()
        kept = ", ".join(f"{layer} {share:.1%}" for layer, share in mean_kept.items())
        lines += [f"concept changes: {len(changes)} over {len(epochs) - 1} checkpoint transitions",
                  f"  mean share keeping their top-1 concept between consecutive checkpoints: {kept}"]
        busiest = changes.groupby(["layer", "neuron"]).size().sort_values(ascending=False, kind="stable").head(3)
        if len(busiest):
            lines.append("  most-changing neurons:")
        for (layer, neuron), n in busiest.items():
            path = changes[(changes["layer"] == layer) & (changes["neuron"] == neuron)]
            steps = path.head(4)
            trail = " -> ".join([str(steps["concept_from"].iloc[0])] + [
                f"{c} (ep {e})" for c, e in zip(steps["concept_to"], steps["epoch_to"])])
            lines.append(f"    {layer} neuron {neuron} ({n} change{'s' if n != 1 else ''}): {trail}"
                         f"{' ...' if n > 4 else ''}")
        lines.append("")

    retained = tables["retention"]
    if not retained.empty:
        reference = int(retained["reference_epoch"].iloc[0])
        at = retained[(retained["epoch"] == last) & retained["percent"].isin([10, 50, 100])]
        grid = at.pivot(index="layer", columns="percent", values="share_kept").map(lambda v: f"{v:.1%}")
        grid = grid.reindex([*(l for l in grid.index if l != ALL_LAYERS), ALL_LAYERS])
        grid.columns = [f"top {p}%" for p in grid.columns]
        lines += [f"retention: share of the reference's top-x % neurons (epoch {reference}) keeping their concept "
                  f"at epoch {last}", indent(grid.to_string()), ""]

    diversity = tables["diversity"]
    at = diversity[diversity["epoch"] == last].set_index("layer")
    cols = {"n_distinct_concepts": "distinct concepts", "entropy_bits": "entropy (bits)",
            "mean_cosine_distance": "mean cos distance"}
    shown_cols = [c for c in cols if c != "mean_cosine_distance" or at[c].notna().any()]
    view = at[shown_cols].rename(columns=cols)
    lines += [f"diversity at epoch {last}", indent(view.to_string(float_format=lambda v: f"{v:.3f}")), ""]

    if "anchor_neighbors" in tables:
        near = tables["anchor_neighbors"]
        anchor_last = near[near["epoch"] == near.groupby("anchor")["epoch"].transform("max")]
        lines.append("nearest neurons per anchor (latest embedded epoch)")
        for anchor, group in anchor_last.groupby("anchor", sort=True):
            text = ", ".join(f"{r.layer}/{r.neuron} ({r.concept}) {r.distance:.3f}" for r in group.head(5).itertuples())
            lines.append(f"  {anchor} @ epoch {int(group['epoch'].iloc[0])}: {text}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
