"""Checks with a known answer: does the detector name a classifier's output units by their classes?

``validate_run`` labels the output units of a classifier layer (one unit per class, in
class order) with the run's own detector and probe, and reports per epoch the share of
units whose rank-0 concept is their class name (``top1``, CLIP-Dissect's "final-layer
accuracy") and whose class is among the first five (``top5``). Names are compared after
:func:`conceptmon.concepts.normalise_name`. Classes that are not in the concept set at
all cannot be named: they count as misses and are listed apart, never dropped.
Nothing is written into the run's dissect tables; the result goes to ``OUT/validate.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import store
from .checkpoints import checkpoint_sha256, find_checkpoints
from .concepts import normalise_name
from .config import Config, override
from .detectors import rank_concepts
from .errors import ConceptmonError

TOP_N = 5


class ValidateError(ConceptmonError):
    """Validation asked for with classes or layers that do not fit the model."""


def read_classes(value: str, base: Path | None = None) -> list[str]:
    """``--classes``: a file with one class name per line (output order), or ``a,b,c``."""
    path = Path(value).expanduser()
    if not path.is_file() and base is not None and (Path(base) / value).is_file():
        path = Path(base) / value
    if path.is_file():
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValidateError(f"{path}: not UTF-8 text (byte {e.start})") from None
        where = str(path)
    else:
        if "," not in value and ("/" in value or value.endswith(".txt")):
            raise ValidateError(f"--classes: {value} is not a file (give a file of class names, one per line, "
                                f"or a comma-separated list)")
        names = [v.strip() for v in value.split(",") if v.strip()]
        where = "--classes"
    if not names:
        raise ValidateError(f"{where}: no class names")
    return names


def unit_accuracy(scores, classes: list[str], concept_names) -> dict:
    """top1/top5 and the misses for one (units x concepts) score matrix."""
    k = min(TOP_N, scores.shape[1])
    _, idx = rank_concepts(scores.float().cpu(), k)
    norm_concepts = [normalise_name(c) for c in concept_names]
    known = set(norm_concepts)
    top1 = top5 = 0
    misses = []
    for unit, name in enumerate(classes):
        want = normalise_name(name)
        got = [concept_names[j] for j in idx[unit].tolist()]
        ranked = [norm_concepts[j] for j in idx[unit].tolist()]
        hit1, hit5 = ranked[0] == want, want in ranked
        top1 += hit1
        top5 += hit5
        if not hit1:
            misses.append({"unit": unit, "class": name, "top": got,
                           "rank": ranked.index(want) if hit5 else None, "in_concepts": want in known})
    n = len(classes)
    return {"n_units": n, "top1": top1 / n, "top5": top5 / n, "misses": misses,
            "not_in_concepts": [c for c in classes if normalise_name(c) not in known]}


def validate_run(
    cfg: Config,
    *,
    layer: str,
    classes: list[str],
    ckpts: str | Path | None = None,
    epochs: list[int] | None = None,
    out: str | Path | None = None,
    trust_checkpoints: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Final-layer accuracy of the run's detector on ``layer`` for every (chosen) checkpoint."""
    from .engine import Dissector, resolve_ckpt_dir, select_checkpoints

    ckpt_dir = resolve_ckpt_dir(cfg, ckpts)
    files = select_checkpoints(find_checkpoints(ckpt_dir, trust_checkpoints), epochs, None)
    if not files:
        raise ValidateError(f"{ckpt_dir}: no checkpoints to validate")
    cfg = override(cfg, layers=[layer], **{"trust.replicates": 0})
    dissector = Dissector(cfg, out, checkpoints=ckpt_dir, log=log)
    units = dissector.layouts[layer].channels
    if units != len(classes):
        raise ValidateError(f"layer {layer}: has {units} units but {len(classes)} class names were given "
                            f"(one name per output unit, in output order)")
    concept_names = list(dissector.detector.concepts.names)
    results = []
    for ckpt in files:
        model = dissector.load(ckpt, trust_checkpoints)
        labels = dissector.label([model], f"validate epoch {ckpt.epoch}")[0][layer].labels
        row = {"epoch": ckpt.epoch, "layer": layer, "checkpoint": str(ckpt.path.resolve()),
               "sha256": checkpoint_sha256(ckpt.path), **unit_accuracy(labels.scores, classes, concept_names)}
        log(f"validate epoch {ckpt.epoch}: {layer} top-1 {row['top1']:.0%}, top-5 {row['top5']:.0%} "
            f"of {row['n_units']} classes")
        results.append(row)
    report = {"results": results, "detector": dissector.detector.settings(),
              "probe": {"name": dissector.probe.name, "fingerprint": dissector.probe.fingerprint()},
              "classes": list(classes)}
    store.write_json(dissector.out / store.VALIDATE, report)
    return report


def format_validation(report: dict) -> str:
    lines = []
    for r in report["results"]:
        lines.append(f"epoch {r['epoch']}: {r['layer']}: {r['n_units']} units, top-1 {r['top1']:.1%}, "
                     f"top-5 {r['top5']:.1%}")
        for m in r["misses"]:
            where = f"rank {m['rank']}" if m["rank"] is not None else "not in the top 5"
            if not m["in_concepts"]:
                where = "not in the concept set"
            lines.append(f"  miss: unit {m['unit']} ({m['class']}): {where}; top: {', '.join(m['top'][:3])}")
        if r["not_in_concepts"]:
            lines.append(f"  classes not in the concept set: {', '.join(r['not_in_concepts'])}")
    return "\n".join(lines) + "\n"


__all__ = ["ValidateError", "format_validation", "read_classes", "unit_accuracy", "validate_run"]
