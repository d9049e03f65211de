"""Invariants every conceptmon figure keeps, checked on its Plotly JSON, and a reader for
every figure of a report page."""
from __future__ import annotations

import json
import re
from pathlib import Path


def legend_problems(fig: dict) -> list[str]:
    """Traces without a name, or that no legend entry stands for (directly or via their group)."""
    from .fixtures_runs import values

    problems = []
    # Plotly draws no legend entry for a trace without points: such a trace stands for no group.
    shown_groups = {t.get("legendgroup") for t in fig["data"] if t.get("showlegend", True) is not False
                    and (t.get("type") not in ("scatter", "bar") or len(values(t.get("x", []))) > 0)}
    for group in {t.get("legendgroup") for t in fig["data"] if t.get("legendgroup")} - shown_groups:
        if any(len(values(t.get("x", []))) for t in fig["data"] if t.get("legendgroup") == group):
            problems.append(f"legend group {group!r} has points but no legend entry")
    for i, trace in enumerate(fig["data"]):
        if not str(trace.get("name") or "").strip():
            problems.append(f"trace {i} ({trace.get('type')}) has no name")
        elif (trace.get("showlegend", True) is False and len(values(trace.get("x", [])))
              and (not trace.get("legendgroup") or trace.get("legendgroup") not in shown_groups)):
            problems.append(f"trace {i} {trace['name']!r} is in no legend entry")
    if fig["layout"].get("showlegend") is False and fig["data"]:
        problems.append("the legend is hidden")
    return problems


def _axis_names(fig: dict) -> set[str]:
    """Layout names of the axes that some trace draws on (xaxis, xaxis2, ..., yaxis...)."""
    names = set()
    for trace in fig["data"]:
        for letter in ("x", "y"):
            ref = trace.get(f"{letter}axis", letter)
            names.add(f"{letter}axis{ref[1:]}")
    return names


def axis_problems(fig: dict) -> list[str]:
    """Axes without a title (unless they share another axis), and count axes with fractional ticks."""
    problems = []
    layout = fig["layout"]
    for name in sorted(_axis_names(fig)):
        axis = layout.get(name) or {}
        title = axis.get("title")
        text = title.get("text") if isinstance(title, dict) else title
        if not str(text or "").strip() and not axis.get("matches"):
            problems.append(f"{name} has no title")
        if "neurons" in str(text or "") and "share" not in str(text) and axis.get("tickformat") != "d":
            problems.append(f"{name} ({text}) counts neurons but its ticks may be fractional")
    return problems


def check_figure(fig: dict) -> None:
    problems = legend_problems(fig) + axis_problems(fig)
    assert not problems, problems
    assert str((fig["layout"].get("title") or {}).get("text") or "").strip(), "figure has no title"


def report_figures(page: Path) -> list[dict]:
    """Every figure of a report (each ``Plotly.newPlot("chart-N", data, layout, config)``)."""
    text = Path(page).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    figures = []
    for match in re.finditer(r'Plotly\.newPlot\(\s*"(chart-\d+)",', text):
        pos = match.end()
        values = []
        for _ in range(2):
            while text[pos].isspace():
                pos += 1
            value, pos = decoder.raw_decode(text, pos)
            values.append(value)
            pos = text.index(",", pos) + 1
        figures.append({"id": match.group(1), "data": values[0], "layout": values[1]})
    return figures
