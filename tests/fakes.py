"""Small in-memory probe sets and models for engine tests (no files needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conceptmon.concepts import ConceptSet
from conceptmon.probes.base import Annotation, ProbeSet


class ArrayProbe(ProbeSet):
    """Images and annotations held in arrays; categories: colour (pixel) and scene (image)."""

    name = "array"

    def __init__(self, images: np.ndarray, pixel_maps: np.ndarray, image_labels: list[list[int]],
                 concepts: ConceptSet, categories=("color", "scene"), present: np.ndarray | None = None):
        self.images = images  # (N, H, W, 3) uint8
        self.pixel_maps = pixel_maps  # (N, n_maps, h, w) int, concept index + 1
        self.image_labels = image_labels
        self.concepts = concepts
        self.category_names = tuple(categories)
        self.mask_size = tuple(pixel_maps.shape[2:])
        self.root = Path(".")
        n = len(images)
        self.present = present if present is not None else np.ones((n, len(categories)), dtype=bool)

    def __len__(self):
        return len(self.images)

    def relpath(self, i):
        return f"img{i:03d}.png"

    def load_image(self, i):
        return Image.fromarray(self.images[i])

    def load_annotation(self, i):
        return Annotation(self.pixel_maps[i], np.asarray(self.image_labels[i], dtype=np.int64), self.present[i])

    def fingerprint(self):
        return f"array-{len(self)}-{int(self.images.sum())}-{int(self.pixel_maps.sum())}"


def random_probe(n=12, size=16, mask=8, n_concepts=5, seed=0) -> ArrayProbe:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    maps = rng.integers(0, n_concepts, size=(n, 2, mask, mask))  # 0 = unlabelled
    maps[:, 0, : mask // 2] = 0
    image_labels = [[int(rng.integers(3, n_concepts))] if i % 2 else [] for i in range(n)]
    cats = ["color", "color", "color", "scene", "scene"][:n_concepts]
    concepts = ConceptSet(tuple(f"c{i}" for i in range(n_concepts)), tuple(cats))
    present = np.ones((n, 2), dtype=bool)
    present[::2, 1] = False  # even images carry no scene annotation
    return ArrayProbe(images, maps.astype(np.int32), image_labels, concepts, present=present)


class TinyConv(torch.nn.Module):
    def __init__(self, width=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(width, 3)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))
