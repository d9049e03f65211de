"""A statistic declared once (in a test, here) is computed, written, printed, compared and reported;
a report section registered once appears in the page in its order."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

from conceptmon import report, stats
from conceptmon.cli import main
from conceptmon.registry import RegistryError

from .test_compare import ROBUST
from .test_stats import make_out


def strongest(inputs: stats.StatsInputs) -> pd.DataFrame:
    """Per (epoch, layer): the best top-1 score of any neuron."""
    first = inputs.first
    table = first.groupby(["epoch", "layer"], sort=True)["score"].max().rename("best_score").reset_index()
    table["epoch"] = table["epoch"].astype("int64")
    return table.astype({"best_score": "float64"})


STRONGEST = stats.Statistic(
    name="strongest", title="Strongest neuron", schema=pa.schema([("epoch", pa.int64()), ("layer", pa.string()),
                                                                    ("best_score", pa.float64())]),
    compute=strongest, compare=stats.Comparison(keys=("layer", "epoch"), values=("best_score",)),
    summary=lambda tables, ctx: [f"strongest neuron at epoch {ctx.last}: " + ", ".join(
        f"{r.layer} {r.best_score:.2f}" for r in tables["strongest"][tables["strongest"].epoch == ctx.last].itertuples())],
    description="the best top-1 score per layer")


@pytest.fixture
def registered():
    stats.STATISTICS.register("strongest")(STRONGEST)
    yield STRONGEST
    stats.STATISTICS.unregister("strongest")


@pytest.mark.slow
def test_a_registered_statistic_is_computed_written_printed_and_compared(tmp_path, registered):
    out = make_out(tmp_path, "standard")
    assert stats.statistic_names()[-1] == "strongest"
    tables = stats.stats_run(out, log=lambda m: None)
    assert pd.read_parquet(stats.stats_table_path(out, "strongest"))["best_score"].max() == pytest.approx(0.35)
    assert tables["strongest"].shape == (6, 3)

    result = CliRunner().invoke(main, ["stats", "--out", str(out), "--format", "json", "--table", "strongest"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["tables"]["strongest"]
    assert {(r["epoch"], r["layer"]): round(r["best_score"], 2) for r in rows}[(5, "conv")] == 0.35
    text = CliRunner().invoke(main, ["stats", "--out", str(out)]).stdout
    assert "strongest neuron at epoch 5: conv 0.35, fc 0.22" in text

    other = make_out(tmp_path, "robust", top1=ROBUST)
    result = CliRunner().invoke(main, ["compare", str(out), str(other), "--format", "json", "--table", "strongest"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(result.stdout)["tables"]["strongest"] if r["layer"] == "fc" and r["epoch"] == 5)
    assert row["best_score_diff"] == pytest.approx(0.0) and "best_score_robust" in row

    page = report.report_run(out, log=lambda m: None).read_text(encoding="utf-8")
    assert '<section id="more">' in page and "<h3>Strongest neuron</h3>" in page


def test_fresh_stats_go_stale_when_the_set_of_statistics_changes(tmp_path, registered):
    out = make_out(tmp_path)
    stats.stats_run(out, log=lambda m: None)
    assert stats.read_fresh_stats(out) is not None
    stats.STATISTICS.unregister("strongest")
    assert stats.check_fresh_stats(out)[1] == "they were computed by another set of statistics"
    stats.STATISTICS.register("strongest")(STRONGEST)


def test_a_statistic_must_declare_columns_it_has():
    bad = stats.Statistic(name="bad", title="Bad", schema=pa.schema([("epoch", pa.int64())]), compute=strongest,
                          compare=stats.Comparison(keys=("layer",), values=("epoch",)))
    with pytest.raises(RegistryError, match=r"statistic 'bad' compares columns \['layer'\] that its schema lacks"):
        stats.STATISTICS.register("bad")(bad)
    with pytest.raises(RegistryError, match="not a conceptmon.stats.Statistic"):
        stats.STATISTICS.register("worse")(lambda inputs: None)


def test_a_registered_report_section_appears_in_its_order(tmp_path):
    section = report.ReportSection(
        "training-notes", "Training notes", 25,
        lambda ctx: f"<p id='notes'>{len(ctx.epochs)} epochs, last {ctx.last}</p>")
    report.REPORT_SECTIONS.register("training-notes")(section)
    try:
        out = make_out(tmp_path, embed=False)
        page = report.report_run(out, log=lambda m: None).read_text(encoding="utf-8")
    finally:
        report.REPORT_SECTIONS.unregister("training-notes")
    assert "<p id='notes'>3 epochs, last 5</p>" in page
    order = [page.index(f'<section id="{name}">') for name in ("interpretable", "training-notes", "categories")]
    assert order == sorted(order)
    assert '<a href="#training-notes">Training notes</a>' in page
    assert "training-notes" not in [s.name for s in report.sections()]
