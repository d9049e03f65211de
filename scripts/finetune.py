#!/usr/bin/env python
"""Fine-tune an ImageNet-pretrained backbone with a new linear head on an image folder
(the paper's diabetic-retinopathy study), saving a checkpoint per epoch.

--weights imagenet   torchvision's pretrained weights for --arch (downloaded on first use,
                     so it needs internet once, or a filled torch hub cache)
--weights PATH       a state_dict file (or a dict holding one under "state_dict") for --arch
--weights none       random initialisation (for tests and ablations)

The head is replaced by a linear layer with one output per class folder; every weight
that fits is copied from the backbone. The whole network is fine-tuned unless
--freeze-backbone. Epoch 0 is the pretrained backbone with the fresh head.

Data: an ImageFolder, DATA/train/<class>/ and DATA/val/<class>/ (or DATA/<class>/, split
90/10). For diabetic retinopathy: Kaggle's diabetic-retinopathy-detection, train/*.jpeg
sorted into folders 0-4 by trainLabels.csv.

Examples:
  python scripts/finetune.py --data /data/dr_folder --out runs/dr --weights imagenet --arch resnet50
  python scripts/finetune.py --data /tmp/folder --out runs/ft_tiny --weights none --tiny
"""
from __future__ import annotations

import sys
from pathlib import Path

from casestudies.finetuning import freeze_backbone, load_backbone, pretrained_state
from casestudies.options import base_parser, finish_args, run_main
from casestudies.runs import RunFolder, set_up, sgd
from conceptmon.demo.data import Normalizer
from conceptmon.demo.loop import stderr_log


def parser():
    p = base_parser(
        __doc__, dataset="folder", arch="resnet50", epochs=10, batch_size=64, lr=0.01,
        weight_decay=1e-4, image_size=None,
    )
    g = p.add_argument_group("backbone")
    g.add_argument("--weights", default="imagenet",
                   help="imagenet (torchvision's pretrained weights), a state_dict PATH, or none")
    g.add_argument("--freeze-backbone", action="store_true", help="train only the new linear head (BatchNorm statistics still adapt)")
    return p


def main(argv=None) -> None:
    args = finish_args(parser().parse_args(argv))
    setup = set_up(args)
    data, device, model, kwargs = setup.data, setup.device, setup.model, setup.kwargs
    state = pretrained_state(args.arch, args.weights)
    fresh = []
    if state is not None:
        fresh = load_backbone(model, state, args.weights)
        stderr_log(f"loaded {args.weights} into {args.arch}; new (head) tensors: {', '.join(fresh) or 'none'}")
    if args.freeze_backbone:
        freeze_backbone(model, fresh)
    model.to(device)
    run = RunFolder(args.out)
    config = run.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std,
                              run=args.out.resolve().name)
    stderr_log(f"{len(data.train)} training / {len(data.val)} validation images, classes {data.classes}")

    normalize = Normalizer(data.mean, data.std)
    opt = sgd([p for p in model.parameters() if p.requires_grad], args, nesterov=False)
    meta = dict(weights=args.weights if args.weights in ("imagenet", "none") else Path(args.weights).name,
                seed=args.seed)

    run.fit(model, setup.train_dl, setup.val_dl, opt, normalize, device, args, **meta)
    print(f"checkpoints: {run.checkpoints}\nnext: conceptmon dissect --config {config}")


if __name__ == "__main__":
    sys.exit(run_main(main))
