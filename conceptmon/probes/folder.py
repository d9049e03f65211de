"""Any folder of images as a probe set (CLIP-Dissect only: no masks, no labels).

Images are found recursively, in sorted relative-path order, skipping hidden files and
folders. Each candidate's header is checked once when the set is opened: files that are
not readable images are left out, counted and reported in one warning; only a folder in
which none can be read is an error. A file whose header is fine but whose pixel data is
damaged still fails later, with a ProbeError naming it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from ..config import ProbeConfig
from . import register_probe
from .base import ProbeError, ProbeSet, open_rgb

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def list_image_files(root: Path) -> list[Path]:
    """Files with an image suffix under ``root``, sorted by relative path, hidden ones skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` is not a readable image (None when its header checks out)."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Image.DecompressionBombError:
        return f"over {Image.MAX_IMAGE_PIXELS} pixels"
    except (OSError, ValueError, SyntaxError) as e:
        return str(e) or type(e).__name__
    return None


class FolderProbe(ProbeSet):
    name = "folder"

    def __init__(self, root: str | Path, *, limit: int | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ProbeError(f"probe.root: {root} is not a folder (probe folder reads any folder of images)")
        self.root = root
        candidates = list_image_files(root)
        if not candidates:
            raise ProbeError(
                f"probe.root: no image files under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.files: list[Path] = []
        self.unreadable: list[tuple[str, str]] = []
        """(relative path, reason) of every skipped file."""
        for path in candidates:
            if limit is not None and len(self.files) >= limit:
                break
            reason = unreadable_reason(path)
            if reason is None:
                self.files.append(path)
            else:
                self.unreadable.append((path.relative_to(root).as_posix(), reason))
        if not self.files:
            first, why = self.unreadable[0]
            raise ProbeError(
                f"probe.root: none of the {len(self.unreadable)} image files under {root} is readable "
                f"(first: {first}: {why})"
            )
        if self.unreadable:
            first, why = self.unreadable[0]
            warnings.warn(
                f"probe folder {root}: skipped {len(self.unreadable)} unreadable of "
                f"{len(self.unreadable) + len(self.files)} image files (first: {first}: {why})",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.files)

    def relpath(self, i: int) -> str:
        return self.files[i].relative_to(self.root).as_posix()

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self.files[i])

    def _content_files(self) -> list[tuple[str, Path]]:
        """Every image used, by relative path: an edited, added or removed image changes the fingerprint."""
        return [(self.relpath(i), p) for i, p in enumerate(self.files)]


def write_example(folder: Path) -> dict:
    """A few solid-colour PNGs in nested folders."""
    for i, rgb in enumerate([(255, 0, 0), (0, 160, 0), (0, 0, 255), (250, 250, 0), (20, 20, 20)]):
        path = Path(folder) / f"set{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), rgb).save(path)
    return {"name": "folder", "root": str(folder)}


@register_probe("folder", example=write_example)
def folder_from_config(cfg: ProbeConfig) -> FolderProbe:
    if not cfg.root:
        raise ProbeError("probe.root: required for probe folder (a folder of images, searched recursively)")
    return FolderProbe(cfg.root, limit=cfg.limit)
