"""``conceptmon demo``: a whole Concept-Monitor study on this machine, offline, in minutes.

1. generate the synthetic probe set (Broden format) into ``OUT/probe``;
2. draw a classification task from the same generator (which scene or texture an image
   shows, 16 classes; :func:`conceptmon.demo.data.synthetic_classification`) and write
   its class names to ``OUT/classes.txt`` (output order);
3. train a narrow ResNet on it from scratch, saving ``OUT/checkpoints/epoch_0000.pt``
   before training and one checkpoint after each epoch, and print the accuracies;
4. dissect every checkpoint (Network Dissection), embed the neurons (offline MiniLM
   encoder) and compute the statistics;
5. validate: label the classifier's output units (``fc``, one per class) at the last
   epoch and count those the detector names by their own class (``OUT/validate.json``);
6. write ``OUT/report.html``.

The results land in ``OUT`` itself, so ``conceptmon stats --out OUT`` and the other
commands work on a demo folder as on any run (``OUT/conceptmon.yaml`` is its config).
Everything is seeded: the same ``--seed`` gives the same probe, data, weights and tables.

The demo measures the paper's first observation on its own run (the last dissected
layer has more interpretable neurons after training than at initialisation, and its
neurons spread out in the embedding: the diversity table's ``mean_cosine_distance``
grows) and states it only when the run showed it and learned its task
(:mod:`conceptmon.demo.verdict`). The embedding uses temperature 0.01 rather than the
default 1: Network Dissection IoUs of one neuron's top five concepts differ by
hundredths, so at T = 1 every neuron sits at the plain mean of its five concepts and
the map shows little (see :mod:`conceptmon.embedding`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import store
from ..errors import ConceptmonError
from ..models import resolve_device
from .data import Normalizer, TensorBatches, chance_accuracy, synthetic_classification
from .loop import dissect_config, fit, seed_everything, stderr_log, write_config
from .model import MODEL_ARCH, small_resnet
from .verdict import describe, describe_validation, judge, observation

MARKER = "demo.json"
"""Written into OUT by the demo; a folder holding it may be overwritten by the next demo."""
CLASSES = "classes.txt"
"""The task's class names, one per line in output order (``conceptmon validate --classes``)."""
CONFIG = "conceptmon.yaml"
TRAINING = "training.json"
"""Class names, per-epoch accuracies and chance of the demo's training run."""


def owned_paths(out: Path) -> list[Path]:
    """Everything the demo writes into ``out`` (and removes again before a fresh run)."""
    out = Path(out)
    return [out / MARKER, out / CLASSES, out / CONFIG, out / TRAINING, out / "checkpoints", out / "probe",
            out / store.MANIFEST, store.dissect_dir(out), store.top_images_dir(out), store.embed_dir(out),
            store.stats_dir(out), out / store.VALIDATE, store.plots_dir(out), store.cache_dir(out),
            store.report_path(out)]


CLASSIFIER = "fc"
"""The demo model's output layer: one unit per class, validated against the class names."""
STEPS = 7


class DemoError(ConceptmonError):
    """Demo settings or an output folder that cannot be used."""


@dataclass(frozen=True)
class DemoSettings:
    epochs: int = 8
    seed: int = 0
    n_train: int = 3200
    n_val: int = 480
    image_size: int = 64
    probe_n: int = 1000
    widths: tuple[int, ...] = (16, 32, 64, 128)
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    layers: tuple[str, ...] = ("layer2", "layer3", "layer4")
    temperature: float = 0.01
    map_method: str = "umap"
    """umap (the default map) or pca (instant: no numba compilation; for tests)."""
    device: str = "auto"
    smoke: bool = False
    """A smoke test (``--tiny``): too small to test the paper's observation, so it never states it."""

    @classmethod
    def tiny(cls, **overrides) -> "DemoSettings":
        """Seconds instead of minutes, for tests: too small to show the observation reliably."""
        base = cls(epochs=2, n_train=96, n_val=32, image_size=32, probe_n=40, widths=(8, 8, 16, 16), batch_size=32,
                   smoke=True)
        return replace(base, **overrides)

    def check(self) -> "DemoSettings":
        if self.epochs < 1:
            raise DemoError(f"--epochs: must be at least 1, got {self.epochs}")
        if self.seed < 0:
            raise DemoError(f"--seed: must be 0 or more, got {self.seed}")
        return self


@dataclass
class DemoResult:
    out: Path
    report: Path
    history: list[dict]
    observation: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- output folder


def prepare_out(out: Path, log: Callable[[str], None]) -> None:
    """Use an empty or missing ``out``, or replace a previous demo's files there; refuse anything else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out}: is a file; give a folder (new, empty, or an earlier demo's)")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"--out {out}: not empty and not an earlier demo's output; choose a new or empty folder")
        log(f"replacing the earlier demo in {out}")
        for path in owned_paths(out):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _every_tenth(label: str, log: Callable[[str], None]) -> Callable[[int, int], None]:
    """A progress(done, total) callback logging at every 10 %."""

    def progress(done: int, total: int) -> None:
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            log(f"  {label}: {done}/{total}")

    return progress


# ----------------------------------------------------------------------------- steps


def generate_probe(out: Path, s: DemoSettings, log) -> Path:
    from ..probes.synthetic import generate_synthetic

    root = Path(out) / "probe"
    log(f"[1/{STEPS}] probe set: generating {s.probe_n} synthetic images ({s.image_size} px) into {root}")
    return generate_synthetic(root, n=s.probe_n, size=s.image_size, seed=s.seed,
                              progress=_every_tenth("probe images", log))


def demo_config(out: Path, s: DemoSettings, n_classes: int) -> dict:
    out = Path(out)
    return dissect_config(
        arch=MODEL_ARCH,
        kwargs={"num_classes": n_classes, "widths": list(s.widths)},
        layers=list(s.layers),
        checkpoints=out / "checkpoints",
        out=out,
        run=f"demo-seed{s.seed}",
        probe={"name": "synthetic", "root": str((out / "probe").resolve()), "image_size": s.image_size,
               "n": s.probe_n, "seed": s.seed},
        detector={"name": "netdissect"},
        embedding={"encoder": "minilm", "temperature": s.temperature},
        batch_size=100,
    ) | {"device": s.device}


@dataclass
class Training:
    history: list[dict]
    classes: tuple[str, ...]
    chance: float
    """Validation accuracy of always guessing the most frequent class."""


def train(out: Path, s: DemoSettings, device: torch.device, echo, log) -> Training:
    """Train the demo model, one checkpoint per epoch (epoch 0 = initialisation)."""
    log(f"[2/{STEPS}] task: drawing {s.n_train} training and {s.n_val} validation images "
        f"(which scene or texture an image shows)")
    train_x, train_y, classes = synthetic_classification(
        s.n_train, s.image_size, s.seed, progress=_every_tenth("training images", log))
    val_x, val_y, _ = synthetic_classification(s.n_val, s.image_size, s.seed, split="val")
    store.write_text(Path(out) / CLASSES, "".join(f"{name}\n" for name in classes))
    generator = seed_everything(s.seed)
    model = small_resnet(num_classes=len(classes), widths=s.widths).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay,
                                nesterov=True)
    log(f"[3/{STEPS}] training a narrow ResNet ({sum(p.numel() for p in model.parameters()):,} weights, "
        f"widths {list(s.widths)}) for {s.epochs} epochs on {device}")
    records = fit(
        model, TensorBatches(train_x, train_y, s.batch_size, shuffle=True, flip=True, generator=generator),
        TensorBatches(val_x, val_y, 256), optimizer, Normalizer(), device, epochs=s.epochs, lr=s.lr,
        checkpoints=Path(out) / "checkpoints", record=lambda r: echo(r.line()), meta={"seed": s.seed},
        progress=lambda m: log(f"  {m}"),
    )
    history = [r.as_dict() for r in records]
    chance = chance_accuracy(val_y)
    store.write_json(Path(out) / TRAINING, {"classes": list(classes), "history": history, "chance": chance})
    return Training(history, classes, chance)


def run_demo(
    out: Path | str = "demo_out",
    settings: DemoSettings | None = None,
    *,
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] = stderr_log,
) -> DemoResult:
    """Run the whole demo into ``out``; ``echo`` gets results (accuracies, what the run showed,
    the report's path, the verdict last), ``log`` the progress of every step."""
    from ..embedding import embed_run
    from ..engine import dissect_run
    from ..report import report_run
    from ..stats import stats_run
    from ..validate import validate_run

    s = (settings or DemoSettings()).check()
    out = Path(out)
    started = time.monotonic()
    prepare_out(out, log)
    store.write_json(out / MARKER, {"settings": asdict(s), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    device = resolve_device(s.device)

    generate_probe(out, s, log)
    trained = train(out, s, device, echo, log)
    cfg_dict = demo_config(out, s, len(trained.classes))
    cfg = write_config(out / CONFIG, cfg_dict)

    log(f"[4/{STEPS}] dissect: Network Dissection of {', '.join(s.layers)} in {s.epochs + 1} checkpoints")
    dissect_run(cfg, log=lambda m: log(f"  {m}"))
    log(f"[5/{STEPS}] embed: placing every neuron in the MiniLM text space")
    embed_run(out, map_method=s.map_method, log=lambda m: log(f"  {m}"))
    log(f"[6/{STEPS}] stats and validation ({CLASSIFIER} at epoch {s.epochs} against {out / CLASSES})")
    tables = stats_run(out, log=lambda m: log(f"  {m}"))
    validation = validate_run(cfg, layer=CLASSIFIER, classes=list(trained.classes), epochs=[s.epochs],
                              log=lambda m: log(f"  {m}"))
    log(f"[7/{STEPS}] report")
    report = report_run(out, log=lambda m: log(f"  {m}"))

    obs = observation(tables, s.layers[-1])
    verdict = judge(obs, trained.history[-1]["val_acc"], trained.chance, smoke=s.smoke)
    top = validation["results"][-1]
    store.write_json(out / MARKER, {"settings": asdict(s), "observation": obs, "history": trained.history,
                                    "validation": {k: top[k] for k in ("epoch", "layer", "n_units", "top1", "top5")},
                                    "verdict": verdict, "seconds": round(time.monotonic() - started, 1)})
    echo(describe(obs))
    echo(describe_validation(validation))
    echo(f"report: {Path(report).resolve()}")
    echo(verdict["line"])
    log(f"demo finished in {time.monotonic() - started:.0f} s")
    return DemoResult(out=out, report=Path(report), history=trained.history, observation=obs,
                      validation=validation, verdict=verdict)
