"""Two runs side by side (e.g. standard vs PGD-trained): the statistics tables joined,
with differences, after checking that the runs are comparable at all.

Runs are comparable when they used the same detector (name and settings, threshold
included), the same probe set (fingerprint), the same concept set (fingerprint) and the
same text encoder; otherwise :func:`compare_runs` raises :class:`CompareError` naming
the first difference.

Which tables are compared, on which keys and values, comes from each statistic's
declaration (:class:`conceptmon.stats.Comparison`). Every side-by-side table has the
key columns, then for each value ``<value>_<label a>``, ``<value>_<label b>`` and
``<value>_diff`` = b - a. Rows are the union of both runs' keys: a value one run lacks
(an epoch or layer only the other has) is blank, never 0.

**Layer widths.** A layer with 128 neurons in one run and 16 in the other cannot be
compared by counts (27/128 vs 10/16 is not "-17"). Where the widths differ, the
differences of width-dependent counts are left blank, the row's ``basis`` is
``shares``, and the summary compares the shares (percentage points) and says so.

**Labels.** ``--labels`` when given; else the runs' names (manifest ``run``) when they
differ; else ``a`` and ``b``, with the folders they stand for named in the output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import stats, store
from .errors import ConceptmonError


class CompareError(ConceptmonError):
    """Two runs that cannot be compared, or labels that cannot name them."""


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BASIS_COUNTS, BASIS_SHARES = "counts", "shares"


def side_by_side_specs() -> dict[str, stats.Comparison]:
    """{statistic name: how it is compared}, for every statistic that declares a comparison."""
    return {s.name: s.compare for s in stats.statistics() if s.compare is not None}


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


def label_from(run_name: str) -> str:
    """A run name made usable as a column-suffix label (letters, digits, _ . -); '' when nothing is left."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(run_name or "")).strip("_.-")
    return label if label != "diff" else ""


def choose_labels(manifest_a: dict, manifest_b: dict, given=None) -> tuple[tuple[str, str], str]:
    """The two runs' labels and where they come from ('--labels', 'run names' or 'a/b')."""
    if given:
        return check_labels(given), "--labels"
    names = (label_from(manifest_a.get("run")), label_from(manifest_b.get("run")))
    if all(names) and names[0] != names[1]:
        return names, "run names"
    return ("a", "b"), "a/b"


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
    probe_a, probe_b = manifest_a.get("probe") or {}, manifest_b.get("probe") or {}
    if probe_a.get("fingerprint") != probe_b.get("fingerprint"):
        def probe(p):
            return (f"{p.get('name') or '?'} ({p.get('n_images', '?')} images at {p.get('root') or '?'}, "
                    f"fingerprint {p.get('fingerprint')})")
        return f"runs used different probe sets: {la} {probe(probe_a)}, {lb} {probe(probe_b)}"
    con_a, con_b = manifest_a.get("concepts") or {}, manifest_b.get("concepts") or {}
    if con_a.get("fingerprint") != con_b.get("fingerprint"):
        def describe(c):
            return f"{c.get('source') or '?'} ({len(c.get('names') or [])} concepts, fingerprint {c.get('fingerprint')})"
        return f"runs used different concept sets: {la} {describe(con_a)}, {lb} {describe(con_b)}"
    if encoders[0] != encoders[1]:
        return f"runs used different text encoders: {encoders[0]!r} in {la} but {encoders[1]!r} in {lb}"
    return None


# ----------------------------------------------------------------------------- pure joins


def layer_widths(interpretable: pd.DataFrame) -> dict[str, int]:
    """Neurons per layer (the most any epoch has)."""
    return {str(l): int(n) for l, n in interpretable.groupby("layer")["n_neurons"].max().items()}


def differing_widths(tables_a: dict, tables_b: dict) -> dict[str, tuple[int, int]]:
    """{layer: (width in a, width in b)} for the layers both runs have with different widths."""
    wa, wb = layer_widths(tables_a["interpretable"]), layer_widths(tables_b["interpretable"])
    return {l: (wa[l], wb[l]) for l in sorted(set(wa) & set(wb)) if wa[l] != wb[l]}


def side_by_side(a: pd.DataFrame, b: pd.DataFrame, spec: stats.Comparison, labels: tuple[str, str],
                 widths_differ: dict[str, tuple[int, int]] | None = None) -> pd.DataFrame:
    """Outer join on the keys; each value as ``<value>_<a>``, ``<value>_<b>``, ``<value>_diff`` (b - a).

    Where a layer's widths differ, the differences of ``spec.shares``' counts are blank
    and ``basis`` (present when the spec has such counts) says ``shares``.
    """
    la, lb = labels
    keys, values = list(spec.keys), list(spec.values)
    left = a[keys + values].rename(columns={v: f"{v}_{la}" for v in values})
    right = b[keys + values].rename(columns={v: f"{v}_{lb}" for v in values})
    joined = left.merge(right, on=keys, how="outer", sort=False)
    columns = list(keys)
    for v in values:
        joined[f"{v}_diff"] = _as_float(joined[f"{v}_{lb}"]) - _as_float(joined[f"{v}_{la}"])
        columns += [f"{v}_{la}", f"{v}_{lb}", f"{v}_diff"]
    if spec.shares and "layer" in keys:
        differ = joined["layer"].isin(list(widths_differ or {}))
        for count in spec.shares:
            joined.loc[differ, f"{count}_diff"] = np.nan
        joined["basis"] = np.where(differ, BASIS_SHARES, BASIS_COUNTS)
        columns.insert(len(keys), "basis")
    return joined[columns].sort_values(keys, kind="stable").reset_index(drop=True)


def _as_float(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce").astype("Float64").astype(np.float64)


def compare_tables(tables_a: dict[str, pd.DataFrame], tables_b: dict[str, pd.DataFrame],
                   labels: tuple[str, str]) -> dict[str, pd.DataFrame]:
    """Side-by-side tables for every compared statistic both runs have."""
    labels = check_labels(labels)
    widths = differing_widths(tables_a, tables_b)
    result = {}
    for name, spec in side_by_side_specs().items():
        if name in tables_a and name in tables_b:
            joined = side_by_side(tables_a[name], tables_b[name], spec, labels, widths)
            if spec.finish is not None:
                joined = spec.finish(joined, tables_a[name], tables_b[name], labels)
            result[name] = joined
    return result


@dataclass
class CompareResult:
    """The side-by-side tables, and what a reader needs to read them."""

    tables: dict[str, pd.DataFrame]
    labels: tuple[str, str]
    label_source: str
    runs: tuple[Path, Path]
    run_names: tuple[str, str]
    widths_differ: dict[str, tuple[int, int]] = field(default_factory=dict)
    trust_levels: tuple[float, float] = (stats.DEFAULT_TRUST_LEVEL, stats.DEFAULT_TRUST_LEVEL)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tables

    def __iter__(self):
        return iter(self.tables)

    def notes(self) -> list[str]:
        """One line each: what the labels stand for, and every caveat of this comparison."""
        la, lb = self.labels
        lines = [f"{la} = {self.runs[0]} (run {self.run_names[0]!r}), {lb} = {self.runs[1]} "
                 f"(run {self.run_names[1]!r}); differences are {lb} - {la}"]
        if self.label_source == "a/b":
            lines.append("the runs have the same name: pass --labels NAME_A,NAME_B to name them")
        for layer, (wa, wb) in self.widths_differ.items():
            lines.append(f"{layer} has {wa} neurons in {la} but {wb} in {lb}: compared as shares of the layer's "
                         f"neurons, not as counts (count differences left blank)")
        if self.trust_levels[0] != self.trust_levels[1]:
            lines.append(f"confident labels use trust.level {self.trust_levels[0]:g} in {la} but "
                         f"{self.trust_levels[1]:g} in {lb}")
        return lines


def compare_runs(
    out_a: Path,
    out_b: Path,
    labels: tuple[str, str] | None = None,
    *,
    layers: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Compare two output folders; raises CompareError when they are not comparable.

    Each run's statistics are read from its fresh stats generation when there is one
    (and no ``layers`` filter), else computed.
    """
    out_a, out_b = Path(out_a), Path(out_b)
    manifest_a, manifest_b = store.read_manifest(out_a), store.read_manifest(out_b)
    labels, source = choose_labels(manifest_a, manifest_b, labels)
    problem = comparability_problem(
        manifest_a, manifest_b, labels, (text_encoder(out_a, manifest_a), text_encoder(out_b, manifest_b))
    )
    if problem:
        raise CompareError(f"cannot compare {out_a} and {out_b}: {problem}")
    tables = []
    for out, label in ((out_a, labels[0]), (out_b, labels[1])):
        fresh = stats.read_fresh_stats(out, layers=layers)
        if fresh is None:
            inputs = stats.load_inputs(out, layers, lambda m, label=label: log(f"{label}: {m}"))
            fresh = stats.compute_stats(inputs)
        tables.append(fresh)
    return CompareResult(
        tables=compare_tables(tables[0], tables[1], labels), labels=labels, label_source=source,
        runs=(out_a, out_b), run_names=(str(manifest_a.get("run") or out_a.name), str(manifest_b.get("run") or out_b.name)),
        widths_differ=differing_widths(tables[0], tables[1]),
        trust_levels=(stats.trust_level_of(manifest_a), stats.trust_level_of(manifest_b)),
    )


# ----------------------------------------------------------------------------- the text summary


def _cell(row, label: str) -> str:
    n, total, share = row[f"n_interpretable_{label}"], row[f"n_neurons_{label}"], row[f"share_interpretable_{label}"]
    if pd.isna(n):
        return ""
    return f"{int(n)}/{int(total)} ({share:.1%})"


def _difference(row, la: str, lb: str) -> str:
    if pd.isna(row[f"n_interpretable_{la}"]) or pd.isna(row[f"n_interpretable_{lb}"]):
        return ""
    if row["basis"] == BASIS_SHARES:
        return f"{100 * row['share_interpretable_diff']:+.1f} pp (shares)"
    diff = int(row["n_interpretable_diff"])
    return f"{diff:+d}" if diff else "0"


def format_comparison(result: CompareResult, top: int = 8) -> str:
    """A compact readable digest: interpretable counts, categories and concepts at the last common epoch."""
    la, lb = result.labels
    lines: list[str] = [*result.notes(), ""]
    counts = result["interpretable"]
    both = counts.dropna(subset=[f"n_interpretable_{la}", f"n_interpretable_{lb}"])
    if both.empty:
        return "\n".join(lines + ["the runs share no (layer, epoch): nothing to compare side by side"]) + "\n"
    epoch = int(both["epoch"].max())
    at = counts[counts["epoch"] == epoch].set_index("layer")
    view = pd.DataFrame({la: [_cell(r, la) for _, r in at.iterrows()], lb: [_cell(r, lb) for _, r in at.iterrows()],
                         f"{lb} - {la}": [_difference(r, la, lb) for _, r in at.iterrows()]}, index=at.index)
    lines += [f"interpretable neurons per layer at epoch {epoch} (last common epoch)", stats.indent(view.to_string())]
    if (view[la] == "").any() or (view[lb] == "").any():
        lines.append("  (blank: the layer is not in that run)")
    if at[f"n_confident_{la}"].notna().any() or at[f"n_confident_{lb}"].notna().any():
        def confident(label):
            return ", ".join(f"{layer} {'' if pd.isna(v) else int(v)}" for layer, v in at[f"n_confident_{label}"].items())
        blank = at[[f"n_confident_{la}", f"n_confident_{lb}"]].isna().to_numpy().any()
        lines.append(f"  confident labels: {la}: {confident(la)}; {lb}: {confident(lb)}"
                     + (" (blank: confidence unknown or layer absent)" if blank else ""))
    lines.append("")

    cats = result["categories"]
    cats = cats[cats["epoch"] == epoch].dropna(subset=[f"n_interpretable_{la}", f"n_interpretable_{lb}"])
    if not cats.empty:
        same = cats[cats["basis"] == BASIS_COUNTS]
        grid = same.pivot(index="layer", columns="category", values="n_interpretable_diff").astype(int)
        grid = grid.loc[:, (grid != 0).any(axis=0)]
        scope = " (layers of the same width)" if result.widths_differ else ""
        if grid.shape[1]:
            lines += [f"category counts, {lb} - {la}, at epoch {epoch}{scope}", stats.indent(grid.to_string()), ""]
        elif not same.empty:
            lines += [f"category counts at epoch {epoch}{scope}: identical", ""]
        shares = cats[cats["basis"] == BASIS_SHARES]
        if not shares.empty:
            grid = shares.pivot(index="layer", columns="category", values="share_of_neurons_diff") * 100
            grid = grid.loc[:, (grid.abs() > 1e-9).any(axis=0)]
            lines += [f"category shares of the layer's neurons, {lb} - {la}, percentage points, at epoch {epoch} "
                      f"(layers whose widths differ)", stats.indent(grid.to_string(float_format=lambda v: f"{v:+.1f}")), ""]

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
