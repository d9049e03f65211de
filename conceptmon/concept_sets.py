"""The ``concepts:`` config value turned into a ConceptSet (the words CLIP-Dissect can assign).

``broden``             Broden's label.csv (suffixes dropped, duplicates merged) from the probe
                       folder, or ``broden:/path/to/broden1_224`` for another folder
``cifar100``           CIFAR-100's 100 class names
``synthetic``          the synthetic probe set's vocabulary
``path/to/words.txt``  one concept per line, optional ``word<TAB>category``
null                   the probe set's own label names, when it has any

A relative words-file path is looked up from the working directory, then beside the config.
Every set comes back merged (one entry per word): CLIP sees words, not categories.
"""
from __future__ import annotations

from pathlib import Path

from .concepts import ConceptError, ConceptSet, read_words_file
from .probes.base import ProbeSet

NAMED_SETS = ("broden", "cifar100", "synthetic")
_CHOICES = "broden, broden:/path/to/broden, cifar100, synthetic or path/to/words.txt"


def _broden_root(probe: ProbeSet | None) -> Path:
    root = getattr(probe, "root", None)
    if root is not None and (Path(root) / "label.csv").is_file():
        return Path(root)
    name = getattr(probe, "name", None)
    raise ConceptError(
        f"concepts: broden reads label.csv from the probe folder, but probe {name!r} has none; "
        f"write concepts: broden:/path/to/broden1_224"
    )


def probe_label_concepts(probe: ProbeSet | None) -> ConceptSet | None:
    """The label names a probe set carries (Broden-format masks, CIFAR classes), merged."""
    if probe is None:
        return None
    if probe.concepts is not None and len(probe.concepts):
        return probe.concepts.merged()
    labels = getattr(probe, "label_concepts", None)
    if isinstance(labels, ConceptSet) and len(labels):
        return labels.merged()
    return None


def load_concepts(spec: str | None, probe: ProbeSet | None, *, base: str | Path | None = None) -> ConceptSet:
    """Resolve ``concepts:`` (see the module doc); ``base`` is the config file's folder."""
    if spec is None or not str(spec).strip():
        own = probe_label_concepts(probe)
        if own is None:
            name = getattr(probe, "name", None)
            raise ConceptError(f"concepts: not set and probe {name!r} has no label names; set concepts: to {_CHOICES}")
        return own
    spec = str(spec).strip()
    if spec == "broden" or spec.startswith("broden:"):
        from .probes.broden import read_broden_concepts

        given = spec[len("broden:") :].strip()
        return read_broden_concepts(Path(given).expanduser() if given else _broden_root(probe)).merged()
    if spec == "cifar100":
        from .probes.cifar import cifar100_concepts

        own = getattr(probe, "label_concepts", None) if getattr(probe, "name", "") == "cifar100" else None
        return (own if isinstance(own, ConceptSet) else cifar100_concepts()).merged()
    if spec == "synthetic":
        from .probes.synthetic import synthetic_concepts

        return synthetic_concepts().merged()
    return read_words_file(_words_path(spec, base)).merged()


def _words_path(spec: str, base: str | Path | None) -> Path:
    path = Path(spec).expanduser()
    if path.is_file() or path.is_absolute() or base is None:
        candidate = path
    else:
        candidate = Path(base) / path
    if not candidate.is_file():
        where = f" (also looked in {base})" if base is not None and not path.is_absolute() else ""
        raise ConceptError(f"concepts: {spec!r} is not {_CHOICES}: no such file{where}")
    return candidate
