"""The ``concepts:`` config value turned into a ConceptSet (the words a detector can assign).

``<probe name>[:argument]``  the named concept set a registered probe offers, e.g.
                       ``broden`` (label.csv of the probe folder, or ``broden:/path``),
                       ``cifar100`` (the 100 class names), ``synthetic`` (its vocabulary)
``path/to/words.txt``  one concept per line, optional ``word<TAB>category``
null                   the probe set's own label names, when it has any

A relative words-file path is looked up from the working directory, then beside the config.
Every set comes back merged (one entry per word): CLIP sees words, not categories.
Detectors whose concepts are the probe's own mask labels (Network Dissection) ignore
``concepts:`` with a notice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .concepts import ConceptError, ConceptSet, read_words_file
from .probes.base import ProbeSet


def _choices() -> str:
    from .probes import PROBES

    named = [n for n in PROBES.names() if PROBES.get(n).vocabulary is not None]
    return f"{', '.join(named)} (a probe's named set, some with :argument) or path/to/words.txt"


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
    from .probes import PROBES

    if spec is None or not str(spec).strip():
        own = probe_label_concepts(probe)
        if own is None:
            name = getattr(probe, "name", None)
            raise ConceptError(f"concepts: not set and probe {name!r} has no label names; set concepts: to {_choices()}")
        return own
    spec = str(spec).strip()
    name, sep, argument = spec.partition(":")
    if name in PROBES and not Path(spec).expanduser().is_file():
        vocabulary = PROBES.get(name).vocabulary
        if vocabulary is not None:
            return vocabulary(argument.strip() if sep else None, probe).merged()
    return read_words_file(_words_path(spec, base)).merged()


def concepts_for(detector_cls, spec: str | None, probe: ProbeSet, *, base: str | Path | None = None,
                 log: Callable[[str], None] = lambda m: None) -> ConceptSet:
    """The concept set a detector of class ``detector_cls`` labels with."""
    if getattr(detector_cls, "uses_probe_labels", False):
        if spec:
            log(f"notice: concepts: {spec!r} is ignored by {detector_cls.name}, which labels with the probe's "
                f"own mask labels")
        if probe.concepts is None:
            raise ConceptError(f"probe {probe.name!r}: has no label names for {detector_cls.name}")
        return probe.concepts
    return load_concepts(spec, probe, base=base)


def _words_path(spec: str, base: str | Path | None) -> Path:
    path = Path(spec).expanduser()
    if path.is_file() or path.is_absolute() or base is None:
        candidate = path
    else:
        candidate = Path(base) / path
    if not candidate.is_file():
        where = f" (also looked in {base})" if base is not None and not path.is_absolute() else ""
        raise ConceptError(f"concepts: {spec!r} is not {_choices()}: no such file{where}")
    return candidate
