"""Small models and training loops shared by the demo and the case-study scripts.

Everything here trains on images in [0, 1]; normalisation happens inside the loop
(:class:`Normalizer`) so that adversarial attacks work in pixel space and the saved
checkpoints hold the plain model (the dissection config carries the same mean/std).

Checkpoints are plain dicts ``{"epoch": int, "state_dict": {...}, ...metadata}``
readable with ``torch.load(..., weights_only=True)``: what ``conceptmon dissect`` reads.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.models.resnet import BasicBlock

from . import store
from .config import Config, config_from_dict
from .errors import ConceptmonError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainingError(ConceptmonError):
    """Training data or settings that cannot be used (missing data set, bad option)."""


# ----------------------------------------------------------------------------- models


class SmallResNet(nn.Module):
    """A narrow ResNet with torchvision's layer names (conv1, bn1, layer1..layer4, fc).

    Keeping torchvision's names means the same ``layers: [layer2, layer3, layer4]``
    config works for the demo model and for a real ResNet-18.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Iterable[int] = (16, 32, 64, 128),
        blocks: Iterable[int] = (1, 1, 1, 1),
        stem_stride: int = 2,
    ):
        super().__init__()
        widths, blocks = [int(w) for w in widths], [int(b) for b in blocks]
        if len(widths) != 4 or len(blocks) != 4:
            raise TrainingError(f"model.kwargs: widths and blocks need 4 entries each, got {widths} and {blocks}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(n):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or in_ch != w:
                    down = nn.Sequential(nn.Conv2d(in_ch, w, 1, stride=s, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(in_ch, w, stride=s, downsample=down))
                in_ch = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(
    num_classes: int = 10,
    widths: Iterable[int] = (16, 32, 64, 128),
    blocks: Iterable[int] = (1, 1, 1, 1),
    stem_stride: int = 2,
) -> SmallResNet:
    """Factory for ``model.arch: "conceptmon.training:small_resnet"``."""
    return SmallResNet(num_classes=num_classes, widths=widths, blocks=blocks, stem_stride=stem_stride)


# ----------------------------------------------------------------------------- determinism


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Deterministic kernels where they exist; warn (not fail) where an op has none.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- data


class Normalizer:
    """(x - mean) / std on the batch's device: the model sees normalised input, attacks see [0, 1]."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


class TensorBatches:
    """Batches of an in-memory uint8 image tensor, reshuffled per epoch from one seeded generator.

    Cheaper than a DataLoader for the demo's few thousand small images, and deterministic.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        flip: bool = False,
        generator: torch.Generator | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a (N, 3, H, W) uint8 tensor")
        self.images, self.labels = images, labels.long()
        self.batch_size, self.shuffle, self.flip = batch_size, shuffle, flip
        self.generator = generator or torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx].float().div_(255.0)
            if self.flip:
                flip = torch.rand(len(idx), generator=self.generator) < 0.5
                x[flip] = x[flip].flip(-1)
            yield x, self.labels[idx]


def synthetic_classes() -> tuple[str, ...]:
    """Classes of :func:`synthetic_classification`: the generator's scenes, then its textures."""
    from .probes.synthetic import SCENES, TEXTURES

    return tuple(SCENES) + tuple(TEXTURES)


def synthetic_classification(
    n: int, size: int = 64, seed: int = 0, *, first: int = 0, progress: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """A classification task drawn by the synthetic probe generator, rendered in memory.

    Each image shows one of the generator's scenes (beach, field, street, room, forest,
    desert: procedural layouts of sky, sea, sand, grass, road, floor, houses, trees) or
    one of its whole-image textures (striped, dotted, ...), with one shape drawn on top
    as a distractor; the label is the scene or texture (16 classes, balanced: image i
    shows class i % 16). Recognising scenes and textures makes units of the last layers
    turn into detectors of the regions and patterns the probe set annotates (the demo's
    point). Images ``first .. first + n - 1`` of the seeded sequence: disjoint index
    ranges give disjoint train and validation sets.

    Returns (N, 3, size, size) uint8 images, (N,) int64 labels and the class names.
    """
    from .probes.synthetic import COLORS, PALETTE, SCENES, SHAPES, Canvas, draw_scene, draw_shape, texture_colors

    if size < 16 or size % 2:
        raise TrainingError(f"image size: synthetic images need an even size of at least 16 pixels, got {size}")
    if n < 1:
        raise TrainingError(f"number of synthetic images: must be at least 1, got {n}")
    classes = synthetic_classes()
    rgb = np.asarray([PALETTE[c] for c in COLORS], dtype=np.uint8)
    m = size // 2  # the generator draws at mask resolution; each mask pixel is a 2x2 block
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for j in range(n):
        i = first + j
        rng = np.random.default_rng([seed, 7, i])
        canvas = Canvas(m)
        label = i % len(classes)
        if label < len(SCENES):
            draw_scene(canvas, rng, classes[label])
        else:
            canvas.color[:] = texture_colors(classes[label], m, rng, canvas.x, canvas.y)
        draw_shape(canvas, rng, SHAPES[(i // len(classes)) % len(SHAPES)])
        images[j] = rgb[canvas.color].repeat(2, axis=0).repeat(2, axis=1)
        labels[j] = label
        if progress is not None:
            progress(j + 1, n)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), classes


# ----------------------------------------------------------------------------- schedules, pruning


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total_steps`` (no restarts)."""
    if total_steps <= 0:
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Convolution and linear weights: what lottery-ticket pruning removes (not biases or BN)."""
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def global_magnitude_masks(
    model: nn.Module, fraction: float, masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks that remove ``fraction`` of the still-unpruned weights with the smallest |w|,
    ranked globally over all prunable layers (as in the lottery-ticket experiments)."""
    if not 0 <= fraction < 1:
        raise TrainingError(f"--prune-fraction: must be in [0, 1), got {fraction}")
    weights = prunable_weights(model)
    masks = masks or {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    alive = torch.cat([w.detach().abs()[masks[k]].flatten().float().cpu() for k, w in weights.items()])
    n_prune = int(round(fraction * alive.numel()))
    if n_prune == 0:
        return {k: m.clone() for k, m in masks.items()}
    cutoff = torch.kthvalue(alive, n_prune).values
    new = {}
    for k, w in weights.items():
        keep = w.detach().abs().cpu() > cutoff
        new[k] = (masks[k].cpu() & keep).to(w.device)
    return new


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Zero pruned weights in place (after init, rewinding and every optimiser step)."""
    if not masks:
        return
    weights = prunable_weights(model)
    for k, m in masks.items():
        weights[k].mul_(m.to(weights[k].device, weights[k].dtype))


def sparsity(masks: dict[str, torch.Tensor] | None) -> float:
    """Share of prunable weights removed."""
    if not masks:
        return 0.0
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total


# ----------------------------------------------------------------------------- attacks


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalize: Normalizer,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l-infinity PGD (Madry et al.) in [0, 1] pixel space; returns the adversarial batch."""
    was_training = model.training
    model.eval()  # attack the current weights without touching BatchNorm statistics
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        adv = (x + eps * noise).clamp_(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(normalize(adv)), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 1)
    model.train(was_training)
    return adv.detach()


@dataclass
class PGDSettings:
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10


# ----------------------------------------------------------------------------- loops


def _progress(log: Callable[[str], None] | None, label: str, i: int, n: int, every_s: float, last: list):
    if log is None:
        return
    now = time.monotonic()
    if i == n or now - last[0] >= every_s:
        last[0] = now
        log(f"{label} {i}/{n}")


def stderr_log(msg: str) -> None:
    """Progress goes to stderr so that stdout keeps only results."""
    print(msg, file=sys.stderr, flush=True)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    normalize: Normalizer,
    device: torch.device,
    *,
    lr_at: Callable[[int], float] | None = None,
    first_step: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
    adversary: PGDSettings | None = None,
    max_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float, int]:
    """One pass over ``batches``; returns (mean loss, accuracy, steps taken).

    ``lr_at(step)`` sets the learning rate per step (global step = first_step + i);
    ``masks`` are re-applied after every step so pruned weights stay zero;
    ``adversary`` trains on PGD examples instead of clean ones.
    """
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    n = len(batches) if hasattr(batches, "__len__") else 0
    if max_steps is not None:
        n = min(n, max_steps) if n else max_steps
    last = [time.monotonic()]
    for x, y in batches:
        if max_steps is not None and steps >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if adversary is not None:
            x = pgd_attack(model, x, y, normalize, eps=adversary.eps, alpha=adversary.alpha,
                           steps=adversary.steps, generator=generator)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(first_step + steps)
        logits = model(normalize(x))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        apply_masks(model, masks)
        steps += 1
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        _progress(progress, "train batch", steps, n, 2.0, last)
    return total_loss / max(seen, 1), correct / max(seen, 1), steps


def evaluate(
    model: nn.Module,
    batches: Iterable,
    normalize: Normalizer,
    device: torch.device,
    *,
    adversary: PGDSettings | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Top-1 accuracy, on clean inputs or (with ``adversary``) on PGD examples."""
    model.eval()
    correct, seen = 0, 0
    for i, (x, y) in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            break
        x, y = x.to(device), y.to(device)
        if adversary is not None:
            x = pgd_attack(model, x, y, normalize, eps=adversary.eps, alpha=adversary.alpha,
                           steps=adversary.steps, generator=generator)
        with torch.no_grad():
            correct += int((model(normalize(x)).argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


# ----------------------------------------------------------------------------- checkpoints, configs


def checkpoint_payload(model: nn.Module, epoch: int, **meta) -> dict:
    """What ``conceptmon dissect`` reads: epoch, a CPU state_dict, plain metadata only."""
    for k, v in meta.items():
        if not isinstance(v, (int, float, str, bool)) and v is not None:
            raise TypeError(f"checkpoint metadata {k!r} must be a plain int/float/str/bool, got {type(v).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"epoch": int(epoch), "state_dict": state, **meta}


def save_checkpoint(path: Path, model: nn.Module, epoch: int, **meta) -> Path:
    """Write atomically so that a dissect job watching the folder never reads half a file."""
    path = Path(path)
    with store.atomic_path(path) as tmp:
        torch.save(checkpoint_payload(model, epoch, **meta), tmp)
    return path


def checkpoint_name(epoch: int) -> str:
    return f"{store.epoch_stem(epoch)}.pt"


def dissect_config(
    *,
    arch: str,
    kwargs: dict,
    layers: list[str],
    checkpoints: Path,
    out: Path,
    run: str,
    probe: dict,
    detector: dict | None = None,
    embedding: dict | None = None,
    concepts: str | None = None,
    batch_size: int = 64,
) -> dict:
    """A config dict that ``conceptmon dissect --config`` takes as is (validated here)."""
    data = {
        "run": run,
        "model": {"arch": arch, "kwargs": dict(kwargs)},
        "layers": list(layers),
        "checkpoints": str(Path(checkpoints).resolve()),
        "out": str(Path(out).resolve()),
        "probe": dict(probe),
        "detector": dict(detector or {"name": "netdissect"}),
        "batch_size": batch_size,
        "device": "auto",
    }
    if embedding:
        data["embedding"] = dict(embedding)
    if concepts:
        data["concepts"] = concepts
    config_from_dict(data, source="generated config")  # a bad value fails here, not at dissect time
    return data


def write_config(path: Path, data: dict) -> Config:
    """Write ``data`` as YAML (atomically) and return it parsed as a Config."""
    store.write_text(path, yaml.safe_dump(data, sort_keys=False))
    return config_from_dict(data, source=str(path))


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float | None
    train_acc: float | None
    val_acc: float
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    def line(self, unit: str = "epoch") -> str:
        parts = [f"{unit} {self.epoch:3d}"]
        if self.train_acc is not None:
            parts.append(f"train loss {self.train_loss:.3f} acc {100 * self.train_acc:5.1f}%")
        parts.append(f"val acc {100 * self.val_acc:5.1f}%")
        parts += [f"{k} {100 * v:5.1f}%" if isinstance(v, float) and k.endswith("acc") else f"{k} {v}"
                  for k, v in self.extra.items()]
        parts.append(f"({self.seconds:.1f} s)")
        return "  ".join(parts)
