"""What every probe set provides: images, and (for mask-based detectors) annotations.

Concept indices are 0-based positions in ``probe.concepts``; pixel label maps store
``index + 1`` so that 0 means "no label here".

**Fingerprints** stand for a probe set's *content*: the bytes of every file it reads
(index tables, the images and label maps it uses, in order), with their paths relative
to the probe root, its length and its vocabulary. The same files copied to another root,
or touched, give the same fingerprint (shards on different nodes with local copies
agree); any changed byte, image or selection (split, limit) gives another. File hashes
are remembered per machine in ``<user cache>/file-hashes/`` (see :class:`FileHashes`),
so a repeat run only stats the files.
"""
from __future__ import annotations

from ..errors import ConceptmonError

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import store
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
        """Hash of the content: changes when any file used, their order or the labels change,
        not when the same files sit under another root (see the module docstring)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = self._fingerprint = content_fingerprint(
                self.name, len(self), self._content_files(), self.concepts.fingerprint() if self.concepts else "",
                root=self.root,
            )
        return cached

    def _content_files(self) -> list[tuple[str, str | Path]]:
        """(name relative to the probe root, path) of every file whose bytes make up the set, in order."""
        return []


# ----------------------------------------------------------------------------- content fingerprints

FINGERPRINT_FORMAT = 2


def content_fingerprint(name: str, length: int, files: list[tuple[str, str | Path]], extra: str = "",
                        root: Path | None = None) -> str:
    """16 hex digits of sha256 over the probe kind, its length, each file's relative name and
    content hash (in the given order) and ``extra``. ``root`` only picks the hash table."""
    hashes = FileHashes(root)
    h = hashlib.sha256(f"conceptmon probe v{FINGERPRINT_FORMAT}\n{name}\n{length}\n".encode())
    for rel, path in files:
        h.update(f"{rel}\0{hashes.digest(path)}\n".encode())
    h.update(extra.encode())
    hashes.save()
    return h.hexdigest()[:16]


TABLE_FORMAT = 1


class FileHashes:
    """sha256 of files, remembered in a JSON table per probe root (and machine and user).

    An entry is reused while the file's absolute path and its size, mtime_ns, ctime_ns,
    inode and device are unchanged: ctime cannot be set back by tools that preserve
    mtimes, and inode and device name the very file behind any symlink. A missing,
    unreadable or unwritable table only costs a rehash.
    """

    def __init__(self, root: Path | None = None):
        where = str(Path(root).resolve()) if root is not None else ""
        self.table = store.file_hash_table(store.user_cache_dir(), hashlib.sha256(where.encode()).hexdigest()[:16])
        self.known: dict[str, list] = {}
        self.changed = False
        self.cwd = os.getcwd()
        try:
            data = json.loads(self.table.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("format") == TABLE_FORMAT and isinstance(data.get("files"), dict):
                self.known = data["files"]
        except (OSError, ValueError):
            pass

    def digest(self, path: str | Path) -> str:
        key = os.fspath(path)
        if not os.path.isabs(key):  # joined, not normalised or resolved: the stamp identifies the file
            key = os.path.join(self.cwd, key)
        try:
            st = os.stat(key)
        except FileNotFoundError:
            raise ProbeError(f"{path}: not found (the probe set lists it)") from None
        except OSError as e:
            raise ProbeError(f"{path}: unreadable ({e.strerror or e})") from None
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        entry = self.known.get(key)
        if isinstance(entry, list) and len(entry) == len(stamp) + 1 and entry[:-1] == stamp:
            return entry[-1]
        digest = file_sha256(key)
        self.known[key] = [*stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            store.write_text(self.table, json.dumps({"format": TABLE_FORMAT, "files": self.known}, separators=(",", ":")))
        except ConceptmonError:
            pass  # a read-only home: fingerprints stay right, they are just recomputed next time
        self.changed = False


def file_sha256(path: str | Path) -> str:
    """:func:`store.sha256_file`, with an unreadable probe file as one line naming it."""
    try:
        return store.sha256_file(Path(path))
    except OSError as e:
        raise ProbeError(f"{path}: unreadable ({e.strerror or e})") from None


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
