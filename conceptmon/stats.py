"""Training statistics: every statistic declared once, as a small pure function of tables.

Each statistic is a :class:`Statistic` in the :data:`STATISTICS` registry: its name, its
Arrow schema, the function that computes it from :class:`StatsInputs`, how ``compare``
puts two runs side by side (:class:`Comparison`), and the lines it adds to the text
summary. The table list, the schemas ``stats`` writes and the tables ``compare`` joins
are all read from the registry, so adding a statistic touches one file::

    STATISTICS.register("my_stat")(Statistic(
        name="my_stat", title="My statistic", schema=pa.schema([...]),
        compute=lambda inputs: my_table(inputs.first), compare=Comparison(keys=(...), values=(...))))

Plugins can declare one in the ``conceptmon.statistics`` entry-point group.

Definitions (fixed here and in the README):

* A neuron's **top-1 concept** is its ``rank == 0`` row; its **best score** is that
  row's score; it is **interpretable** when that row's ``interpretable`` flag is true.
  A **dead** unit (no active pixel, constant activation) has one rank-0 row with no
  concept; it is never interpretable, and every statistic about concepts skips it.
* A label is **confident** when its bootstrap ``confidence`` is at least the run's
  ``trust.level`` (manifest ``config.trust.level``, default 0.9) and **uncertain** below.
  With the bootstrap off (confidence NaN) a label's confidence is *unknown*: confident
  and uncertain counts are then null (blank), never 0, and no change is called confident.
* **interpretable**: per (epoch, layer), ``n_neurons`` (dead units included), ``n_dead``
  and ``share_dead``, ``n_interpretable`` and ``share_interpretable`` (of n_neurons),
  ``n_confident`` / ``n_uncertain`` = interpretable neurons whose label is confident /
  uncertain, ``share_confident`` = n_confident / n_neurons.
* **categories**: interpretable neurons by the category of their top-1 concept, per
  (epoch, layer, category); every category of the concept set appears (zero when no
  neuron has it). ``share_of_interpretable`` divides by the layer's interpretable neurons
  (0 when there are none), ``share_of_neurons`` by all its neurons; ``n_confident`` counts
  those with a confident label.
* **concepts**: per (epoch, layer, top-1 concept) of live neurons, ``n_neurons`` = neurons
  whose top-1 concept it is and ``n_interpretable`` = those of them that are interpretable.
* **changes**: consecutive checkpoints are consecutive epochs among those dissected.
  A change is a neuron live at both epochs whose top-1 concept differs; one row per
  change, with both confidences and ``confident`` = both labels confident (null when a
  confidence is unknown and the other label is not uncertain).
* **stability**: per layer and consecutive pair, ``n_kept`` of the ``n_neurons`` live at
  both epochs keep their top-1 concept; the same split by the confidence of the label at
  ``epoch_from`` (``n_confident``, ``n_confident_kept``, ``share_confident_kept``, and
  ``n_uncertain``...); layer ``all`` pools the layers.
* **retention** (the paper's Fig. 5b): at the reference epoch (default: the first),
  rank a layer's live neurons by best score, highest first, ties broken by lower neuron
  id; for x in 5, 10, ..., 100 % take the top ``ceil(x/100 * n)`` neurons and report the
  share whose top-1 concept at each *later* epoch equals their reference concept (a
  neuron missing or dead at that epoch counts as not kept), overall and among the
  selected neurons whose reference label is confident (and uncertain). Layer ``all``
  pools the per-layer selections: sum of kept / sum of selected.
* **diversity**: per (epoch, layer), over the ``n_live`` live neurons' top-1 concepts:
  the number of distinct concepts, the Shannon entropy of their distribution in **bits**,
  the number of distinct top-1 concepts among interpretable neurons, and the mean
  pairwise cosine distance ``1 - cos(u_i, u_j)`` of the layer's neuron embeddings (zero
  vectors left out; null without the embedding or with fewer than two neurons).
* **anchor_neighbors**: per (anchor, epoch), the ``k`` (default 10) neurons of all
  layers nearest to the anchor by the embedding's neuron->anchor distance, ties by
  (layer, neuron); **anchor_distance**: per (anchor, epoch, layer), the mean distance
  of the k nearest neurons of that layer, and layer ``all`` over all layers.

:func:`stats_run` does the I/O: it reads ``OUT``, computes every table and writes them
as one generation of ``OUT/stats`` (:func:`store.new_generation`) whose record holds
the hashes of the dissect tables and the embed generation it read, and the options;
:func:`read_fresh_stats` returns the tables only while all of that still matches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, store
from .errors import ConceptmonError
from .registry import Registry, RegistryError

ALL_LAYERS = "all"
"""Layer name of rows that pool every layer."""
RETENTION_PERCENTS = tuple(range(5, 101, 5))
DEFAULT_ANCHOR_K = 10
DEFAULT_TRUST_LEVEL = 0.9
SUMMARY_EPOCHS = 8
"""At most this many epochs in the text summary's per-epoch grid (the tables hold all)."""

_I, _F, _S, _B = pa.int64(), pa.float64(), pa.string(), pa.bool_()

NO_CONFIDENCE = "the dissect tables hold no bootstrap confidence: trust.replicates 0, or a detector that does not resample"
"""Why a run's label confidence is unknown, in the words every output uses."""

# Confidence state of a label: confident, uncertain, or unknown (bootstrap off, dead, missing).
CONFIDENT, UNCERTAIN, UNKNOWN = 1, 0, -1


class StatsError(ConceptmonError):
    """Statistics asked for with arguments the results cannot satisfy."""


# ----------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Comparison:
    """How ``compare`` puts a statistic of two runs side by side.

    Rows join on ``keys``; each of ``values`` becomes ``<value>_<a>``, ``<value>_<b>``,
    ``<value>_diff``. ``shares`` names the counts that grow with a layer's width, each
    with the share to read instead (or None): where the runs' layer widths differ, those
    counts' differences are left blank and the row's ``basis`` says "shares".
    """

    keys: tuple[str, ...]
    values: tuple[str, ...]
    shares: Mapping[str, str | None] = field(default_factory=dict)
    finish: Callable[[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[str, str]], pd.DataFrame] | None = None
    """Adds columns to the joined table: (joined, table a, table b, labels) -> joined."""


@dataclass(frozen=True)
class SummaryContext:
    """What every statistic's summary lines may refer to."""

    epochs: list[int]
    shown: list[int]
    last: int
    trust_level: float
    confidence_known: bool


@dataclass(frozen=True)
class Statistic:
    """One statistic: its table's name and schema, how to compute, compare and summarise it.

    ``compute`` returns the table, or None when its inputs are missing (e.g. anchors
    without an embedding); ``needs`` then names what is missing, for the notice.
    ``summary`` returns the lines the text summary shows (all tables are passed, keyed
    by name, so a statistic may refer to another's table).
    """

    name: str
    title: str
    schema: pa.Schema
    compute: Callable[["StatsInputs"], pd.DataFrame | None]
    compare: Comparison | None = None
    summary: Callable[[dict[str, pd.DataFrame], SummaryContext], list[str]] | None = None
    needs: str | None = None
    description: str = ""


def _check_statistic(name: str, obj) -> None:
    if not isinstance(obj, Statistic):
        raise RegistryError(f"stats: {name!r} is a {type(obj).__name__}, not a conceptmon.stats.Statistic")
    if obj.name != name:
        raise RegistryError(f"stats: statistic registered as {name!r} but named {obj.name!r}")
    if obj.compare is not None:
        columns = set(obj.schema.names)
        unknown = [c for c in (*obj.compare.keys, *obj.compare.values, *obj.compare.shares,
                               *(s for s in obj.compare.shares.values() if s)) if c not in columns]
        if unknown:
            raise RegistryError(f"stats: statistic {name!r} compares columns {unknown} that its schema lacks")


BUILTIN_STATISTICS = {
    name: f"conceptmon.stats:{name.upper()}"
    for name in ("interpretable", "categories", "concepts", "changes", "stability", "retention", "diversity",
                 "anchor_neighbors", "anchor_distance")
}
"""The built-in statistics in the order they are computed, written and printed."""

STATISTICS: Registry[Statistic] = Registry(
    "statistic", group="conceptmon.statistics", field="stats", builtins=BUILTIN_STATISTICS,
    check=_check_statistic, allow_specs=False,
)


def statistics() -> list[Statistic]:
    """Every statistic, built-ins first in their order, then registered ones by name."""
    return [obj for _, obj in STATISTICS.items()]


def statistic_names() -> list[str]:
    return STATISTICS.names()


def schema_of(name: str) -> pa.Schema:
    return STATISTICS.get(name).schema


def __getattr__(name):
    if name == "TABLES":  # what 0.1 called the table list; now derived from the registry
        return tuple(statistic_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- inputs


@dataclass
class StatsInputs:
    """Everything a statistic may read; embedding inputs are None when absent.

    ``neurons``: EMBED_NEURONS rows without the embedding column, ``vectors`` their
    embeddings (N, d); ``distances``: NEURON_ANCHOR_DISTANCE rows (None without anchors).
    ``lineage``: the hashes of what was read (recorded by :func:`stats_run`).
    """

    dissect: pd.DataFrame
    categories: list[str] = field(default_factory=list)
    neurons: pd.DataFrame | None = None
    vectors: np.ndarray | None = None
    distances: pd.DataFrame | None = None
    reference: int | None = None
    anchor_k: int = DEFAULT_ANCHOR_K
    trust_level: float = DEFAULT_TRUST_LEVEL
    manifest: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    """What is absent, by kind ("embedding", "anchors"), with the command that adds it."""

    @cached_property
    def first(self) -> pd.DataFrame:
        """The :func:`top1` table, computed once for every statistic."""
        return top1(self.dissect, self.trust_level)


# ----------------------------------------------------------------------------- helpers


def run_trust_level(out: Path) -> float:
    """The ``trust.level`` of the run in ``out`` (the default when its manifest cannot be read)."""
    try:
        return trust_level_of(store.read_manifest(out))
    except store.StoreError:
        return DEFAULT_TRUST_LEVEL


def trust_level_of(manifest: dict) -> float:
    """The run's ``trust.level`` (default 0.9)."""
    level = ((manifest.get("config") or {}).get("trust") or {}).get("level", DEFAULT_TRUST_LEVEL)
    try:
        return float(level)
    except (TypeError, ValueError):
        return DEFAULT_TRUST_LEVEL


def confidence_state(confidence, dead, level: float) -> np.ndarray:
    """CONFIDENT / UNCERTAIN / UNKNOWN per label (dead units and NaN confidences are unknown)."""
    conf = np.asarray(confidence, dtype=np.float64)
    state = np.where(conf >= level, CONFIDENT, UNCERTAIN).astype(np.int8)
    state[np.isnan(conf) | np.asarray(dead, dtype=bool)] = UNKNOWN
    return state


def top1(dissect: pd.DataFrame, trust_level: float = DEFAULT_TRUST_LEVEL) -> pd.DataFrame:
    """One row per (epoch, layer, neuron): top-1 concept, category, best score, flags, and
    the label's confidence ``state`` (see :func:`confidence_state`)."""
    cols = ["epoch", "layer", "neuron", "concept", "category", "score", "interpretable", "dead", "confidence"]
    rows = dissect.loc[dissect["rank"] == 0, [c for c in cols if c in dissect.columns]].copy()
    if "dead" not in rows.columns:
        rows["dead"] = False
    if "confidence" not in rows.columns:
        rows["confidence"] = np.nan
    rows["dead"] = rows["dead"].fillna(False).astype(bool)
    rows["interpretable"] = rows["interpretable"].fillna(False).astype(bool) & ~rows["dead"]
    rows["confidence"] = rows["confidence"].astype(np.float64)
    rows["state"] = confidence_state(rows["confidence"], rows["dead"], trust_level)
    return rows.sort_values(["epoch", "layer", "neuron"], kind="stable").reset_index(drop=True)


def as_top1(table: pd.DataFrame, trust_level: float = DEFAULT_TRUST_LEVEL) -> pd.DataFrame:
    """A :func:`top1` table as it is, or the top-1 table of DISSECT rows (the statistics accept either)."""
    return table if "state" in table.columns else top1(table, trust_level)


def live(first: pd.DataFrame) -> pd.DataFrame:
    """The top-1 rows of units that are not dead (they have a concept)."""
    return first[~first["dead"]]


def epochs_of(table: pd.DataFrame) -> list[int]:
    return sorted(int(e) for e in pd.unique(table["epoch"]))


def nullable_counts(values, known) -> pd.arrays.IntegerArray:
    """Integer counts, null where ``known`` is false (unknown is blank, zero is 0)."""
    counts = pd.array(np.asarray(values, dtype=np.int64), dtype="Int64")
    counts[~np.asarray(known, dtype=bool)] = pd.NA
    return counts


def ratio(numerator, denominator) -> np.ndarray:
    """numerator / denominator as float, NaN where the denominator is 0 or a value is null."""
    num = pd.array(numerator, dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    den = pd.array(denominator, dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


@dataclass
class LabelMatrix:
    """Top-1 labels as (neurons x epochs) matrices; code -1 where a neuron is missing or dead."""

    layers: np.ndarray
    neurons: np.ndarray
    epochs: list[int]
    codes: np.ndarray
    names: np.ndarray
    scores: np.ndarray
    confidence: np.ndarray
    states: np.ndarray


def label_matrix(first: pd.DataFrame) -> LabelMatrix:
    alive = ~first["dead"].to_numpy(bool)
    codes = np.full(len(first), -1, dtype=np.int64)
    live_codes, names = pd.factorize(first.loc[alive, "concept"], sort=True)
    codes[alive] = live_codes
    frame = first[["layer", "neuron", "epoch", "score", "confidence", "state"]].assign(code=codes)
    wide = frame.pivot(index=["layer", "neuron"], columns="epoch", values=["code", "score", "confidence", "state"])
    epochs = sorted(int(e) for e in pd.unique(first["epoch"]))

    def block(name, fill, dtype):
        return wide[name].reindex(columns=epochs).fillna(fill).to_numpy(dtype=dtype)

    return LabelMatrix(
        layers=wide.index.get_level_values("layer").to_numpy(dtype=object),
        neurons=wide.index.get_level_values("neuron").to_numpy(dtype=np.int64),
        epochs=epochs,
        codes=block("code", -1, np.int64),
        names=np.asarray(names, dtype=object),
        scores=block("score", np.nan, np.float64),
        confidence=block("confidence", np.nan, np.float64),
        states=block("state", UNKNOWN, np.int8),
    )


def _empty(schema: pa.Schema) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


# ----------------------------------------------------------------------------- statistics


def interpretable_counts(first: pd.DataFrame) -> pd.DataFrame:
    """Per (epoch, layer): neurons, dead units, interpretable ones and their confidence split."""
    first = as_top1(first)
    frame = first.assign(
        confident=first["interpretable"] & (first["state"] == CONFIDENT),
        uncertain=first["interpretable"] & (first["state"] == UNCERTAIN),
        known=~first["dead"] & (first["state"] != UNKNOWN),
    )
    table = frame.groupby(["epoch", "layer"], sort=True).agg(
        n_neurons=("neuron", "size"), n_dead=("dead", "sum"), n_interpretable=("interpretable", "sum"),
        n_confident=("confident", "sum"), n_uncertain=("uncertain", "sum"), known=("known", "any"),
    ).reset_index()
    for column in ("epoch", "n_neurons", "n_dead", "n_interpretable"):
        table[column] = table[column].astype(np.int64)
    table["share_dead"] = table["n_dead"] / table["n_neurons"]
    table["share_interpretable"] = table["n_interpretable"] / table["n_neurons"]
    table["n_confident"] = nullable_counts(table["n_confident"], table["known"])
    table["n_uncertain"] = nullable_counts(table["n_uncertain"], table["known"])
    table["share_confident"] = ratio(table["n_confident"], table["n_neurons"])
    return table[INTERPRETABLE_SCHEMA.names]


def category_counts(first: pd.DataFrame, categories: Iterable[str] | None = None) -> pd.DataFrame:
    """Interpretable neurons per (epoch, layer, category of their top-1 concept).

    ``categories`` (e.g. the concept set's) are all listed, with zeros; categories that
    occur in the table but not in ``categories`` are added after them. Dead units have
    no category and are left out.
    """
    first = as_top1(first)
    alive = live(first)
    seen = sorted(c for c in pd.unique(alive["category"]) if c is not None and not pd.isna(c))
    order = list(dict.fromkeys([*(categories or []), *seen]))
    layer_totals = first.assign(known=~first["dead"] & (first["state"] != UNKNOWN)).groupby(
        ["epoch", "layer"], sort=True).agg(n_neurons=("neuron", "size"), n_layer_interpretable=("interpretable", "sum"),
                                           known=("known", "any"))
    interpretable = alive[alive["interpretable"]].assign(confident=lambda t: t["state"] == CONFIDENT)
    counts = interpretable.groupby(["epoch", "layer", "category"]).agg(
        n_interpretable=("neuron", "size"), n_confident=("confident", "sum"))
    grid = pd.MultiIndex.from_tuples([(e, l, c) for (e, l) in layer_totals.index for c in order],
                                     names=["epoch", "layer", "category"])
    table = counts.reindex(grid, fill_value=0).reset_index().join(layer_totals, on=["epoch", "layer"])
    table["epoch"] = table["epoch"].astype(np.int64)
    table["n_interpretable"] = table["n_interpretable"].astype(np.int64)
    denominator = table["n_layer_interpretable"].where(table["n_layer_interpretable"] > 0)
    table["share_of_interpretable"] = (table["n_interpretable"] / denominator).fillna(0.0)
    table["share_of_neurons"] = table["n_interpretable"] / table["n_neurons"]
    table["n_confident"] = nullable_counts(table["n_confident"], table["known"])
    return table[CATEGORIES_SCHEMA.names]


def concept_counts(first: pd.DataFrame) -> pd.DataFrame:
    """Live neurons per top-1 concept per (epoch, layer), all and interpretable ones.

    Sorted by epoch, layer, then most interpretable neurons first (concept name breaks ties).
    """
    first = as_top1(first)
    alive = live(first)
    table = (
        alive.groupby(["epoch", "layer", "concept", "category"], sort=False, dropna=False)["interpretable"]
        .agg(n_neurons="size", n_interpretable="sum")
        .reset_index()
    )
    for column in ("epoch", "n_neurons", "n_interpretable"):
        table[column] = table[column].astype(np.int64)
    table = table.sort_values(["epoch", "layer", "n_interpretable", "n_neurons", "concept"],
                              ascending=[True, True, False, False, True], kind="stable")
    return table.reset_index(drop=True)[CONCEPTS_SCHEMA.names]


def concept_changes(first: pd.DataFrame) -> pd.DataFrame:
    """One row per top-1 concept change of a live neuron between consecutive checkpoints."""
    first = as_top1(first)
    if len(epochs_of(first)) < 2:
        return _empty(CHANGES_SCHEMA)
    m = label_matrix(first)
    before, after = m.codes[:, :-1], m.codes[:, 1:]
    rows, pairs = np.nonzero((before >= 0) & (after >= 0) & (before != after))
    epochs = np.asarray(m.epochs, dtype=np.int64)
    state_from, state_to = m.states[rows, pairs], m.states[rows, pairs + 1]
    confident = pd.array(np.zeros(len(rows), dtype=bool), dtype="boolean")
    confident[(state_from == CONFIDENT) & (state_to == CONFIDENT)] = True
    # unknown unless one label is known to be uncertain
    confident[((state_from == UNKNOWN) | (state_to == UNKNOWN)) & (state_from != UNCERTAIN)
              & (state_to != UNCERTAIN)] = pd.NA
    table = pd.DataFrame({
        "layer": m.layers[rows], "neuron": m.neurons[rows],
        "epoch_from": epochs[pairs], "epoch_to": epochs[pairs + 1],
        "concept_from": m.names[before[rows, pairs]], "concept_to": m.names[after[rows, pairs]],
        "score_from": m.scores[rows, pairs], "score_to": m.scores[rows, pairs + 1],
        "confidence_from": m.confidence[rows, pairs], "confidence_to": m.confidence[rows, pairs + 1],
        "confident": confident,
    })
    return table.sort_values(["layer", "neuron", "epoch_from"], kind="stable").reset_index(drop=True)


def _kept_split(present, kept, states) -> dict:
    """Counts of neurons present / kept, overall and by the confidence state of their label."""
    known = (present & (states != UNKNOWN)).any(axis=0)
    out = {"n_neurons": present.sum(axis=0), "n_kept": kept.sum(axis=0)}
    for name, state in (("confident", CONFIDENT), ("uncertain", UNCERTAIN)):
        out[f"n_{name}"] = nullable_counts((present & (states == state)).sum(axis=0), known)
        out[f"n_{name}_kept"] = nullable_counts((kept & (states == state)).sum(axis=0), known)
    return out


def concept_stability(first: pd.DataFrame) -> pd.DataFrame:
    """Share of live neurons keeping their top-1 concept between consecutive checkpoints.

    Per layer and pooled (layer ``all``), split by the confidence of the earlier label.
    """
    first = as_top1(first)
    if len(epochs_of(first)) < 2:
        return _empty(STABILITY_SCHEMA)
    m = label_matrix(first)
    before, after = m.codes[:, :-1], m.codes[:, 1:]
    present = (before >= 0) & (after >= 0)
    kept = present & (before == after)
    states = m.states[:, :-1]
    frames = []
    for name, rows in [*((l, m.layers == l) for l in sorted(pd.unique(m.layers))), (ALL_LAYERS, slice(None))]:
        counts = _kept_split(present[rows], kept[rows], states[rows])
        frames.append(pd.DataFrame({"layer": name, "epoch_from": m.epochs[:-1], "epoch_to": m.epochs[1:], **counts}))
    table = pd.concat(frames, ignore_index=True)
    return _with_kept_shares(table)[STABILITY_SCHEMA.names]


def _with_kept_shares(table: pd.DataFrame, total: str = "n_neurons") -> pd.DataFrame:
    table["share_kept"] = ratio(table["n_kept"], table[total])
    for name in ("confident", "uncertain"):
        table[f"share_{name}_kept"] = ratio(table[f"n_{name}_kept"], table[f"n_{name}"])
    for column in table.columns:
        if column.startswith("n_") and table[column].dtype != "Int64":
            table[column] = table[column].astype(np.int64)
    return table


def retention(first: pd.DataFrame, reference: int | None = None,
              percents: Iterable[int] = RETENTION_PERCENTS) -> pd.DataFrame:
    """Share of the reference's top-x % most interpretable neurons that keep their concept.

    See the module docstring for the exact selection rule; one row per
    (layer or ``all``, later epoch, percent).
    """
    first = as_top1(first)
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
        return _empty(RETENTION_SCHEMA)
    m = label_matrix(first)
    ref_col = m.epochs.index(reference)
    later_cols = [m.epochs.index(e) for e in later]
    pooled = None
    frames = []
    for layer in sorted(pd.unique(m.layers)):
        rows = np.nonzero((m.layers == layer) & (m.codes[:, ref_col] >= 0))[0]
        # Highest best score first; lexsort's last key is primary, so -score, then neuron id.
        order = rows[np.lexsort((m.neurons[rows], -m.scores[rows, ref_col]))]
        n = len(order)
        kept = m.codes[order][:, later_cols] == m.codes[order, ref_col][:, None]  # (n, later)
        state = m.states[order, ref_col]
        # Integer ceil(p * n / 100): float p/100*n can land just above an integer (0.35*20).
        n_selected = np.array([-(-p * n // 100) for p in percents], dtype=np.int64)

        def upto(flags):  # (n, ...) -> how many of the first n_selected rows are flagged
            cum = np.concatenate([np.zeros((1, *flags.shape[1:]), dtype=np.int64), np.cumsum(flags, axis=0)])
            return cum[n_selected]

        counts = {
            "n_selected": n_selected, "n_kept": upto(kept).T,
            "n_confident": upto(state == CONFIDENT), "n_confident_kept": upto(kept & (state == CONFIDENT)[:, None]).T,
            "n_uncertain": upto(state == UNCERTAIN), "n_uncertain_kept": upto(kept & (state == UNCERTAIN)[:, None]).T,
            "n_known": upto(state != UNKNOWN),
        }
        pooled = counts if pooled is None else {k: pooled[k] + v for k, v in counts.items()}
        frames.append(_retention_frame(reference, layer, later, percents, counts))
    frames.append(_retention_frame(reference, ALL_LAYERS, later, percents, pooled))
    return pd.concat(frames, ignore_index=True)[RETENTION_SCHEMA.names]


def _retention_frame(reference, layer, later, percents, counts) -> pd.DataFrame:
    n_later = len(later)

    def per_percent(values):  # (percents,) -> repeated for every later epoch
        return np.tile(np.asarray(values, dtype=np.int64), n_later)

    def per_epoch(values):  # (later, percents) -> flat
        return np.asarray(values, dtype=np.int64).reshape(-1)

    known = per_percent(counts["n_known"]) > 0
    table = pd.DataFrame({
        "reference_epoch": np.int64(reference), "layer": layer,
        "epoch": np.repeat(np.asarray(later, dtype=np.int64), len(percents)),
        "percent": per_percent(percents),
        "n_selected": per_percent(counts["n_selected"]), "n_kept": per_epoch(counts["n_kept"]),
        "n_confident": nullable_counts(per_percent(counts["n_confident"]), known),
        "n_confident_kept": nullable_counts(per_epoch(counts["n_confident_kept"]), known),
        "n_uncertain": nullable_counts(per_percent(counts["n_uncertain"]), known),
        "n_uncertain_kept": nullable_counts(per_epoch(counts["n_uncertain_kept"]), known),
    })
    return _with_kept_shares(table, total="n_selected")


def concept_diversity(first: pd.DataFrame) -> pd.DataFrame:
    """Distinct top-1 concepts and their entropy (bits) per (epoch, layer), over live neurons."""
    first = as_top1(first)
    alive = live(first)
    per_concept = alive.groupby(["epoch", "layer", "concept"], sort=True).size().rename("n").reset_index()
    total = per_concept.groupby(["epoch", "layer"])["n"].transform("sum")
    p = per_concept["n"] / total
    per_concept["plogp"] = -p * np.log2(p)
    table = per_concept.groupby(["epoch", "layer"], sort=True).agg(
        n_live=("n", "sum"), n_distinct_concepts=("concept", "size"), entropy_bits=("plogp", "sum")
    )
    # Every (epoch, layer) appears, even one whose units are all dead.
    everything = first.groupby(["epoch", "layer"], sort=True).size().index
    table = table.reindex(everything)
    table["n_live"] = table["n_live"].fillna(0).astype(np.int64)
    table["n_distinct_concepts"] = table["n_distinct_concepts"].fillna(0).astype(np.int64)
    interpretable = alive[alive["interpretable"]].groupby(["epoch", "layer"])["concept"].nunique()
    table["n_distinct_interpretable"] = interpretable.reindex(table.index, fill_value=0).astype(np.int64)
    table = table.reset_index()
    table["epoch"] = table["epoch"].astype(np.int64)
    # A single concept has entropy 0; -0.0 from the sum would print oddly.
    table["entropy_bits"] = table["entropy_bits"].abs()
    table["mean_cosine_distance"] = np.nan
    return table


def embedding_spread(neurons: pd.DataFrame, vectors: np.ndarray | None = None) -> pd.DataFrame:
    """Mean pairwise cosine distance of neuron embeddings per (epoch, layer).

    ``vectors`` (one row per row of ``neurons``) saves stacking the ``embedding`` column.
    With unit vectors, the sum over ordered pairs i != j of cos(u_i, u_j) is
    |sum u|^2 - n, so the mean over pairs needs one sum per group, not n^2 products.
    """
    columns = ["epoch", "layer", "mean_cosine_distance"]
    if neurons.empty:
        return pd.DataFrame({"epoch": pd.Series(dtype=np.int64), "layer": pd.Series(dtype=object),
                             "mean_cosine_distance": pd.Series(dtype=np.float64)})
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


def diversity_with_spread(inputs: "StatsInputs") -> pd.DataFrame:
    table = concept_diversity(inputs.first)
    if inputs.neurons is not None:
        spread = embedding_spread(inputs.neurons, inputs.vectors)
        table = table.drop(columns="mean_cosine_distance").merge(spread, on=["epoch", "layer"], how="left")
    return table[DIVERSITY_SCHEMA.names]


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
    return nearest[ANCHOR_NEIGHBORS_SCHEMA.names].sort_values(["anchor", "epoch", "rank"]).reset_index(drop=True)


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
    return table[ANCHOR_DISTANCE_SCHEMA.names]


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise StatsError(f"--k {k}: the number of nearest neurons per anchor must be at least 1")


def format_epochs(epochs: list[int]) -> str:
    if len(epochs) > 12:
        return ", ".join(map(str, epochs[:5])) + f", ... ({len(epochs)} epochs), " + str(epochs[-1])
    return ", ".join(map(str, epochs))


# ----------------------------------------------------------------------------- summary lines


def indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _count(value) -> str:
    return "" if value is None or pd.isna(value) else str(int(value))


def _percent(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.1%}"


def _unknown_confidence_line(ctx: SummaryContext) -> str:
    return (f"label confidence: unknown ({NO_CONFIDENCE}), so no label or change is called confident")


def summarize_interpretable(tables, ctx: SummaryContext) -> list[str]:
    counts = tables["interpretable"]
    cells = counts[counts["epoch"].isin(ctx.shown)].assign(
        cell=lambda t: t["n_interpretable"].astype(str) + "/" + t["n_neurons"].astype(str))
    grid = cells.pivot(index="layer", columns="epoch", values="cell")
    grid.columns = [f"ep {c}" for c in grid.columns]
    lines = ["interpretable neurons per layer (interpretable/all)", indent(grid.to_string())]
    at = counts[counts["epoch"] == ctx.last]
    if ctx.confidence_known:
        text = ", ".join(f"{r.layer} {_count(r.n_confident)} confident / {_count(r.n_uncertain)} uncertain"
                         for r in at.itertuples())
        lines.append(f"  at epoch {ctx.last}, labels with confidence >= {ctx.trust_level:g}: {text}")
    else:
        lines.append("  " + _unknown_confidence_line(ctx))
    if counts["n_dead"].sum() > 0:
        dead = ", ".join(f"{r.layer} {r.n_dead}/{r.n_neurons}" for r in at.itertuples())
        worst = counts.loc[counts["n_dead"].idxmax()]
        lines.append(f"  dead units (no activation to label) at epoch {ctx.last}: {dead}; "
                     f"most: {worst['layer']} at epoch {int(worst['epoch'])} ({int(worst['n_dead'])})")
    else:
        lines.append("  dead units (no activation to label): none")
    return lines


def summarize_concepts(tables, ctx: SummaryContext, top: int = 5) -> list[str]:
    concepts = tables["concepts"]
    lines = [f"top concepts at epoch {ctx.last} (interpretable neurons)"]
    for layer, group in concepts[concepts["epoch"] == ctx.last].groupby("layer", sort=True):
        best = group[group["n_interpretable"] > 0].head(top)
        text = ", ".join(f"{r.concept} {r.n_interpretable}" for r in best.itertuples()) or "none"
        lines.append(f"  {layer}: {text}")
    return lines


def summarize_categories(tables, ctx: SummaryContext) -> list[str]:
    at_last = tables["categories"][tables["categories"]["epoch"] == ctx.last]
    by_category = at_last.pivot(index="layer", columns="category", values="n_interpretable")
    if by_category.empty:
        return []
    by_category = by_category.loc[:, by_category.sum(axis=0) > 0]
    if not by_category.shape[1]:
        return [f"interpretable neurons per category at epoch {ctx.last}: none"]
    return [f"interpretable neurons per category at epoch {ctx.last}", indent(by_category.to_string())]


def summarize_changes(tables, ctx: SummaryContext, n_movers: int = 3) -> list[str]:
    stability, changes = tables["stability"], tables["changes"]
    if stability.empty:
        return ["concept changes: need at least two dissected epochs"]
    n_confident = int(changes["confident"].fillna(False).sum())
    head = f"concept changes: {len(changes)} over {len(ctx.epochs) - 1} checkpoint transitions"
    if ctx.confidence_known:
        head += f", {n_confident} confident (both labels' confidence >= {ctx.trust_level:g})"
    lines = [head]
    mean = stability.groupby("layer", sort=False)[["share_kept", "share_confident_kept", "share_uncertain_kept"]].mean()
    def split(r) -> str:
        parts = [f"{name} {_percent(v)}" for name, v in (("confident", r.share_confident_kept),
                                                          ("uncertain", r.share_uncertain_kept)) if pd.notna(v)]
        return f" ({', '.join(parts)})" if ctx.confidence_known and parts else ""

    kept = ", ".join(f"{layer} {_percent(r.share_kept)}{split(r)}" for layer, r in mean.iterrows())
    lines.append(f"  mean share keeping their top-1 concept between consecutive checkpoints: {kept}")
    movers = most_changing(changes, n_movers, confident_only=ctx.confidence_known)
    if len(movers):
        kind = "confident changes" if ctx.confidence_known else "changes; label confidence unknown"
        lines.append(f"  most-changing neurons ({kind}):")
    elif ctx.confidence_known and len(changes):
        lines.append("  no confident change: every change involves an uncertain label")
    for row in movers.itertuples():
        lines.append(f"    {row.layer} neuron {row.neuron} ({row.n_changes} change{'s' if row.n_changes != 1 else ''}):"
                     f" {row.trail}")
    return lines


def summarize_retention(tables, ctx: SummaryContext) -> list[str]:
    retained = tables["retention"]
    if retained.empty:
        return []
    reference = int(retained["reference_epoch"].iloc[0])
    at = retained[(retained["epoch"] == ctx.last) & retained["percent"].isin([10, 50, 100])]
    layers = [*(l for l in pd.unique(at["layer"]) if l != ALL_LAYERS), ALL_LAYERS]
    lines = [f"retention: share of the reference's top-x % neurons (epoch {reference}) keeping their concept "
             f"at epoch {ctx.last}"]
    columns = {"share_kept": "all"}
    if ctx.confidence_known:
        columns["share_confident_kept"] = "confident"
    parts = []
    for column, label in columns.items():
        grid = at.pivot(index="layer", columns="percent", values=column).reindex(layers).map(_percent)
        grid.columns = [f"top {p}% ({label})" for p in grid.columns]
        parts.append(grid)
    lines.append(indent(pd.concat(parts, axis=1).to_string()))
    if ctx.confidence_known:
        lines.append(f"  (confident: among the selected neurons whose epoch-{reference} label has confidence "
                     f">= {ctx.trust_level:g}; blank where none is)")
    return lines


def summarize_diversity(tables, ctx: SummaryContext) -> list[str]:
    at = tables["diversity"][tables["diversity"]["epoch"] == ctx.last].set_index("layer")
    cols = {"n_live": "live neurons", "n_distinct_concepts": "distinct concepts", "entropy_bits": "entropy (bits)",
            "mean_cosine_distance": "mean cos distance"}
    shown = [c for c in cols if c != "mean_cosine_distance" or at[c].notna().any()]
    view = at[shown].rename(columns=cols)
    return [f"diversity at epoch {ctx.last}", indent(view.to_string(float_format=lambda v: f"{v:.3f}"))]


def summarize_anchor_neighbors(tables, ctx: SummaryContext) -> list[str]:
    near = tables["anchor_neighbors"]
    if near.empty:
        return []
    latest = near[near["epoch"] == near.groupby("anchor")["epoch"].transform("max")]
    lines = ["nearest neurons per anchor (latest embedded epoch)"]
    for anchor, group in latest.groupby("anchor", sort=True):
        text = ", ".join(f"{r.layer}/{r.neuron} ({r.concept}) {r.distance:.3f}" for r in group.head(5).itertuples())
        lines.append(f"  {anchor} @ epoch {int(group['epoch'].iloc[0])}: {text}")
    return lines


def most_changing(changes: pd.DataFrame, n: int = 12, *, confident_only: bool = False) -> pd.DataFrame:
    """The ``n`` neurons with the most top-1 changes (ties: layer, neuron), with their trail.

    ``confident_only`` counts only changes between two confident labels; the trail still
    shows every change of those neurons, uncertain ones marked ``?``.
    """
    columns = ["layer", "neuron", "n_changes", "trail"]
    counted = changes[changes["confident"].fillna(False).astype(bool)] if confident_only else changes
    if counted.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    counts = counted.groupby(["layer", "neuron"], sort=True).size().rename("n_changes").reset_index()
    counts = counts.sort_values(["n_changes", "layer", "neuron"], ascending=[False, True, True], kind="stable").head(n)
    trails = []
    for layer, neuron in zip(counts["layer"], counts["neuron"]):
        steps = changes[(changes["layer"] == layer) & (changes["neuron"] == neuron)]
        parts = [f"{steps['concept_from'].iloc[0]} (ep {steps['epoch_from'].iloc[0]})"]
        for c, e, ok in zip(steps["concept_to"], steps["epoch_to"], steps["confident"]):
            mark = "" if not confident_only or (ok is not pd.NA and bool(ok)) else "?"
            parts.append(f"{c}{mark} (ep {e})")
        trails.append(" → ".join(parts))
    return counts.assign(trail=trails).reset_index(drop=True)[columns]


# ----------------------------------------------------------------------------- the built-ins

INTERPRETABLE_SCHEMA = pa.schema([
    ("epoch", _I), ("layer", _S), ("n_neurons", _I), ("n_dead", _I), ("share_dead", _F), ("n_interpretable", _I),
    ("share_interpretable", _F), ("n_confident", _I), ("n_uncertain", _I), ("share_confident", _F)])
CATEGORIES_SCHEMA = pa.schema([
    ("epoch", _I), ("layer", _S), ("category", _S), ("n_interpretable", _I), ("share_of_interpretable", _F),
    ("share_of_neurons", _F), ("n_confident", _I)])
CONCEPTS_SCHEMA = pa.schema([
    ("epoch", _I), ("layer", _S), ("concept", _S), ("category", _S), ("n_neurons", _I), ("n_interpretable", _I)])
CHANGES_SCHEMA = pa.schema([
    ("layer", _S), ("neuron", _I), ("epoch_from", _I), ("epoch_to", _I), ("concept_from", _S), ("concept_to", _S),
    ("score_from", _F), ("score_to", _F), ("confidence_from", _F), ("confidence_to", _F), ("confident", _B)])
_KEPT = [("n_confident", _I), ("n_confident_kept", _I), ("share_confident_kept", _F),
         ("n_uncertain", _I), ("n_uncertain_kept", _I), ("share_uncertain_kept", _F)]
STABILITY_SCHEMA = pa.schema([
    ("layer", _S), ("epoch_from", _I), ("epoch_to", _I), ("n_neurons", _I), ("n_kept", _I), ("share_kept", _F), *_KEPT])
RETENTION_SCHEMA = pa.schema([
    ("reference_epoch", _I), ("layer", _S), ("epoch", _I), ("percent", _I), ("n_selected", _I), ("n_kept", _I),
    ("share_kept", _F), *_KEPT])
DIVERSITY_SCHEMA = pa.schema([
    ("epoch", _I), ("layer", _S), ("n_live", _I), ("n_distinct_concepts", _I), ("entropy_bits", _F),
    ("n_distinct_interpretable", _I), ("mean_cosine_distance", _F)])
ANCHOR_NEIGHBORS_SCHEMA = pa.schema([
    ("anchor", _S), ("epoch", _I), ("rank", _I), ("layer", _S), ("neuron", _I), ("concept", _S), ("distance", _F)])
ANCHOR_DISTANCE_SCHEMA = pa.schema([
    ("anchor", _S), ("epoch", _I), ("layer", _S), ("k", _I), ("n_neighbors", _I), ("mean_distance", _F)])

_NEEDS_EMBEDDING = "embedding"
_NEEDS_ANCHORS = "anchors"

INTERPRETABLE = Statistic(
    name="interpretable", title="Interpretable neurons", schema=INTERPRETABLE_SCHEMA,
    compute=lambda inputs: interpretable_counts(inputs.first),
    compare=Comparison(
        keys=("layer", "epoch"),
        values=("n_neurons", "n_dead", "n_interpretable", "share_interpretable", "n_confident", "share_confident"),
        shares={"n_dead": None, "n_interpretable": "share_interpretable", "n_confident": "share_confident"}),
    summary=summarize_interpretable,
    description="interpretable neurons, dead units and label confidence per (epoch, layer)")
CATEGORIES = Statistic(
    name="categories", title="Categories", schema=CATEGORIES_SCHEMA,
    compute=lambda inputs: category_counts(inputs.first, inputs.categories),
    compare=Comparison(keys=("layer", "epoch", "category"),
                       values=("n_interpretable", "share_of_interpretable", "share_of_neurons"),
                       shares={"n_interpretable": "share_of_neurons"}),
    summary=summarize_categories,
    description="interpretable neurons by category of their top-1 concept")
def concept_presence(joined: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame:
    """Adds each concept's category and which run has interpretable neurons for it:
    both, '<a> only', '<b> only' or neither."""
    la, lb = labels
    in_a = joined[f"n_interpretable_{la}"].fillna(0) > 0
    in_b = joined[f"n_interpretable_{lb}"].fillna(0) > 0
    known = pd.concat([a[["concept", "category"]], b[["concept", "category"]]]).drop_duplicates("concept")
    joined.insert(3, "present", np.select([in_a & in_b, in_a, in_b], ["both", f"{la} only", f"{lb} only"],
                                          default="neither"))
    joined.insert(3, "category", joined["concept"].map(known.set_index("concept")["category"]))
    return joined


CONCEPTS = Statistic(
    name="concepts", title="Concepts", schema=CONCEPTS_SCHEMA,
    compute=lambda inputs: concept_counts(inputs.first),
    compare=Comparison(keys=("layer", "epoch", "concept"), values=("n_interpretable", "n_neurons"),
                       shares={"n_interpretable": None, "n_neurons": None}, finish=concept_presence),
    summary=summarize_concepts,
    description="neurons per top-1 concept")
CHANGES = Statistic(
    name="changes", title="Concept changes", schema=CHANGES_SCHEMA,
    compute=lambda inputs: concept_changes(inputs.first),
    description="every top-1 change between consecutive checkpoints")
STABILITY = Statistic(
    name="stability", title="Stability", schema=STABILITY_SCHEMA,
    compute=lambda inputs: concept_stability(inputs.first),
    compare=Comparison(keys=("layer", "epoch_from", "epoch_to"),
                       values=("share_kept", "share_confident_kept", "share_uncertain_kept")),
    summary=summarize_changes,
    description="share of neurons keeping their top-1 concept between consecutive checkpoints")
RETENTION = Statistic(
    name="retention", title="Retention", schema=RETENTION_SCHEMA,
    compute=lambda inputs: retention(inputs.first, inputs.reference),
    compare=Comparison(keys=("layer", "epoch", "percent"), values=("share_kept", "share_confident_kept")),
    summary=summarize_retention,
    description="share of the reference epoch's top-x % neurons keeping their concept (Fig. 5b)")
DIVERSITY = Statistic(
    name="diversity", title="Diversity", schema=DIVERSITY_SCHEMA,
    compute=diversity_with_spread,
    compare=Comparison(keys=("layer", "epoch"),
                       values=("n_live", "n_distinct_concepts", "entropy_bits", "mean_cosine_distance"),
                       shares={"n_distinct_concepts": None}),
    summary=summarize_diversity,
    description="distinct top-1 concepts, their entropy, and the spread of the neuron embeddings")
ANCHOR_NEIGHBORS = Statistic(
    name="anchor_neighbors", title="Nearest neurons per anchor", schema=ANCHOR_NEIGHBORS_SCHEMA,
    compute=lambda inputs: (anchor_neighbors(inputs.distances, inputs.first, inputs.anchor_k)
                            if inputs.distances is not None else None),
    summary=summarize_anchor_neighbors, needs=_NEEDS_ANCHORS,
    description="the k neurons nearest to each anchor per epoch")
ANCHOR_DISTANCE = Statistic(
    name="anchor_distance", title="Distance to anchors", schema=ANCHOR_DISTANCE_SCHEMA,
    compute=lambda inputs: (anchor_mean_distance(inputs.distances, inputs.anchor_k)
                            if inputs.distances is not None else None),
    compare=Comparison(keys=("anchor", "layer", "epoch"), values=("mean_distance",)), needs=_NEEDS_ANCHORS,
    description="mean distance of the k nearest neurons to each anchor")


# ----------------------------------------------------------------------------- all at once


def compute_stats(inputs: StatsInputs, log: Callable[[str], None] = lambda m: None) -> dict[str, pd.DataFrame]:
    """Every registered statistic from in-memory inputs; ones whose inputs are missing are left out."""
    if inputs.dissect.empty:
        raise StatsError("no dissection rows to compute statistics from")
    tables = {}
    for statistic in statistics():
        table = statistic.compute(inputs)
        if table is not None:
            tables[statistic.name] = table
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


def embed_lineage(gen: store.Generation | None) -> dict | None:
    """What identifies an embed generation: its name and the hashes of its files."""
    if gen is None:
        return None
    return {"generation": gen.record.get("generation"), "files": dict(gen.record.get("files") or {})}


def current_lineage(out: Path, *, with_embedding: bool = True) -> dict:
    """The hashes stats would record for ``out`` now; raises StaleError when inputs disagree."""
    from .embedding import embed_generation

    dissect = store.dissect_inputs(store.check_dissect_lineage(out))
    return {"dissect": dissect, "embed": embed_lineage(embed_generation(out)) if with_embedding else None}


def load_inputs(out: Path, layers: list[str] | None = None, log: Callable[[str], None] = print, *,
                reference: int | None = None, anchor_k: int = DEFAULT_ANCHOR_K,
                with_embedding: bool = True) -> StatsInputs:
    """Read what the statistics need from ``out``, with the hashes of what was read.

    A stale embedding raises :class:`store.StaleError` (naming the command that refreshes
    it); ``with_embedding=False`` leaves the embedding out on purpose.
    """
    from .embedding import embed_generation

    out = Path(out)
    records = store.check_dissect_lineage(out)
    dissect = store.read_dissect(out, sorted(records), check=False)
    if store.dissect_inputs(store.check_dissect_lineage(out)) != store.dissect_inputs(records):
        raise store.StaleError(f"{store.dissect_dir(out)}: changed while being read (is a dissect running?); "
                               f"run `conceptmon stats` again when it has finished")
    available = sorted(pd.unique(dissect["layer"]))
    dissect = filter_layers(dissect, layers, available, f"{out}/dissect")
    try:
        manifest = store.read_manifest(out)
    except store.StoreError:
        manifest = {}
    categories = list(dict.fromkeys((manifest.get("concepts") or {}).get("categories", []) or []))
    gen = embed_generation(out) if with_embedding else None
    inputs = StatsInputs(dissect=dissect, categories=categories, reference=reference, anchor_k=anchor_k,
                         trust_level=trust_level_of(manifest), manifest=manifest,
                         lineage={"dissect": store.dissect_inputs(records), "embed": embed_lineage(gen)})
    if gen is None:
        inputs.missing[_NEEDS_EMBEDDING] = f"conceptmon embed --out {out}"
        inputs.missing[_NEEDS_ANCHORS] = f"conceptmon embed --out {out} --anchors WORD,..."
        if with_embedding:
            log(f"notice: {store.embed_dir(out)} missing: diversity.mean_cosine_distance and anchor statistics "
                f"left out; run `conceptmon embed --out {out}` to add them")
        return inputs
    inputs.neurons, inputs.vectors = read_neuron_embeddings(gen.path(store.EMBED_FILES["neurons"]), layers)
    distances = store.read_table(gen.path(store.EMBED_FILES["neuron_anchor_distance"]), store.NEURON_ANCHOR_DISTANCE)
    if layers is not None:
        distances = distances[distances["layer"].isin(layers)]
    if distances.empty:
        inputs.missing[_NEEDS_ANCHORS] = f"conceptmon embed --out {out} --anchors WORD,..."
        log(f"notice: no anchors in {store.embed_dir(out)}: anchor statistics omitted; "
            f"run `conceptmon embed --out {out} --anchors WORD,...` to add them")
    else:
        inputs.distances = distances
    return inputs


def options_record(layers, reference, anchor_k, trust_level) -> dict:
    return {"layers": list(layers) if layers else None, "reference": reference, "anchor_k": int(anchor_k),
            "trust_level": float(trust_level)}


def check_fresh_stats(out: Path, *, layers: list[str] | None = None, reference: int | None = None,
                      anchor_k: int = DEFAULT_ANCHOR_K) -> tuple[dict[str, pd.DataFrame] | None, str]:
    """(tables, "") when the current stats generation was computed with these options from
    exactly the dissect tables and embedding in ``out`` now, by the statistics registered
    now, and its files are intact; else (None, why not)."""
    out = Path(out)
    try:
        gen = store.read_generation(out, store.STATS)
        if gen is None:
            return None, f"{store.stats_dir(out)} has no statistics yet"
        if gen.stale_files():
            return None, f"{', '.join(gen.stale_files())} in {gen.folder} changed on disk since written"
        record = gen.record
        manifest = store.read_manifest(out)
        if record.get("options") != options_record(layers, reference, anchor_k, trust_level_of(manifest)):
            return None, "they were computed with other options (--layers, --reference, --k or trust.level)"
        if record.get("statistics") != statistic_names():
            return None, "they were computed by another set of statistics"
        now = current_lineage(out)
        if record.get("inputs") != now:
            what = [k for k in ("dissect", "embed") if (record.get("inputs") or {}).get(k) != now.get(k)]
            return None, f"the {' and '.join('dissect tables' if w == 'dissect' else 'embedding' for w in what)} " \
                         f"changed since they were computed"
        return {name: store.read_table(gen.path(f"{name}.parquet"), schema_of(name))
                for name in record.get("tables", [])}, ""
    except (store.StoreError, RegistryError) as e:
        return None, str(e)


def read_fresh_stats(out: Path, *, layers: list[str] | None = None, reference: int | None = None,
                     anchor_k: int = DEFAULT_ANCHOR_K) -> dict[str, pd.DataFrame] | None:
    """The tables of :func:`check_fresh_stats`, or None when they are missing or stale."""
    return check_fresh_stats(out, layers=layers, reference=reference, anchor_k=anchor_k)[0]


def stats_table_path(out: Path, name: str) -> Path:
    """Where the current stats generation keeps table ``name`` (StoreError when there is none)."""
    gen = store.read_generation(Path(out), store.STATS)
    if gen is None or name not in (gen.record.get("tables") or []):
        raise store.StoreError(f"{store.stats_dir(out)}: no {name} table; run `conceptmon stats --out {out}`")
    return gen.path(f"{name}.parquet")


def _remove_legacy_tables(out: Path) -> None:
    """conceptmon 0.1 wrote tables straight into OUT/stats; once a generation exists they would only mislead."""
    directory = store.stats_dir(out)
    for path in [*directory.glob("*.parquet"), directory / "stats.json"]:
        if path.is_file():
            path.unlink()


def stats_run(
    out: Path,
    *,
    layers: list[str] | None = None,
    reference: int | None = None,
    anchor_k: int = DEFAULT_ANCHOR_K,
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """Compute every statistic for the run in ``out`` and write them as one generation of
    ``OUT/stats`` (all tables become current together, or none do).

    Statistics whose inputs are missing (anchors without an embedding) are left out with
    a notice. The generation's record holds the hashes of the dissect tables and the
    embed generation read, the options and the statistics, for :func:`read_fresh_stats`.
    """
    out = Path(out)
    inputs = load_inputs(out, layers, log, reference=reference, anchor_k=anchor_k)
    tables = compute_stats(inputs)
    names = statistic_names()
    record = {
        "inputs": inputs.lineage,
        "options": options_record(layers, reference, anchor_k, inputs.trust_level),
        "statistics": names,
        "tables": [n for n in names if n in tables],
        "omitted": {n: inputs.missing.get(STATISTICS.get(n).needs or "", "inputs missing")
                    for n in names if n not in tables},
        "conceptmon": __version__,
    }
    with store.new_generation(out, store.STATS, record) as gen:
        for name in record["tables"]:
            gen.write_table(f"{name}.parquet", tables[name], schema_of(name))
    _remove_legacy_tables(out)
    log(f"wrote {len(tables)} tables to {gen.folder}")
    return tables


# ----------------------------------------------------------------------------- presentation


def table_records(table: pd.DataFrame) -> list[dict]:
    """Rows as plain Python values for JSON: numpy scalars unwrapped, NaN, infinities and nulls as None."""
    records = []
    columns = list(table.columns)
    for row in table.itertuples(index=False, name=None):
        records.append({c: _plain(v) for c, v in zip(columns, row)})
    return records


def _plain(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None  # JSON has no NaN or infinity
    if not isinstance(value, (str, list, np.ndarray)) and pd.isna(value):
        return None
    return value


def spread_epochs(epochs: list[int], limit: int = SUMMARY_EPOCHS) -> list[int]:
    """At most ``limit`` epochs, evenly spaced, always with the first and the last."""
    if len(epochs) <= limit:
        return list(epochs)
    picks = np.unique(np.round(np.linspace(0, len(epochs) - 1, limit)).astype(int))
    return [epochs[i] for i in picks]


def describe_shown_epochs(epochs: list[int], shown: list[int]) -> str:
    """'epochs: 1, 2, 5 (all 3)' or which ones are shown and how they were chosen."""
    if len(shown) == len(epochs):
        return f"epochs: {', '.join(map(str, epochs))} (all {len(epochs)})"
    return (f"epochs shown: {', '.join(map(str, shown))} ({len(shown)} of {len(epochs)}: the first, the last and "
            f"evenly spaced between; every epoch is in the tables, e.g. `--format csv --table interpretable`)")


def summary_context(tables: dict[str, pd.DataFrame], trust_level: float, max_epochs: int = SUMMARY_EPOCHS):
    counts = tables["interpretable"]
    epochs = epochs_of(counts)
    known = counts["n_confident"].notna().any()
    return SummaryContext(epochs=epochs, shown=spread_epochs(epochs, max_epochs), last=epochs[-1],
                          trust_level=trust_level, confidence_known=bool(known))


def format_summary(tables: dict[str, pd.DataFrame], trust_level: float = DEFAULT_TRUST_LEVEL,
                   max_epochs: int = SUMMARY_EPOCHS) -> str:
    """A compact, readable digest: each statistic's summary lines, in registry order."""
    ctx = summary_context(tables, trust_level, max_epochs)
    blocks = [[describe_shown_epochs(ctx.epochs, ctx.shown)]]
    for statistic in statistics():
        if statistic.summary is not None and statistic.name in tables:
            lines = statistic.summary(tables, ctx)
            if lines:
                blocks.append(lines)
    return "\n\n".join("\n".join(block) for block in blocks).rstrip() + "\n"


__all__ = [
    "ALL_LAYERS", "BUILTIN_STATISTICS", "Comparison", "STATISTICS", "Statistic", "StatsError", "StatsInputs",
    "SummaryContext", "compute_stats", "format_summary", "load_inputs", "read_fresh_stats", "stats_run",
    "stats_table_path", "statistic_names", "statistics", "table_records", "top1",
]
