#!/usr/bin/env python
"""Standard training with a checkpoint per epoch (the paper's training-dynamics study).

The paper: ResNet-18 from scratch on Places365 with 1,000 training images per class,
30 epochs, batch 256, SGD lr 0.1 with cosine decay. Also CIFAR-10/100 and any
ImageFolder. Writes OUT/checkpoints/epoch_0000.pt (before training) .. epoch_NNNN.pt
and OUT/conceptmon.yaml, then: conceptmon dissect --config OUT/conceptmon.yaml

Examples:
  python scripts/train_standard.py --data /data/places365_standard --out runs/places_r18
  python scripts/train_standard.py --dataset cifar10 --data /data/cifar --out runs/c10 --epochs 50 --lr 0.1
  python scripts/train_standard.py --dataset synthetic --out runs/tiny --tiny
"""
from __future__ import annotations

import sys

from casestudies.options import base_parser, finish_args, run_main
from casestudies.runs import RunFolder, set_up, sgd
from conceptmon.demo.data import Normalizer
from conceptmon.demo.loop import stderr_log


def parser():
    return base_parser(
        __doc__, dataset="places365", arch="resnet18", epochs=30, batch_size=256, lr=0.1,
        weight_decay=1e-4, image_size=None, per_class=1000,
    )


def main(argv=None) -> None:
    args = finish_args(parser().parse_args(argv))
    setup = set_up(args)
    data, device, model, kwargs = setup.data, setup.device, setup.model.to(setup.device), setup.kwargs
    run = RunFolder(args.out)
    config = run.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std,
                              run=args.out.resolve().name)
    stderr_log(f"{args.dataset}: {len(data.train)} training / {len(data.val)} validation images, "
               f"{data.num_classes} classes; config: {config}")

    normalize = Normalizer(data.mean, data.std)
    opt = sgd(model.parameters(), args)

    run.fit(model, setup.train_dl, setup.val_dl, opt, normalize, device, args, dataset=args.dataset, seed=args.seed)
    print(f"checkpoints: {run.checkpoints}\nnext: conceptmon dissect --config {config}")


if __name__ == "__main__":
    sys.exit(run_main(main))
