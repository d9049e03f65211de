"""The demo's data: a scene-or-texture classification task drawn by the synthetic probe generator.

Images are uint8 tensors in memory, scaled to [0, 1] per batch; normalisation happens
inside the training loop (:class:`Normalizer`), so saved checkpoints hold the plain
model and the dissection config carries the same mean and std.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import ConceptmonError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "val")
SCAN_LIMIT = 20
"""Generator images looked at per image kept, before concluding the generator draws no labelled ones."""


class DataError(ConceptmonError):
    """Synthetic task settings that cannot be drawn."""


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
    from ..probes.synthetic import SCENES, TEXTURES

    return tuple(SCENES) + tuple(TEXTURES)


def task_seed(seed: int, split: str) -> int:
    """The generator seed of one split of the task: apart from the probe set drawn with ``seed``
    itself, and from the other split."""
    if split not in SPLITS:
        raise DataError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    return int(np.random.SeedSequence([seed, 7, SPLITS.index(split)]).generate_state(1)[0])


def synthetic_classification(
    n: int, size: int = 64, seed: int = 0, *, split: str = "train",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Which scene or texture an image of the synthetic probe generator shows.

    The images are the generator's own (:func:`conceptmon.probes.synthetic.render_image`),
    drawn with a seed of their own per split (:func:`task_seed`), so the training and
    validation images are apart from each other and from a probe set of the same
    ``seed``. Images showing neither a scene nor a texture are passed over. Recognising
    scenes and textures makes units of the last layers turn into detectors of the regions
    and patterns the probe set annotates (the demo's point). Class shares follow the
    generator's; :func:`chance_accuracy` gives what a constant guess scores.

    Returns (N, 3, size, size) uint8 images, (N,) int64 labels and the class names.
    """
    from ..probes.synthetic import COLORS, PALETTE, render_image

    if size < 16 or size % 2:
        raise DataError(f"image size: synthetic images need an even size of at least 16 pixels, got {size}")
    if n < 1:
        raise DataError(f"number of synthetic images: must be at least 1, got {n}")
    classes = synthetic_classes()
    position = {name: k for k, name in enumerate(classes)}
    rgb = np.asarray([PALETTE[c] for c in COLORS], dtype=np.uint8)
    generator_seed = task_seed(seed, split)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    kept = 0
    for i in range(SCAN_LIMIT * n):
        # The generator draws at mask resolution; each mask pixel is a 2x2 block.
        canvas, scene, texture = render_image(i, size // 2, generator_seed)
        name = scene or texture
        if name is None:
            continue
        images[kept] = rgb[canvas.color].repeat(2, axis=0).repeat(2, axis=1)
        labels[kept] = position[name]
        kept += 1
        if progress is not None:
            progress(kept, n)
        if kept == n:
            return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), classes
    raise DataError(f"synthetic generator: only {kept} of {SCAN_LIMIT * n} images show a scene or texture; "
                    f"{n} were asked for")


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy of always guessing the most frequent class of ``labels``."""
    return float(torch.bincount(labels.long()).max()) / len(labels)
