"""``conceptmon stats``, ``conceptmon compare`` and ``conceptmon report``.

Machine-readable output (``--format json|csv``) goes alone to stdout; progress and
notices go to stderr, so ``conceptmon stats --format json | jq`` works.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .. import stats as statistics
from . import main
from .common import config_option, fail_cleanly, find_out, log_to_stderr, out_option, split_csv

FORMATS = click.Choice(["table", "csv", "json"])


def _stderr_log(notices: list[str] | None = None):
    def log(message: str) -> None:
        if notices is not None and "notice:" in message:
            notices.append(message)
        log_to_stderr(message)

    return log


def _check_table_names(table: str | None, choices) -> None:
    """Unknown --table names fail before anything is computed or written."""
    unknown = [n for n in split_csv(table) or [] if n not in choices]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of {', '.join(choices)}", param_hint="--table")


def _pick_tables(tables: dict, table: str | None, fmt: str, choices) -> list[str]:
    """Names of the tables to print; csv prints exactly one (default: interpretable)."""
    names = split_csv(table) if table else None
    if names:
        _check_table_names(table, choices)
        missing = [n for n in names if n not in tables]
        if missing:
            raise click.BadParameter(
                f"{missing[0]!r} was not computed for this run (see the notices above)", param_hint="--table")
    if fmt == "csv":
        names = names or ["interpretable"]
        if len(names) != 1:
            raise click.BadParameter("--format csv prints one table; name one", param_hint="--table")
    return names or [n for n in choices if n in tables]


def _emit(tables: dict, names: list[str], fmt: str, summary: str, extra: dict) -> None:
    if fmt == "json":
        payload = {**extra, "tables": {n: statistics.table_records(tables[n]) for n in names}}
        click.echo(json.dumps(payload, indent=1, allow_nan=False))
    elif fmt == "csv":
        click.echo(tables[names[0]].to_csv(index=False), nl=False)
    else:
        click.echo(summary, nl=False)


@main.command()
@config_option
@out_option
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: a readable summary; json: every table (or --table ones) as JSON; csv: one table.")
@click.option("--table", default=None,
              help=f"Which table(s) to print with json/csv, or in full with table: "
                   f"{', '.join(statistics.BUILTIN_STATISTICS)} (and any plugin statistic).")
@click.option("--layers", default=None, help="Comma-separated layers (default: all dissected).")
@click.option("--reference", type=int, default=None, help="Reference epoch for retention (default: the first).")
@click.option("--k", "anchor_k", type=int, default=statistics.DEFAULT_ANCHOR_K, show_default=True,
              help="Nearest neurons per anchor.")
@fail_cleanly
def stats(config_path, out, fmt, table, layers, reference, anchor_k):
    """Statistics over epochs: interpretable neurons, dead units, label confidence, categories,
    concepts, changes, retention, diversity and anchors. Writes one generation of OUT/stats/.
    """
    out = find_out(config_path, out)
    _check_table_names(table, statistics.statistic_names())
    notices: list[str] = []
    tables = statistics.stats_run(out, layers=split_csv(layers), reference=reference, anchor_k=anchor_k,
                                  log=_stderr_log(notices))
    names = _pick_tables(tables, table, fmt, statistics.statistic_names())
    trust_level = statistics.run_trust_level(out)
    if fmt == "table" and table:
        summary = "".join(f"{n}\n{tables[n].to_string(index=False)}\n\n" for n in names)
    else:
        summary = statistics.format_summary(tables, trust_level) if fmt == "table" else ""
    epochs = statistics.epochs_of(tables["interpretable"])
    _emit(tables, names, fmt, summary, {"out": str(out), "notices": notices, "epochs": epochs,
                                        "trust_level": trust_level,
                                        "confidence_known": bool(tables["interpretable"]["n_confident"].notna().any())})


def _parse_labels(value: str) -> tuple[str, ...]:
    return tuple(split_csv(value) or [])


@main.command()
@click.argument("out_a", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_b", type=click.Path(file_okay=False, path_type=Path))
@click.option("--labels", default=None,
              help="Names of the two runs, e.g. standard,robust (default: their run names when they differ, else a,b).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: a readable summary; json: every side-by-side table; csv: one table.")
@click.option("--table", default=None, help="Which side-by-side table(s) to print (json/csv/table).")
@click.option("--layers", default=None, help="Comma-separated layers (default: all).")
@fail_cleanly
def compare(out_a, out_b, labels, fmt, table, layers):
    """Two runs side by side (e.g. standard vs PGD-trained) with differences (b - a).

    Refuses runs made with different detectors, probe sets, concept sets or text encoders.
    Layers whose widths differ are compared as shares, and the output says so.
    """
    from .. import compare as comparison  # plotly-free, but only needed here

    given = comparison.check_labels(_parse_labels(labels)) if labels else None
    _check_table_names(table, list(comparison.side_by_side_specs()))
    notices: list[str] = []
    result = comparison.compare_runs(out_a, out_b, given, layers=split_csv(layers), log=_stderr_log(notices))
    names = _pick_tables(result.tables, table, fmt, list(comparison.side_by_side_specs()))
    if fmt == "table" and table:
        summary = "\n".join(result.notes()) + "\n\n" + "".join(
            f"{n}\n{result[n].to_string(index=False)}\n\n" for n in names)
    else:
        summary = comparison.format_comparison(result) if fmt == "table" else ""
    if fmt == "csv":
        for line in result.notes():
            log_to_stderr(f"note: {line}")
    _emit(result.tables, names, fmt, summary, {
        "labels": list(result.labels), "label_source": result.label_source, "runs": [str(out_a), str(out_b)],
        "notes": result.notes(), "widths_differ": {l: list(w) for l, w in result.widths_differ.items()},
        "notices": notices})


@main.command()
@config_option
@out_option
@click.option("--compare", "compare_with", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A second output folder to compare with (e.g. the robust run).")
@click.option("--labels", default=None, help="Names of the two runs when comparing (default: their run names).")
@fail_cleanly
def report(config_path, out, compare_with, labels):
    """Write OUT/report.html: one self-contained, offline, interactive report of the run."""
    from ..report import report_run  # imports plotly: only for this command

    out = find_out(config_path, out)
    path = report_run(out, compare=compare_with, labels=_parse_labels(labels) if labels else None,
                      log=log_to_stderr)
    click.echo(str(path))
