"""Two runs side by side (e.g. standard vs PGD-trained): the statistics tables joined,
with differences, after checking that the runs are comparable at all.

Runs are comparable when they used the same detector (name and settings, threshold
included), the same concept set (fingerprint) and the same text encoder; otherwise
:func:`compare_runs` raises :class:`CompareError` naming the first difference.

Every side-by-side table has the key columns of its statistic, then for each value
``<value>_<label a>``, ``<value>_<label b>`` and ``<value>_diff`` = b - a. Rows are the
union of both runs' keys (an epoch or layer only one run has leaves the other empty).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import stats, store
from .errors import ConceptmonError


class CompareError(ConceptmonError):
    """Two runs that cannot be compared, or labels that cannot name them."""


# (keys, values) per statistics table; values are compared, keys join the rows.
SIDE_BY_SIDE: dict[str, tuple[list[str], list[str]]] = {
    "interpretable": (["layer", "epoch"], ["n_neurons", "n_interpretable", "share_interpretable"]),
    "categories": (["layer", "epoch", "category"], ["n_interpretable", "share_of_interpretable"]),
    "concepts": (["layer", "epoch", "concept"], ["n_interpretable", "n_neurons"]),
    "stability": (["layer", "epoch_from", "epoch_to"], ["share_kept"]),
    "retention": (["layer", "epoch", "percent"], ["share_kept"]),
    "diversity": (["layer", "epoch"], ["n_distinct_concepts", "entropy_bits", "mean_cosine_distance"]),
    "anchor_distance": (["anchor", "layer", "epoch"], ["mean_distance"]),
}

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_labels(labels) -> tuple[str, str]:
    labels = tuple(str(l).strip() for l in labels)
    if len(labels) != 2:
        raise CompareError(f"--labels: expected two comma-separated names (e.g. standard,robust), got {len(labels)}")
    bad = [l for l in labels if not _LABEL.match(l) or l == "diff"]
    if bad:
        raise CompareError(f"--labels {bad[0]!r}: use letters, digits, _ . - (not 'diff'), e.g. standard,robust")
    if labels[0] == labels[1]:
        raise CompareError(f"--labels: the two names must differ, got {labels[0]!r} twice")
    return labels


def text_encoder(out: Path, manifest: dict) -> str | None:
    """The text encoder a run's embedding used: its embed record, else the config's."""
    gen = store.read_generation(Path(out), store.EMBED)
    if gen is not None and isinstance(gen.record.get("encoder"), str):
        return gen.record["encoder"]
    return ((manifest.get("config") or {}).get("embedding") or {}).get("encoder")


def comparability_problem(manifest_a: dict, manifest_b: dict, labels: tuple[str, str],
                          encoders: tuple[str | None, str | None] = (None, None)) -> str | None:
    """The first reason two runs cannot be compared, in one line; None when they can."""
    la, lb = labels
    det_a, det_b = manifest_a.get("detector") or {}, manifest_b.get("detector") or {}
    for key in ["name", *sorted((set(det_a) | set(det_b)) - {"name"})]:
        if det_a.get(key) != det_b.get(key):
            return (f"runs used different detectors: detector.{key} is {det_a.get(key)!r} in {la} "
                    f"but {det_b.get(key)!r} in {lb}")
    con_a, con_b = manifest_a.get("concepts") or {}, manifest_b.get("concepts") or {}
    if con_a.get("fingerprint") != con_b.get("fingerprint"):
        def describe(c):
            return f"{c.get('source') or '?'} ({len(c.get('names') or [])} concepts, fingerprint {c.get('fingerprint')})"
        return f"runs used different concept sets: {la} {describe(con_a)}, {lb} {describe(con_b)}"
    if encoders[0] != encoders[1]:
        return f"runs used different text encoders: {encoders[0]!r} in {la} but {encoders[1]!r} in {lb}"
    return None


def side_by_side(a: pd.DataFrame, b: pd.DataFrame, keys: list[str], values: list[str],
                 labels: tuple[str, str]) -> pd.DataFrame:
    """Outer join on ``keys``; each value as ``<value>_<a>``, ``<value>_<b>``, ``<value>_diff`` (b - a)."""
    la, lb = labels
    left = a[keys + values].rename(columns={v: f"{v}_{la}" for v in values})
    right = b[keys + values].rename(columns={v: f"{v}_{lb}" for v in values})
    joined = left.merge(right, on=keys, how="outer", sort=False)
    columns = list(keys)
    for v in values:
        joined[f"{v}_diff"] = joined[f"{v}_{lb}"] - joined[f"{v}_{la}"]
        columns += [f"{v}_{la}", f"{v}_{lb}", f"{v}_diff"]
    return joined[columns].sort_values(keys, kind="stable").reset_index(drop=True)


def concept_presence(joined_concepts: pd.DataFrame, labels: tuple[str, str]) -> pd.Series:
    """Which run has interpretable neurons for a concept: both, '<a> only', '<b> only', neither."""
    la, lb = labels
    in_a = joined_concepts[f"n_interpretable_{la}"].fillna(0) > 0
    in_b = joined_concepts[f"n_interpretable_{lb}"].fillna(0) > 0
    return pd.Series(
        np.select([in_a & in_b, in_a, in_b], ["both", f"{la} only", f"{lb} only"], default="neither"),
        index=joined_concepts.index,
    )


def compare_tables(tables_a: dict[str, pd.DataFrame], tables_b: dict[str, pd.DataFrame],
                   labels: tuple[str, str]) -> dict[str, pd.DataFrame]:
    """Side-by-side tables for every statistic both runs have."""
    labels = check_labels(labels)
    result = {}
    for name, (keys, values) in SIDE_BY_SIDE.items():
        if name in tables_a and name in tables_b:
            result[name] = side_by_side(tables_a[name], tables_b[name], keys, values, labels)
    concepts = result["concepts"]
    concepts.insert(3, "present", concept_presence(concepts, labels))
    concepts.insert(3, "category", _categories_of(concepts, tables_a["concepts"], tables_b["concepts"]))
    return result


def _categories_of(joined: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame) -> pd.Series:
    known = pd.concat([a[["concept", "category"]], b[["concept", "category"]]]).drop_duplicates("concept")
    return joined["concept"].map(known.set_index("concept")["category"])


def compare_runs(
    out_a: Path,
    out_b: Path,
    labels: tuple[str, str] = ("a", "b"),
    *,
    layers: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """Compare two output folders; raises CompareError when they are not comparable."""
    labels = check_labels(labels)
    out_a, out_b = Path(out_a), Path(out_b)
    manifest_a, manifest_b = store.read_manifest(out_a), store.read_manifest(out_b)
    problem = comparability_problem(
        manifest_a, manifest_b, labels, (text_encoder(out_a, manifest_a), text_encoder(out_b, manifest_b))
    )
    if problem:
        raise CompareError(f"cannot compare {out_a} and {out_b}: {problem}")
    tables = []
    for out, label in ((out_a, labels[0]), (out_b, labels[1])):
        inputs = stats.load_inputs(out, layers, lambda m, label=label: log(f"{label}: {m}"))
        tables.append(
            stats.compute_stats(inputs["dissect"], categories=inputs["categories"], neurons=inputs["neurons"],
                                vectors=inputs["vectors"], distances=inputs["distances"])
        )
    return compare_tables(tables[0], tables[1], labels)


def format_comparison(result: dict[str, pd.DataFrame], labels: tuple[str, str], top: int = 8) -> str:
    """A compact readable digest: interpretable counts, categories and concepts at the last common epoch."""
    la, lb = labels
    lines: list[str] = []
    counts = result["interpretable"]
    both = counts.dropna(subset=[f"n_interpretable_{la}", f"n_interpretable_{lb}"])
    if both.empty:
        return "the runs share no (layer, epoch): nothing to compare side by side\n"
    epoch = int(both["epoch"].max())
    at = both[both["epoch"] == epoch].set_index("layer")
    view = pd.DataFrame({
        la: at[f"n_interpretable_{la}"].astype(int).astype(str) + "/" + at[f"n_neurons_{la}"].astype(int).astype(str),
        lb: at[f"n_interpretable_{lb}"].astype(int).astype(str) + "/" + at[f"n_neurons_{lb}"].astype(int).astype(str),
        f"{lb} - {la}": at["n_interpretable_diff"].astype(int),
    })
    lines += [f"interpretable neurons per layer at epoch {epoch} (last common epoch)", stats.indent(view.to_string()), ""]

    cats = result["categories"]
    cats = cats[cats["epoch"] == epoch]
    if not cats.empty:
        grid = cats.pivot(index="layer", columns="category", values="n_interpretable_diff").fillna(0).astype(int)
        grid = grid.loc[:, (grid != 0).any(axis=0)]
        if grid.shape[1]:
            lines += [f"category counts, {lb} - {la}, at epoch {epoch}", stats.indent(grid.to_string()), ""]
        else:
            lines += [f"category counts at epoch {epoch}: identical", ""]

    concepts = result["concepts"]
    concepts = concepts[concepts["epoch"] == epoch]
    for label in (la, lb):
        only = concepts[concepts["present"] == f"{label} only"]
        lines.append(f"concepts only in {label} at epoch {epoch}:")
        for layer, group in only.groupby("layer", sort=True):
            group = group.sort_values(f"n_interpretable_{label}", ascending=False, kind="stable")
            head = group.head(top)
            names = ", ".join(f"{c} ({int(n)})" for c, n in zip(head["concept"], head[f"n_interpretable_{label}"]))
            more = f" and {len(group) - top} more" if len(group) > top else ""
            lines.append(f"  {layer}: {names}{more}")
        if only.empty:
            lines.append("  none")
    return "\n".join(lines).rstrip() + "\n"
