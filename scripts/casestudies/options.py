"""Command-line options every case-study script shares, and its one-line errors.

A run folder written by any script::

    OUT/checkpoints/epoch_NNNN.pt   one per epoch (or per pruning stage), epoch 0 = before training
    OUT/conceptmon.yaml             config that `conceptmon dissect --config OUT/conceptmon.yaml` takes as is
    OUT/history.json                per-epoch accuracies
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from conceptmon.demo.loop import stderr_log
from conceptmon.errors import ConceptmonError
from conceptmon.models import resolve_device

from . import fail
from .datasets import DATASETS, HOW_TO_GET


def base_parser(description: str, *, dataset: str, arch: str, epochs: int, batch_size: int,
                lr: float, weight_decay: float, image_size: int | None,
                per_class: int | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=dataset, help=f"training data set (default {dataset})")
    d.add_argument("--data", type=Path, default=None,
                   help="data set root (places365: the places365_standard folder; cifar: the torchvision root; "
                        "folder: an ImageFolder); not needed for synthetic, which is drawn in memory")
    d.add_argument("--per-class", type=int, default=per_class,
                   help="keep at most this many training images per class (the paper: 1000 for Places365)")
    d.add_argument("--image-size", type=int, default=image_size,
                   help="training crop size (default: 32 for CIFAR and tiny runs, 64 for synthetic, 224 otherwise)")
    d.add_argument("--synthetic-n", type=int, default=2400, help="synthetic only: training images to draw")
    d.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 8 on GPU, 0 on CPU)")
    t = p.add_argument_group("training")
    t.add_argument("--out", type=Path, required=True, help="run folder (checkpoints/, conceptmon.yaml, history.json)")
    t.add_argument("--arch", default=arch,
                   help=f"torchvision model name or package.module:function (default {arch})")
    t.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    t.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    t.add_argument("--lr", type=float, default=lr, help=f"peak learning rate, cosine decay to 0 (default {lr})")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=weight_decay, help=f"default {weight_decay}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N, mps")
    t.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many batches")
    t.add_argument("--tiny", action="store_true",
                   help="CPU smoke settings: 1 epoch, batch 8, 32 px, 8 images per class, 2 steps per epoch")
    c = p.add_argument_group("dissection config written beside the checkpoints")
    c.add_argument("--layers", default="layer2,layer3,layer4", help="layers to dissect (comma-separated)")
    c.add_argument("--probe", default="synthetic", help="probe set: synthetic (offline), broden, cifar100, folder")
    c.add_argument("--probe-root", default=None, help="probe folder (broden: e.g. broden1_224)")
    c.add_argument("--detector", default="netdissect", help="netdissect or clip-dissect")
    c.add_argument("--concepts", default=None,
                   help="concept set for clip-dissect: broden, cifar100, synthetic or a words file "
                        "(default: the probe's own labels)")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply --tiny and data-set dependent defaults; check ranges."""
    if args.tiny:
        args.epochs = min(args.epochs, 1)
        args.batch_size = min(args.batch_size, 8)
        args.image_size = 32
        args.per_class = min(args.per_class or 8, 8)
        args.max_steps = args.max_steps or 2
        args.synthetic_n = min(args.synthetic_n, 48)
    if args.image_size is None:
        args.image_size = {"cifar10": 32, "cifar100": 32, "synthetic": 64}.get(args.dataset, 224)
    if args.dataset == "synthetic" and args.image_size % 2:
        fail(f"--image-size: synthetic images need an even size, got {args.image_size}")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.per_class is not None and args.per_class < 1:
        fail(f"--per-class: must be at least 1, got {args.per_class}")
    if args.lr <= 0:
        fail(f"--lr: must be positive, got {args.lr}")
    if args.data is None and args.dataset != "synthetic":
        fail(f"--data: required for --dataset {args.dataset}; {HOW_TO_GET[args.dataset]}")
    args.layer_list = [s.strip() for s in args.layers.split(",") if s.strip()]
    if not args.layer_list:
        fail("--layers: give at least one layer name, e.g. layer4")
    return args


def pick_device(name: str) -> torch.device:
    device = resolve_device(name)
    stderr_log(f"device: {device}")
    return device


def run_main(fn, argv=None) -> int:
    """Run ``fn(argv)``; a user error prints one line and exits 2 (no traceback)."""
    try:
        fn(argv)
    except ConceptmonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
