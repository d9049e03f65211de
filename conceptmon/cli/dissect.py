"""``conceptmon init`` and ``conceptmon dissect``."""
from __future__ import annotations

from pathlib import Path

import click

from .. import store
from ..config import DEFAULT_CONFIG, ConfigError, override
from . import main
from .common import config_option, fail_cleanly, load_cfg, log_to_stderr, parse_epochs, split_csv

STARTER = """\
# conceptmon config: written by `conceptmon init`. Every key is optional except layers.
# CLI options override these values (see `conceptmon dissect --help`).

model:
  arch: {arch}               # a torchvision name | hf:<folder or hub name> | timm:<name> | "package.module:function"
  kwargs: {kwargs}           # passed to the factory, e.g. {{num_classes: 365}}

layers: [{layers}]   # dotted module names; one forward pass feeds them all

checkpoints: {checkpoints}   # folder of per-epoch checkpoints (*.pt *.pth *.ckpt *.safetensors *.bin)
out: conceptmon_out          # every command reads and writes here

probe:
  name: {probe}              # broden | synthetic | cifar100 | folder
  root: {root}               # null for synthetic: generated once into the user cache (~/.cache/conceptmon)
  image_size: {image_size}   # null keeps the stored size; an int resizes
  mean: [0.485, 0.456, 0.406]  # normalisation the model was trained with, in [0,1] units
  std: [0.229, 0.224, 0.225]
  limit: null                # first N images only (quick looks)

detector:
  name: {detector}           # netdissect (needs masks) | clip-dissect
  quantile: 0.005            # netdissect: a unit is 'on' in its top 0.5 % of activations
  threshold: null            # interpretable when the best score >= this; null = detector default (IoU 0.04)

embedding:
  encoder: minilm            # minilm (offline) | clip:openai/clip-vit-base-patch16
  temperature: 1.0           # softmax temperature over each neuron's top-k concept scores
  anchors: []                # words to place on the map, e.g. [windmill, field]

top_k: 5
batch_size: 64
device: auto                 # cuda when available, else cpu
num_workers: 0               # data-loading worker processes
"""


def yaml_scalar(value) -> str:
    """``value`` as a YAML scalar that reads back as itself: bare when it already does,
    quoted otherwise (``runs/my run #2`` would lose ``#2`` to a comment, ``a: b`` would
    become a mapping, ``null`` would become None)."""
    import json

    import yaml

    if value is None:
        return "null"
    text = str(value)
    try:
        if text and text == text.strip() and yaml.safe_load(text) == text and "\n" not in text:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar


@main.command()
@click.option("--arch", default="resnet18", show_default=True, help="torchvision name or package.module:function.")
@click.option("--layers", default="layer2,layer3,layer4", show_default=True, help="Comma-separated layer names.")
@click.option("--probe", "probe", default="synthetic", show_default=True,
              type=click.Choice(["synthetic", "broden", "cifar100", "folder"]), help="Probe set.")
@click.option("--root", default=None, help="Probe folder (not needed for synthetic).")
@click.option("--ckpts", default=None, help="Checkpoint folder.")
@click.option("--num-classes", type=int, default=None, help="Sets model.kwargs.num_classes.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path(DEFAULT_CONFIG),
              show_default=True, help="Where to write the config.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@fail_cleanly
def init(arch, layers, probe, root, ckpts, num_classes, output, overwrite):
    """Write a commented starter config (./conceptmon.yaml)."""
    if output.exists() and not overwrite:
        raise ConfigError(f"{output}: already exists (pass --overwrite to replace it)")
    if probe in ("broden", "cifar100", "folder") and not root:
        raise ConfigError(f"--root: --probe {probe} needs the folder holding the probe set")
    text = STARTER.format(
        arch=yaml_scalar(arch),
        kwargs="{num_classes: %d}" % num_classes if num_classes else "{}",
        layers=", ".join(yaml_scalar(layer) for layer in split_csv(layers)),
        checkpoints=yaml_scalar(ckpts),
        probe=probe,
        root=yaml_scalar(root),
        image_size=112 if probe == "synthetic" else "null",
        detector="netdissect" if probe in ("synthetic", "broden") else "clip-dissect",
    )
    store.write_text(output, text)
    load_cfg(output)  # the template must itself be a valid config
    click.echo(f"wrote {output}; next: conceptmon dissect --ckpts DIR", err=True)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N (e.g. 0/4), got {value!r}", param_hint="--shard")
    if not 0 <= i < n:
        raise click.BadParameter(f"expected 0 <= I < N, got {value!r}", param_hint="--shard")
    return i, n


@main.command()
@config_option
@click.option("--ckpts", type=click.Path(path_type=Path), default=None,
              help="Folder of per-epoch checkpoints (default: the config's checkpoints:).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the config's out:, else ./conceptmon_out).")
@click.option("--layers", default=None, help="Comma-separated layer names (overrides the config).")
@click.option("--epochs", default=None, help="Only these epochs, e.g. 0,5,10.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", type=int, default=None, help="Probe images per forward pass.")
@click.option("--limit", type=int, default=None, help="Use only the first N probe images.")
@click.option("--num-workers", type=int, default=None, help="Data-loading worker processes.")
@click.option("--amp", is_flag=True, default=None, help="Mixed-precision forward passes (CUDA).")
@click.option("--shard", default=None, help="I/N: process every N-th checkpoint starting at I (array jobs).")
@click.option("--checkpoints-per-pass", type=click.IntRange(min=1), default=None,
              help="Checkpoints whose models share one decode of the probe set (default: as many as a quarter "
                   "of the free device memory holds, at most 8).")
@click.option("--force", is_flag=True, help="Redo epochs already dissected (also after a config change).")
@click.option("--trust-checkpoints", is_flag=True,
              help="Allow checkpoints that pickle whole modules (runs code from the file: trusted sources only).")
@click.option("--quiet", "-q", is_flag=True, help="Only errors.")
@fail_cleanly
def dissect(config_path, ckpts, out, layers, epochs, device, batch_size, limit, num_workers, amp, shard,
            checkpoints_per_pass, force, trust_checkpoints, quiet):
    """Label every neuron of the configured layers in every checkpoint with its top-k concepts.

    Writes OUT/dissect/epoch_NNNN.parquet (+ top images) per epoch; re-runs skip finished epochs.
    """
    cfg = load_cfg(config_path)
    cfg = override(
        cfg,
        layers=split_csv(layers),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        **{"probe.limit": limit},
    )
    from ..engine import dissect_run  # torch loads only for the commands that need it

    log = (lambda m: None) if quiet else log_to_stderr
    written = dissect_run(
        cfg,
        ckpts=ckpts,
        out=out,
        epochs=parse_epochs(epochs),
        force=force,
        shard=_parse_shard(shard),
        trust_checkpoints=trust_checkpoints,
        checkpoints_per_pass=checkpoints_per_pass,
        log=log,
    )
    log(f"dissected {len(written)} checkpoint(s)")
