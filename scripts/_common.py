"""What the case-study training scripts share: options, data sets, run folders, configs.

A run folder written by any script::

    OUT/checkpoints/epoch_NNNN.pt   one per epoch (or per pruning stage), epoch 0 = before training
    OUT/conceptmon.yaml             config that `conceptmon dissect --config OUT/conceptmon.yaml` takes as is
    OUT/history.json                per-epoch accuracies

Data sets are read from the paths given; nothing is downloaded unless asked for
(``--weights imagenet`` in finetune.py), and a missing data set fails with one line
naming the path and how to obtain it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

# Let the scripts run from a source checkout without installing the package.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from conceptmon import store  # noqa: E402
from conceptmon.config import ModelConfig  # noqa: E402
from conceptmon.errors import ConceptmonError  # noqa: E402
from conceptmon.models import build_model, resolve_device  # noqa: E402
from conceptmon.training import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochRecord,
    TrainingError,
    checkpoint_name,
    cosine_lr,
    dissect_config,
    evaluate,
    save_checkpoint,
    stderr_log,
    train_one_epoch,
    write_config,
)

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


def fail(message: str) -> None:
    raise TrainingError(message)


# ----------------------------------------------------------------------------- options


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


# ----------------------------------------------------------------------------- data


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
    """The demo's task (scene or texture, 16 classes), rendered in memory; a fifth for validation."""
    from conceptmon.training import synthetic_classification

    n_val = max(16, n // 5)
    train_x, train_y, classes = synthetic_classification(n, size=image_size, seed=seed)
    val_x, val_y, _ = synthetic_classification(n_val, size=image_size, seed=seed, first=n)
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


# ----------------------------------------------------------------------------- model, run folder


def make_model(arch: str, num_classes: int) -> tuple[torch.nn.Module, dict]:
    """A fresh model and the kwargs that rebuild it from the config (model.kwargs)."""
    kwargs = {"num_classes": num_classes}
    return build_model(ModelConfig(arch=arch, kwargs=kwargs)), kwargs


def pick_device(name: str) -> torch.device:
    device = resolve_device(name)
    stderr_log(f"device: {device}")
    return device


class RunFolder:
    """Checkpoints, config and history of one training run."""

    def __init__(self, out: Path, ckpt_folder: str = "checkpoints"):
        self.out = Path(out)
        self.checkpoints = self.out / ckpt_folder
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []

    def save(self, model: torch.nn.Module, epoch: int, **meta) -> Path:
        return save_checkpoint(self.checkpoints / checkpoint_name(epoch), model, epoch, **meta)

    def record(self, rec: EpochRecord, unit: str = "epoch", history_name: str = "history.json") -> None:
        print(rec.line(unit), flush=True)
        self.history.append(rec.as_dict())
        store.write_json(self.out / history_name, self.history)

    def fit(self, model, train_dl, val_dl, opt, normalize, device, args: argparse.Namespace, **meta) -> None:
        """Checkpoint before training (epoch 0), then train with a cosine schedule and
        checkpoint after every epoch, recording losses and accuracies."""
        steps_per_epoch = min(len(train_dl), args.max_steps or len(train_dl))
        total_steps = steps_per_epoch * args.epochs
        start = time.monotonic()
        val_acc = evaluate(model, val_dl, normalize, device, max_steps=args.max_steps)
        self.save(model, 0, val_acc=val_acc, **meta)
        self.record(EpochRecord(0, None, None, val_acc, time.monotonic() - start))
        step = 0
        for epoch in range(1, args.epochs + 1):
            start = time.monotonic()
            loss, acc, taken = train_one_epoch(
                model, train_dl, opt, normalize, device, lr_at=lambda s: cosine_lr(args.lr, s, total_steps),
                first_step=step, max_steps=args.max_steps, progress=stderr_log,
            )
            step += taken
            val_acc = evaluate(model, val_dl, normalize, device, max_steps=args.max_steps)
            self.save(model, epoch, val_acc=val_acc, train_acc=acc, **meta)
            self.record(EpochRecord(epoch, loss, acc, val_acc, time.monotonic() - start))

    def write_config(self, args: argparse.Namespace, *, arch: str, kwargs: dict, mean, std, run: str,
                     name: str = "conceptmon.yaml", dissect_out: str = "conceptmon_out") -> Path:
        probe = {"name": args.probe, "image_size": args.image_size, "mean": list(mean), "std": list(std)}
        if args.probe_root:
            probe["root"] = str(Path(args.probe_root).resolve())
        data = dissect_config(
            arch=arch, kwargs=kwargs, layers=args.layer_list, checkpoints=self.checkpoints,
            out=self.out / dissect_out, run=run, probe=probe, detector={"name": args.detector},
            concepts=args.concepts,
        )
        path = self.out / name
        write_config(path, data)
        return path


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
