"""``conceptmon demo``: train a small network on synthetic data and monitor it end to end."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from . import main
from .common import fail_cleanly, log_to_stderr


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Output folder: new, empty, or an earlier demo's (replaced).")
@click.option("--epochs", type=int, default=None, help="Training epochs (default 8; 2 with --tiny).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the probe set, data, weights and order.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu, cuda, cuda:N, mps.")
@click.option("--tiny", is_flag=True, help="Seconds instead of minutes (a smoke test; it never claims the paper's observation).")
@fail_cleanly
def demo(out, epochs, seed, device, tiny):
    """Generate the synthetic probe set, train a narrow ResNet from scratch on a task drawn
    from the same generator (checkpoint per epoch), then dissect, embed, compute the
    statistics, validate the classifier's output units and write the report. Prints
    accuracies per epoch, what the run measured, the report's path, and last whether the
    run bears out the paper's observation (only when it learned; never with --tiny).
    """
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings.tiny() if tiny else DemoSettings()
    settings = replace(settings, seed=seed, device=device, **({"epochs": epochs} if epochs is not None else {}))
    run_demo(out, settings, echo=click.echo, log=log_to_stderr)
