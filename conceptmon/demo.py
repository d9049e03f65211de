"""``conceptmon demo``: a whole Concept-Monitor study on this machine, offline, in minutes.

1. generate the synthetic probe set (Broden format) into ``OUT/probe``;
2. draw a classification task from the same generator (which scene or texture an image
   shows, 16 classes; :func:`conceptmon.training.synthetic_classification`);
3. train a narrow ResNet on it from scratch, saving ``OUT/checkpoints/epoch_0000.pt``
   before training and one checkpoint after each epoch, and print the accuracies;
4. dissect every checkpoint (Network Dissection), embed the neurons (offline MiniLM
   encoder), compute the statistics and write ``OUT/report.html``.

The results land in ``OUT`` itself, so ``conceptmon stats --out OUT`` and the other
commands work on a demo folder as on any run (``OUT/conceptmon.yaml`` is its config).
Everything is seeded: the same ``--seed`` gives the same probe, data, weights and tables.

What the demo shows is the paper's first observation, on its own run: the last
dissected layer has more interpretable neurons after training than at initialisation,
and its neurons spread out in the embedding (the diversity table's
``mean_cosine_distance`` grows). The embedding uses temperature 0.01 rather than the
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

import pandas as pd
import torch

from . import store
from .config import config_from_dict
from .errors import ConceptmonError
from .models import resolve_device
from .training import (
    EpochRecord,
    Normalizer,
    TensorBatches,
    checkpoint_name,
    cosine_lr,
    dissect_config,
    evaluate,
    save_checkpoint,
    seed_everything,
    small_resnet,
    stderr_log,
    synthetic_classification,
    train_one_epoch,
    write_config,
)

MARKER = "demo.json"
"""Written into OUT by the demo; a folder holding it may be overwritten by the next demo."""
OWNED = (MARKER, "conceptmon.yaml", "training.json", "checkpoints", "probe", store.MANIFEST, "dissect", "embed",
         "stats", "plots", "cache", "report.html")
"""Everything the demo writes into OUT (and removes again before a fresh run)."""
MODEL_ARCH = "conceptmon.training:small_resnet"


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

    @classmethod
    def tiny(cls, **overrides) -> "DemoSettings":
        """Seconds instead of minutes, for tests: too small to show the observation reliably."""
        base = cls(epochs=2, n_train=96, n_val=32, image_size=32, probe_n=40, widths=(8, 8, 16, 16), batch_size=32)
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
        for name in OWNED:
            path = out / name
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
    from .probes.synthetic import generate_synthetic

    root = Path(out) / "probe"
    log(f"[1/6] probe set: generating {s.probe_n} synthetic images ({s.image_size} px) into {root}")
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


def train(out: Path, s: DemoSettings, device: torch.device, echo, log) -> tuple[list[dict], tuple[str, ...]]:
    """Train the demo model, one checkpoint per epoch (epoch 0 = initialisation).

    Returns the per-epoch history and the class names."""
    log(f"[2/6] task: drawing {s.n_train} training and {s.n_val} validation images "
        f"(which of 6 scenes or 10 textures an image shows)")
    train_x, train_y, classes = synthetic_classification(
        s.n_train, s.image_size, s.seed, progress=_every_tenth("training images", log))
    val_x, val_y, _ = synthetic_classification(s.n_val, s.image_size, s.seed, first=s.n_train)
    generator = seed_everything(s.seed)
    model = small_resnet(num_classes=len(classes), widths=s.widths).to(device)
    batches = TensorBatches(train_x, train_y, s.batch_size, shuffle=True, flip=True, generator=generator)
    val_batches = TensorBatches(val_x, val_y, 256)
    normalize = Normalizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay,
                                nesterov=True)
    total = len(batches) * s.epochs
    ckpts = Path(out) / "checkpoints"
    log(f"[3/6] training a narrow ResNet ({sum(p.numel() for p in model.parameters()):,} weights, "
        f"widths {list(s.widths)}) for {s.epochs} epochs on {device}")
    history = []

    def finish(epoch: int, loss, acc, start: float) -> None:
        val_acc = evaluate(model, val_batches, normalize, device)
        save_checkpoint(ckpts / checkpoint_name(epoch), model, epoch, val_acc=val_acc, seed=s.seed)
        record = EpochRecord(epoch, loss, acc, val_acc, time.monotonic() - start)
        echo(record.line())
        history.append(record.as_dict())

    finish(0, None, None, time.monotonic())
    for epoch in range(1, s.epochs + 1):
        start = time.monotonic()
        loss, acc, _ = train_one_epoch(
            model, batches, optimizer, normalize, device, lr_at=lambda step: cosine_lr(s.lr, step, total),
            first_step=(epoch - 1) * len(batches), progress=lambda m: log(f"  epoch {epoch}: {m}"),
        )
        finish(epoch, loss, acc, start)
    store.write_json(Path(out) / "training.json", {"classes": list(classes), "history": history})
    return history, classes


def observation(tables: dict[str, pd.DataFrame], layer: str) -> dict:
    """The paper's first observation, measured on ``layer``: first vs last epoch."""
    counts = tables["interpretable"]
    counts = counts[counts["layer"] == layer].sort_values("epoch")
    diversity = tables["diversity"]
    diversity = diversity[diversity["layer"] == layer].sort_values("epoch")
    first, last = counts.iloc[0], counts.iloc[-1]
    spread = diversity["mean_cosine_distance"].to_numpy()
    distinct = diversity["n_distinct_interpretable"].to_numpy()
    result = {
        "layer": layer,
        "first_epoch": int(first["epoch"]),
        "last_epoch": int(last["epoch"]),
        "n_neurons": int(last["n_neurons"]),
        "interpretable_first": int(first["n_interpretable"]),
        "interpretable_last": int(last["n_interpretable"]),
        "spread_first": float(spread[0]),
        "spread_last": float(spread[-1]),
        "distinct_concepts_first": int(distinct[0]),
        "distinct_concepts_last": int(distinct[-1]),
    }
    result["shown"] = bool(result["interpretable_last"] > result["interpretable_first"]
                           and result["spread_last"] > result["spread_first"])
    return result


def describe(obs: dict) -> str:
    verdict = "as in the paper" if obs["shown"] else "NOT shown by this run (try more --epochs or another --seed)"
    return (
        f"{obs['layer']}: interpretable neurons {obs['interpretable_first']}/{obs['n_neurons']} at epoch "
        f"{obs['first_epoch']} -> {obs['interpretable_last']}/{obs['n_neurons']} at epoch {obs['last_epoch']}; "
        f"distinct concepts {obs['distinct_concepts_first']} -> {obs['distinct_concepts_last']}; "
        f"embedding spread (mean cosine distance) {obs['spread_first']:.3f} -> {obs['spread_last']:.3f}: {verdict}"
    )


def run_demo(
    out: Path | str = "demo_out",
    settings: DemoSettings | None = None,
    *,
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] = stderr_log,
) -> DemoResult:
    """Run the whole demo into ``out``; ``echo`` gets results (accuracies, the finding, the
    report's path), ``log`` the progress of every step."""
    from .embedding import embed_run
    from .engine import dissect_run
    from .report import report_run
    from .stats import stats_run

    s = (settings or DemoSettings()).check()
    out = Path(out)
    started = time.monotonic()
    prepare_out(out, log)
    store.write_json(out / MARKER, {"settings": asdict(s), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    device = resolve_device(s.device)

    generate_probe(out, s, log)
    history, classes = train(out, s, device, echo, log)
    cfg_dict = demo_config(out, s, len(classes))
    write_config(out / "conceptmon.yaml", cfg_dict)
    cfg = config_from_dict(cfg_dict, source=str(out / "conceptmon.yaml"))

    log(f"[4/6] dissect: Network Dissection of {', '.join(s.layers)} in {s.epochs + 1} checkpoints")
    dissect_run(cfg, log=lambda m: log(f"  {m}"))
    log("[5/6] embed: placing every neuron in the MiniLM text space")
    embed_run(out, map_method=s.map_method, log=lambda m: log(f"  {m}"))
    log("[6/6] stats and report")
    tables = stats_run(out, log=lambda m: log(f"  {m}"))
    report = report_run(out, log=lambda m: log(f"  {m}"))

    obs = observation(tables, s.layers[-1])
    store.write_json(out / MARKER, {"settings": asdict(s), "observation": obs, "history": history,
                                    "seconds": round(time.monotonic() - started, 1)})
    echo(describe(obs))
    echo(f"report: {Path(report).resolve()}")
    log(f"demo finished in {time.monotonic() - started:.0f} s")
    return DemoResult(out=out, report=Path(report), history=history, observation=obs)
