"""``conceptmon watch``: follow a training run as it writes checkpoints."""
from __future__ import annotations

from pathlib import Path

import click

from . import main
from .common import config_option, fail_cleanly, load_cfg, log_to_stderr


@main.command()
@config_option
@click.option("--ckpts", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder to follow (default: the config's checkpoints:).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the config's out:, else ./conceptmon_out).")
@click.option("--interval", type=float, default=30.0, show_default=True, help="Seconds between polls (> 0).")
@click.option("--patience", type=int, default=3, show_default=True,
              help="Warn after this many epochs of falling diversity or concept collapse.")
@click.option("--no-refresh", is_flag=True, help="Only dissect; do not refresh embed/stats/report.")
@click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also keep a TensorBoard logdir current (`conceptmon export tensorboard` after each refresh).")
@click.option("--trust-checkpoints", is_flag=True, help="Allow checkpoints that pickle whole modules.")
@fail_cleanly
def watch(config_path, ckpts, out, interval, patience, no_refresh, tensorboard, trust_checkpoints):
    """Dissect each new checkpoint as training writes it; print one line per epoch. Ctrl-C stops."""
    from ..watch import watch_run  # torch loads only for the commands that need it

    cfg = load_cfg(config_path)
    watch_run(cfg, ckpts=ckpts, out=out, interval=interval, patience=patience, refresh=not no_refresh,
              tensorboard=tensorboard, trust_checkpoints=trust_checkpoints, log=log_to_stderr)
