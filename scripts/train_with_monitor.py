#!/usr/bin/env python
"""conceptmon.Monitor in a plain PyTorch loop: dissect the live model after every epoch, no checkpoints.

Trains the demo's narrow ResNet on its synthetic scene-or-texture task (offline, seconds
on a CPU with the defaults) and prints what Monitor.observe saw per epoch; the tables go
to OUT/dissect as `conceptmon dissect` would write them.

  python scripts/train_with_monitor.py --out runs/monitor --epochs 3
"""
import argparse

import torch
import torch.nn.functional as F

import conceptmon
from conceptmon.demo.data import Normalizer, synthetic_classification
from conceptmon.demo.model import MODEL_ARCH, small_resnet
from conceptmon.devices import resolve_device


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the monitor writes (OUT/dissect, OUT/probe)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=64, help="training images to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N, mps")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    images, labels, classes = synthetic_classification(args.images, size=32, seed=args.seed)
    images, labels = images.to(device), labels.to(device)
    kwargs = {"num_classes": len(classes), "widths": [8, 8, 16, 16]}
    model, normalize = small_resnet(**kwargs).to(device), Normalizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = conceptmon.Monitor({
        "model": {"arch": MODEL_ARCH, "kwargs": kwargs}, "layers": ["layer3", "layer4"], "out": args.out,
        "probe": {"name": "synthetic", "root": f"{args.out}/probe", "n": 40, "image_size": 32, "seed": args.seed},
    }, log=lambda message: None)
    for epoch in range(args.epochs + 1):  # epoch 0 observes the initialisation
        if epoch > 0:
            model.train()
            for batch in torch.randperm(len(labels), device=device).split(16):
                loss = F.cross_entropy(model(normalize(images[batch].float() / 255)), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        seen = monitor.observe(model, epoch).summary
        print(f"epoch {epoch}: " + ", ".join(f"{layer} {s['interpretable']}/{s['neurons']} interpretable, "
                                             f"{s['concepts']} concepts" for layer, s in seen.items()), flush=True)


if __name__ == "__main__":
    main()
