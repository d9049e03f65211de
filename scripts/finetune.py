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

import torch

import _common as common
from conceptmon.checkpoints import CheckpointError, load_state_dict
from conceptmon.training import (
    Normalizer,
    TrainingError,
    seed_everything,
    stderr_log,
)


def parser():
    p = common.base_parser(
        __doc__, dataset="folder", arch="resnet50", epochs=10, batch_size=64, lr=0.01,
        weight_decay=1e-4, image_size=None,
    )
    g = p.add_argument_group("backbone")
    g.add_argument("--weights", default="imagenet",
                   help="imagenet (torchvision's pretrained weights), a state_dict PATH, or none")
    g.add_argument("--freeze-backbone", action="store_true", help="train only the new linear head (BatchNorm statistics still adapt)")
    return p


def pretrained_state(arch: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The backbone weights asked for, or None for --weights none."""
    if weights == "none":
        return None
    if weights == "imagenet":
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(arch)
        except ValueError:
            raise TrainingError(f"--weights imagenet: torchvision has no pretrained weights for {arch!r}; "
                                f"pass a state_dict file instead") from None
        try:
            return enum.DEFAULT.get_state_dict(progress=True, check_hash=True)
        except OSError as e:  # URLError and socket errors are OSErrors
            raise TrainingError(
                f"--weights imagenet: could not download {enum.DEFAULT.url} ({e}); run once on a machine "
                f"with internet (it caches under ~/.cache/torch/hub) or pass --weights PATH"
            ) from None
    path = Path(weights)
    if not path.exists():
        raise TrainingError(f"--weights: {path} not found; pass imagenet, none or a state_dict file")
    try:
        return load_state_dict(path)
    except CheckpointError as e:
        raise TrainingError(f"--weights: {e}") from None


def load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy every weight whose name and shape fit; return the names left at their fresh init."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < len(own) // 2:
        raise TrainingError(
            f"--weights {source}: only {len(fitting)} of {len(own)} tensors fit the model; is --arch right?"
        )
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))


def head_names(fresh: list[str]) -> set[str]:
    """Modules of the parameters left fresh (the new head): what --freeze-backbone keeps training."""
    return {n.rsplit(".", 1)[0] for n in fresh}


def main(argv=None) -> None:
    args = common.finish_args(parser().parse_args(argv))
    seed_everything(args.seed)
    device = common.pick_device(args.device)
    data = common.load_data(args)
    train_dl, val_dl = common.loaders(data, args, device)
    model, kwargs = common.make_model(args.arch, data.num_classes)
    state = pretrained_state(args.arch, args.weights)
    fresh = []
    if state is not None:
        fresh = load_backbone(model, state, args.weights)
        stderr_log(f"loaded {args.weights} into {args.arch}; new (head) tensors: {', '.join(fresh) or 'none'}")
    if args.freeze_backbone:
        if not fresh:
            common.fail("--freeze-backbone: nothing would train (no new head); drop --freeze-backbone "
                        "or use pretrained --weights")
        heads = head_names(fresh)
        for name, p in model.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[0] in heads)
    model.to(device)
    run = common.RunFolder(args.out)
    config = run.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std,
                              run=args.out.resolve().name)
    stderr_log(f"{len(data.train)} training / {len(data.val)} validation images, classes {data.classes}")

    normalize = Normalizer(data.mean, data.std)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    meta = dict(weights=args.weights if args.weights in ("imagenet", "none") else Path(args.weights).name,
                seed=args.seed)

    run.fit(model, train_dl, val_dl, opt, normalize, device, args, **meta)
    print(f"checkpoints: {run.checkpoints}\nnext: conceptmon dissect --config {config}")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
