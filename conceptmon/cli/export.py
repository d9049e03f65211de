"""``conceptmon export tensorboard``: the results as a TensorBoard run."""
from __future__ import annotations

from pathlib import Path

import click

from . import main
from .common import config_option, fail_cleanly, find_out, log_to_stderr, out_option


@main.group("export")
def export_group():
    """Write the results for other tools (TensorBoard; W&B imports that with `wandb sync`)."""


@export_group.command("tensorboard")
@config_option
@out_option
@click.option("--logdir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="TensorBoard log folder; the run goes to LOGDIR/<run name>/ (replaced on re-export).")
@fail_cleanly
def tensorboard_cmd(config_path, out, logdir):
    """Scalars per layer and epoch (step = epoch) and the neuron embeddings for the projector.

    Example: conceptmon export tensorboard --out runs/r1 --logdir tb/ && tensorboard --logdir tb/
    """
    from ..export import export_tensorboard

    export_tensorboard(find_out(config_path, out), logdir, log=log_to_stderr)
