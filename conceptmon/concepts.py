"""Concept sets: the words a detector can assign, each with a category.

Categories follow Broden: color, texture, material, object, part, scene; a concept
without one is ``other``.
"""
from __future__ import annotations

from .errors import ConceptmonError

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

BRODEN_CATEGORIES = ("color", "texture", "material", "object", "part", "scene")
OTHER = "other"

_SUFFIX = re.compile(r"-[a-z]$")


class ConceptError(ConceptmonError):
    """A concept file or concept-set name that cannot be used."""


def normalise_name(name: str) -> str:
    """How names are compared (class names vs concept names): Broden suffix dropped,
    lower case, ``_`` and ``-`` as spaces, whitespace collapsed (``Living_Room-s`` -> ``living room``)."""
    text = strip_broden_suffix(str(name)).lower().replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def strip_broden_suffix(name: str) -> str:
    """``red-c`` -> ``red``; Broden marks some names with a one-letter category suffix."""
    return _SUFFIX.sub("", name.strip())


@dataclass(frozen=True)
class ConceptSet:
    names: tuple[str, ...]
    categories: tuple[str, ...]
    source: str = ""

    def __post_init__(self):
        if len(self.names) != len(self.categories):
            raise ValueError("names and categories differ in length")

    def __len__(self) -> int:
        return len(self.names)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n, c in zip(self.names, self.categories):
            h.update(f"{n}\t{c}\n".encode("utf-8"))
        return h.hexdigest()[:16]

    def merged(self) -> "ConceptSet":
        """One entry per name (the first category seen wins): CLIP sees words, not categories."""
        seen: dict[str, str] = {}
        for n, c in zip(self.names, self.categories):
            seen.setdefault(n, c)
        return ConceptSet(tuple(seen), tuple(seen.values()), self.source)


def read_words_file(path: str | Path) -> ConceptSet:
    """One concept per line, blank lines ignored, optional ``word<TAB>category``; duplicates merged."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConceptError(f"{path}: concept file not found") from None
    except UnicodeDecodeError as e:
        raise ConceptError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    names: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        word, _, cat = line.partition("\t")
        word = word.strip()
        names.setdefault(word, cat.strip() or OTHER)
    if not names:
        raise ConceptError(f"{path}: no concepts (expected one word per line)")
    return ConceptSet(tuple(names), tuple(names.values()), str(path))
