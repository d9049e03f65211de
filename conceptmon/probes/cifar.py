"""CIFAR-100 as a probe set, read from torchvision's ``cifar-100-python`` folder.

The folder (``probe.root`` itself or ``probe.root/cifar-100-python``) holds three
pickles, ``train``, ``test`` and ``meta``: plain dicts of numpy arrays and lists, written
by Python 2. They are unpickled with an allow-list that admits only numpy's array
reconstruction, so a tampered file cannot run code. Images have no masks: the set
serves CLIP-Dissect, and its 100 class names are the ``concepts: cifar100`` vocabulary.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..concepts import ConceptSet
from ..config import ProbeConfig
from . import register_probe
from .base import ProbeError, ProbeSet

FOLDER = "cifar-100-python"
SPLITS = ("train", "test")
DEFAULT_SPLIT = "test"
DOWNLOAD_HINT = (
    "on a machine with internet run "
    "`python -c \"import torchvision; torchvision.datasets.CIFAR100('DIR', download=True)\"` "
    "and point probe.root at DIR"
)

CIFAR100_FINE_LABELS = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
"""CIFAR-100's fine labels in label order (also in the dataset's ``meta`` file)."""

# CIFAR-100's coarse class "large natural outdoor scenes"; every other class is an object.
SCENE_LABELS = frozenset({"cloud", "forest", "mountain", "plain", "sea"})

# What a CIFAR pickle may contain besides plain containers: numpy arrays (numpy < 2 and
# numpy >= 2 spell the reconstruct function's module differently), and the bytes
# constructor that Python 3 writes for bytes in protocol-2 pickles.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


def cifar100_concepts(label_names: tuple[str, ...] = CIFAR100_FINE_LABELS, source: str = "cifar100") -> ConceptSet:
    """Class names as CLIP words (``aquarium_fish`` -> ``aquarium fish``); the five natural
    outdoor scenes are category ``scene``, the rest ``object``."""
    words = tuple(n.replace("_", " ") for n in label_names)
    cats = tuple("scene" if n in SCENE_LABELS else "object" for n in label_names)
    return ConceptSet(words, cats, source)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} (CIFAR pickles hold only numpy arrays and lists)")


def _str_keys(d: dict) -> dict:
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def read_cifar_pickle(path: Path) -> dict:
    """One CIFAR pickle as a dict with str keys; ProbeError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            # latin1 is how Python 3 must read Python 2 pickles of numpy arrays (as torchvision does).
            data = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise ProbeError(f"{path}: not found (a {FOLDER} folder has train, test and meta); {DOWNLOAD_HINT}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
        raise ProbeError(f"{path}: not a CIFAR-100 python pickle ({e})") from None
    if not isinstance(data, dict):
        raise ProbeError(f"{path}: not a CIFAR-100 python pickle (holds a {type(data).__name__}, expected a dict)")
    return _str_keys(data)


def find_cifar_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for folder in (root, root / FOLDER):
        if (folder / "meta").is_file():
            return folder
    if not root.is_dir():
        raise ProbeError(f"probe.root: {root} not found; {DOWNLOAD_HINT}")
    raise ProbeError(f"probe.root: {root} holds no {FOLDER} files (meta, train, test); {DOWNLOAD_HINT}")


def _label_names(meta: dict, path: Path) -> tuple[str, ...]:
    names = meta.get("fine_label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise ProbeError(f"{path}: no fine_label_names list (is this CIFAR-100's meta file?)")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


class CifarProbe(ProbeSet):
    """CIFAR-100 images of one split, 32x32 RGB, in file order."""

    name = "cifar100"

    def __init__(self, root: str | Path, *, split: str | None = None, limit: int | None = None):
        split = split or DEFAULT_SPLIT
        if split not in SPLITS:
            raise ProbeError(f"probe.split: expected train or test for cifar100, got {split!r}")
        self.folder = find_cifar_folder(root)
        self.root = self.folder
        self.split = split
        self.split_path = self.folder / split
        self.meta_path = self.folder / "meta"
        self.label_names = _label_names(read_cifar_pickle(self.meta_path), self.meta_path)
        data = read_cifar_pickle(self.split_path)
        pixels = data.get("data")
        labels = data.get("fine_labels")
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
            shape = getattr(pixels, "shape", None)
            raise ProbeError(f"{self.split_path}: 'data' must be an (N, 3072) uint8 array, got {shape}")
        if labels is None or len(labels) != len(pixels):
            raise ProbeError(f"{self.split_path}: 'fine_labels' must list one label per image ({len(pixels)})")
        n = len(pixels) if limit is None else min(limit, len(pixels))
        if n == 0:
            raise ProbeError(f"{self.split_path}: no images")
        # Rows are the R, G and B planes one after another, 32x32 each.
        self.images = np.ascontiguousarray(pixels[:n].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8))
        self.fine_labels = np.asarray(labels[:n], dtype=np.int64)
        self.label_concepts = cifar100_concepts(self.label_names, str(self.meta_path))

    def __len__(self) -> int:
        return len(self.images)

    def relpath(self, i: int) -> str:
        return f"{self.split}/{i:06d}"

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def _content_files(self) -> list[tuple[str, Path]]:
        return [(self.split, self.split_path), ("meta", self.meta_path)]


@dataclass
class CifarOptions:
    split: str | None = None
    """train | test (null: test)."""


def cifar_vocabulary(argument: str | None, probe) -> ConceptSet:
    """``concepts: cifar100``: the class names (of the probe itself when it is CIFAR-100)."""
    own = getattr(probe, "label_concepts", None) if getattr(probe, "name", "") == "cifar100" else None
    return own if isinstance(own, ConceptSet) else cifar100_concepts()


def write_example(folder: Path, n: int = 6) -> dict:
    """A tiny ``cifar-100-python`` folder in torchvision's format (random pixels, labels 0..n-1)."""
    files = Path(folder) / FOLDER
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        data = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)),
                b"coarse_labels": [0] * n, b"filenames": [f"{split}_{i}.png".encode() for i in range(n)]}
        with open(files / split, "wb") as f:
            pickle.dump(data, f, protocol=2)
    with open(files / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in CIFAR100_FINE_LABELS], b"coarse_label_names": []}, f,
                    protocol=2)
    return {"name": "cifar100", "root": str(folder), "split": "test"}


@register_probe("cifar100", options=CifarOptions, vocabulary=cifar_vocabulary, example=write_example)
def cifar_from_config(cfg: ProbeConfig) -> CifarProbe:
    if not cfg.root:
        raise ProbeError(f"probe.root: required for probe cifar100 (the folder holding {FOLDER}); {DOWNLOAD_HINT}")
    return CifarProbe(cfg.root, split=cfg.split, limit=cfg.limit)
