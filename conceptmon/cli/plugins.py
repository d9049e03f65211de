"""``conceptmon plugins``: what every registry holds and where each entry came from."""
from __future__ import annotations

import json

import click

from . import main
from .common import fail_cleanly


@main.command()
@click.argument("kind", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table: one line per component; json: a list of {kind, name, source, group}.")
@fail_cleanly
def plugins(kind, fmt):
    """List registered detectors, probes, encoders, similarities, map methods, statistics and
    report sections, built in or from installed plugins (entry points), e.g.
    `conceptmon plugins detectors`."""
    from ..plugins import KINDS, listing

    rows = listing([kind] if kind else None)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
        return
    for k in ([kind] if kind else list(KINDS)):
        mine = [r for r in rows if r["kind"] == k]
        group = mine[0]["group"] if mine else ""
        click.echo(f"{k} (entry-point group {group}):" if group else f"{k}:")
        width = max((len(r["name"]) for r in mine), default=0)
        for r in mine:
            click.echo(f"  {r['name']:<{width}}  {r['source']}")
