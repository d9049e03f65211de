"""What every probe set provides: images, and (for mask-based detectors) annotations.

Concept indices are 0-based positions in ``probe.concepts``; pixel label maps store
``index + 1`` so that 0 means "no label here".
"""
from __future__ import annotations

from ..errors import ConceptmonError

import hashlib
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..concepts import ConceptSet

# Refuse absurd images rather than let PIL allocate gigabytes (decompression bombs).
Image.MAX_IMAGE_PIXELS = 64_000_000


class ProbeError(ConceptmonError):
    """A probe set that is missing, malformed or unreadable."""


@dataclass
class Annotation:
    """One image's labels at the probe's mask resolution."""

    pixel_maps: np.ndarray
    """(n_maps, mask_h, mask_w) int32, concept index + 1, 0 = unlabelled; n_maps may be 0."""
    image_labels: np.ndarray
    """(n,) int64 concept indices that cover the whole image (scenes, textures)."""
    categories_present: np.ndarray
    """(n_categories,) bool: which of ``probe.category_names`` this image is annotated for."""


class ProbeSet(ABC):
    """A fixed, ordered set of probe images."""

    name: str = ""
    root: Path
    concepts: ConceptSet | None = None
    category_names: tuple[str, ...] = ()
    mask_size: tuple[int, int] | None = None

    @property
    def has_masks(self) -> bool:
        return self.concepts is not None and self.mask_size is not None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def relpath(self, i: int) -> str:
        """Path of image i relative to the probe root (what tables store)."""

    @abstractmethod
    def load_image(self, i: int) -> Image.Image:
        """Image i as RGB; raises ProbeError naming the file when it cannot be read."""

    def load_annotation(self, i: int) -> Annotation:
        raise ProbeError(f"probe set {self.name!r} has no segmentation masks")

    def fingerprint(self) -> str:
        """Changes whenever the images, their order or their labels could have changed."""
        h = hashlib.sha256()
        h.update(f"{self.name}\n{Path(self.root).resolve()}\n{len(self)}\n".encode())
        for p in self._fingerprint_files():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if self.concepts is not None:
            h.update(self.concepts.fingerprint().encode())
        return h.hexdigest()[:16]

    def _fingerprint_files(self) -> list[Path]:
        """Index files whose size and mtime stand for the whole set."""
        return []


def open_rgb(path: Path) -> Image.Image:
    """Open an image fully (so truncation is found now) as RGB, or raise ProbeError."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; a probe image that large is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise ProbeError(f"{path}: image not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ProbeError(f"{path}: image too large (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ProbeError(f"{path}: unreadable image ({e})") from None
