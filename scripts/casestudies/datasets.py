"""Training data of the case studies: Places365, CIFAR-10/100, image folders, the synthetic task.

Data sets are read from the paths given; nothing is downloaded unless asked for
(``--weights imagenet`` in finetune.py), and a missing data set fails with one line
naming the path and how to obtain it.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from conceptmon.demo.data import IMAGENET_MEAN, IMAGENET_STD, synthetic_classification

from . import TrainingError, fail

DATASETS = ("places365", "cifar10", "cifar100", "folder", "synthetic")

HOW_TO_GET = {
    "places365": (
        "download places365standard_easyformat.tar from http://places2.csail.mit.edu/download.html, "
        "extract it and pass --data places365_standard (the folder holding train/ and val/)"
    ),
    "cifar10": (
        "on a machine with internet run `python -c \"import torchvision; "
        "torchvision.datasets.CIFAR10('ROOT', download=True)\"`, copy ROOT here and pass --data ROOT"
    ),
    "cifar100": (
        "on a machine with internet run `python -c \"import torchvision; "
        "torchvision.datasets.CIFAR100('ROOT', download=True)\"`, copy ROOT here and pass --data ROOT"
    ),
    "folder": (
        "arrange images as an ImageFolder: DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg "
        "(or DATA/<class>/*.jpg, split 90/10 here); for the diabetic-retinopathy study download "
        "Kaggle's diabetic-retinopathy-detection and sort train/*.jpeg into folders 0-4 by trainLabels.csv"
    ),
    "synthetic": "nothing to download: the images are drawn in memory (no --data needed)",
}

# Per-data-set normalisation; the dissection config written beside the checkpoints repeats it.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Data:
    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _transforms(image_size: int, small: bool):
    from torchvision import transforms as T

    if small:  # CIFAR-style: pad-and-crop keeps the whole object in view
        train = T.Compose([T.Resize(image_size), T.RandomCrop(image_size, padding=image_size // 8),
                           T.RandomHorizontalFlip(), T.ToTensor()])
        val = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    else:
        train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
        val = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor()])
    return train, val


def per_class_subset(targets: list[int], per_class: int | None, seed: int) -> list[int]:
    """Indices keeping at most ``per_class`` random images of each class (same for a given seed)."""
    t = torch.as_tensor(targets)
    if per_class is None:
        return list(range(len(t)))
    order = torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))
    keep, counts = [], {}
    for i in order.tolist():
        c = int(t[i])
        if counts.get(c, 0) < per_class:
            counts[c] = counts.get(c, 0) + 1
            keep.append(i)
    return sorted(keep)


def _missing(dataset: str, path: Path, what: str) -> TrainingError:
    return TrainingError(f"{dataset}: {what} not found at {path}; to obtain it: {HOW_TO_GET[dataset]}")


def _image_folder(dataset: str, root: Path, transform):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise _missing(dataset, root, "image folder")
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise TrainingError(f"{dataset}: {root}: not an ImageFolder ({str(e).splitlines()[0]}); "
                            f"to obtain it: {HOW_TO_GET[dataset]}") from None


def _folder_data(dataset: str, root: Path, image_size: int, seed: int):
    """ImageFolder train/val; a folder without train/ and val/ is split 90/10 by the seed."""
    train_tf, val_tf = _transforms(image_size, small=image_size <= 64)
    if not root.exists():
        raise _missing(dataset, root, "data folder")
    if (root / "train").is_dir():
        train = _image_folder(dataset, root / "train", train_tf)
        val_dir = root / "val"
        if not val_dir.is_dir():
            raise _missing(dataset, val_dir, "validation folder")
        val = _image_folder(dataset, val_dir, val_tf)
        if val.classes != train.classes:
            fail(f"{dataset}: {val_dir} has classes {val.classes[:5]}... but {root / 'train'} has "
                 f"{train.classes[:5]}...; both need the same class folders")
        return train, val, train.classes, train.targets
    full_train = _image_folder(dataset, root, train_tf)
    full_val = _image_folder(dataset, root, val_tf)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, len(order) // 10)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    targets = [full_train.targets[i] for i in train_idx]
    return Subset(full_train, train_idx), Subset(full_val, val_idx), full_train.classes, targets


def _cifar(dataset: str, root: Path, image_size: int):
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    train_tf, val_tf = _transforms(image_size, small=True)
    try:
        train = cls(str(root), train=True, download=False, transform=train_tf)
        val = cls(str(root), train=False, download=False, transform=val_tf)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise _missing(dataset, root, f"{cls.base_folder}/") from None
    return train, val, list(train.classes), list(train.targets)


class _TensorDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float().div(255.0), int(self.labels[i])


def _synthetic(n: int, image_size: int, seed: int):
    """The demo's task (scene or texture, 16 classes), rendered in memory; a fifth as many for validation."""
    n_val = max(16, n // 5)
    train_x, train_y, classes = synthetic_classification(n, size=image_size, seed=seed)
    val_x, val_y, _ = synthetic_classification(n_val, size=image_size, seed=seed, split="val")
    return _TensorDataset(train_x, train_y), _TensorDataset(val_x, val_y), list(classes), train_y.tolist()


def load_data(args: argparse.Namespace) -> Data:
    ds = args.dataset
    root = Path(args.data) if args.data is not None else None
    if ds in ("folder", "places365"):
        train, val, classes, targets = _folder_data(ds, root, args.image_size, args.seed)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif ds in ("cifar10", "cifar100"):
        train, val, classes, targets = _cifar(ds, root, args.image_size)
        mean, std = NORMALISATION[ds]
    elif ds == "synthetic":
        train, val, classes, targets = _synthetic(args.synthetic_n, args.image_size, args.seed)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:  # argparse choices make this unreachable from the command line
        fail(f"--dataset: unknown {ds!r}; choices: {', '.join(DATASETS)}")
    if args.per_class is not None:
        train = Subset(train, per_class_subset(targets, args.per_class, args.seed))
    if len(classes) < 2:
        fail(f"{ds}: {root} has {len(classes)} class(es); classification needs at least 2")
    return Data(train, val, list(classes), mean, std)


def loaders(data: Data, args: argparse.Namespace, device: torch.device):
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    gen = torch.Generator().manual_seed(args.seed)
    common = dict(batch_size=args.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    train = DataLoader(data.train, shuffle=True, drop_last=len(data.train) > args.batch_size,
                       generator=gen, **common)
    val = DataLoader(data.val, shuffle=False, **common)
    return train, val

