"""``conceptmon validate``: does the detector name a classifier's output units by their classes?"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import override
from . import main
from .common import config_option, fail_cleanly, load_cfg, log_to_stderr, parse_epochs


@main.command()
@config_option
@click.option("--ckpts", type=click.Path(path_type=Path), default=None,
              help="Folder of per-epoch checkpoints (default: the config's checkpoints:).")
@click.option("--layer", default=None, metavar="LAYER",
              help="The classifier's output layer: one unit per class, in class order (e.g. fc).")
@click.option("--classes", default=None, metavar="FILE|a,b,c",
              help="Class names in output order: a file with one per line, or a comma-separated list.")
@click.option("--epochs", default=None, help="Only these epochs, e.g. 8 (default: every checkpoint).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where validate.json goes (default: the config's out:, else ./conceptmon_out).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: one line per epoch and the misses; json: {\"results\": [...]} on stdout.")
@click.option("--trust-checkpoints", is_flag=True, help="Allow checkpoints that pickle whole modules.")
@click.option("--planted", is_flag=True,
              help="Instead: dissect planted units with known concepts (colours, a texture, a scene, a dead "
                   "and a noise unit) on a synthetic probe with the config's detector (default netdissect); "
                   "exit 1 when one comes out wrong.")
@click.option("--probe-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --planted: a synthetic probe folder (default: the config's synthetic probe, else one "
                   "generated once into the user cache).")
@fail_cleanly
def validate(config_path, ckpts, layer, classes, epochs, out, device, fmt, trust_checkpoints, planted, probe_root):
    """Label a classifier's output units with the run's detector and report the share named
    by their own class (top-1 and top-5 "final-layer accuracy") per epoch; or, with
    --planted, check the detector on units whose concepts are known.

    Examples: conceptmon validate --layer fc --classes OUT/classes.txt --epochs 8;
    conceptmon validate --planted
    """
    from ..validate import format_validation, read_classes, validate_run

    if planted:
        _planted(config_path, probe_root, device, fmt)
        return
    if not layer or not classes:
        raise click.UsageError("validate needs --layer LAYER and --classes FILE|a,b,c")
    cfg = override(load_cfg(config_path), device=device)
    report = validate_run(cfg, layer=layer, classes=read_classes(classes, cfg.base_dir), ckpts=ckpts,
                          epochs=parse_epochs(epochs), out=out, trust_checkpoints=trust_checkpoints,
                          log=log_to_stderr)
    if fmt == "json":
        click.echo(json.dumps({"results": [{k: v for k, v in r.items() if k not in ("checkpoint", "sha256")}
                                           for r in report["results"]]}, indent=1))
    else:
        click.echo(format_validation(report), nl=False)


PLANTED_PROBE = {"n": 300, "image_size": 64, "seed": 0}
"""The synthetic probe --planted makes when none is configured (seconds to generate, once)."""


def _planted(config_path, probe_root, device, fmt) -> None:
    import sys

    from ..planted import run_planted_check
    from ..probes.synthetic import default_cache_root, ensure_synthetic

    cfg = load_cfg(config_path, required=False)
    detector = cfg.detector.to_dict() if cfg is not None else None
    if probe_root is None and cfg is not None and cfg.probe.name == "synthetic" and cfg.probe.root:
        probe_root = Path(cfg.probe.root)
    if probe_root is None:
        n, size, seed = PLANTED_PROBE["n"], PLANTED_PROBE["image_size"], PLANTED_PROBE["seed"]
        probe_root = ensure_synthetic(default_cache_root(n, size, seed), n, size, seed)
    report = run_planted_check(probe_root, detector=detector, device=device or (cfg.device if cfg else "auto"),
                               log=log_to_stderr)
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=1, default=str))
    else:
        click.echo("\n".join(report.lines()))
    if not report.passed:
        sys.exit(1)
