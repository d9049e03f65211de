"""``conceptmon probe``: prepare probe sets (``conceptmon probe synthetic OUT``)."""
from __future__ import annotations

from pathlib import Path

import click

from ..probes.synthetic import MIN_SIZE, generate_synthetic, is_complete, read_marker
from ..probes.base import ProbeError
from . import main
from .common import fail_cleanly


@main.group()
def probe():
    """Prepare probe sets."""


def _print_progress(done: int, total: int) -> None:
    """One stderr line per tenth of the set."""
    if done * 10 // total != (done - 1) * 10 // total:
        click.echo(f"generated {done}/{total} images", err=True)


@probe.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=1000, show_default=True, help="Number of images.")
@click.option("--size", type=click.IntRange(min=MIN_SIZE), default=112, show_default=True,
              help="Image side in pixels (masks are half of it).")
@click.option("--seed", type=int, default=0, show_default=True, help="Generator seed (same seed, same files).")
@click.option("--force", is_flag=True, help="Replace a synthetic set already in OUT (never other files).")
@fail_cleanly
def synthetic(out: Path, n: int, size: int, seed: int, force: bool):
    """Write the synthetic Broden-format probe set (colours, textures, shapes, parts,
    scenes) into OUT, a new or empty folder; prints the folder when done.

    Use it with `probe: {name: synthetic, root: OUT}` (or name: broden) in the config.
    """
    if is_complete(out) and not force:
        marker = read_marker(out)
        wanted = {"n": n, "size": size, "seed": seed}
        have = {k: marker.get(k) for k in wanted}
        if have != wanted:
            raise ProbeError(
                f"{out}: already holds a synthetic set with {have}, not {wanted}; pass --force to replace it"
            )
        click.echo(f"{out}: already holds this synthetic set; nothing to do", err=True)
    else:
        generate_synthetic(out, n=n, size=size, seed=seed, progress=_print_progress,
                           overwrite=force)
    click.echo(str(out))
