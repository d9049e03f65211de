"""The one training loop: the demo's, and the case-study scripts' (``scripts/casestudies``).

Everything here trains on images in [0, 1] and normalises inside the loop, so that a
caller's input hook (adversarial examples) works in pixel space. Case studies plug in
through two hooks instead of copies of the loop: ``inputs(model, x, y) -> x`` replaces
a batch's inputs (PGD examples), ``after_step()`` runs after every optimiser step
(re-applying pruning masks).

Checkpoints are plain dicts ``{"epoch": int, "state_dict": {...}, ...metadata}``
readable with ``torch.load(..., weights_only=True)``: what ``conceptmon dissect`` reads.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .. import store
from ..config import Config, config_from_dict
from .data import Normalizer

InputHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``inputs(model, x, y)``: the inputs to train or evaluate on instead of ``x``."""


def stderr_log(msg: str) -> None:
    """Progress goes to stderr so that stdout keeps only results."""
    print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Deterministic kernels where they exist; warn (not fail) where an op has none.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- schedule


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total_steps`` (no restarts)."""
    if total_steps <= 0:
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


@dataclass(frozen=True)
class Schedule:
    """Cosine decay from ``lr`` to 0 over ``epochs`` epochs of ``steps_per_epoch`` steps (epochs count from 1)."""

    lr: float
    epochs: int
    steps_per_epoch: int

    @classmethod
    def over(cls, lr: float, epochs: int, batches, max_steps: int | None = None) -> "Schedule":
        """The schedule of ``epochs`` passes over ``batches``, each cut at ``max_steps``."""
        return cls(lr, epochs, min(len(batches), max_steps or len(batches)))

    def lr_at(self, step: int) -> float:
        return cosine_lr(self.lr, step, self.epochs * self.steps_per_epoch)

    def first_step(self, epoch: int) -> int:
        return (epoch - 1) * self.steps_per_epoch


# ----------------------------------------------------------------------------- one epoch


def _progress(log: Callable[[str], None] | None, label: str, i: int, n: int, every_s: float, last: list):
    if log is None:
        return
    now = time.monotonic()
    if i == n or now - last[0] >= every_s:
        last[0] = now
        log(f"{label} {i}/{n}")


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    normalize: Normalizer,
    device: torch.device,
    *,
    lr_at: Callable[[int], float] | None = None,
    first_step: int = 0,
    max_steps: int | None = None,
    inputs: InputHook | None = None,
    after_step: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[float, float, int]:
    """One pass over ``batches``; returns (mean loss, accuracy, steps taken).

    ``lr_at(step)`` sets the learning rate per step (global step = first_step + i).
    """
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    n = len(batches) if hasattr(batches, "__len__") else 0
    if max_steps is not None:
        n = min(n, max_steps) if n else max_steps
    last = [time.monotonic()]
    for x, y in batches:
        if max_steps is not None and steps >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if inputs is not None:
            x = inputs(model, x, y)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(first_step + steps)
        logits = model(normalize(x))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        steps += 1
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        _progress(progress, "train batch", steps, n, 2.0, last)
    return total_loss / max(seen, 1), correct / max(seen, 1), steps


def evaluate(
    model: nn.Module,
    batches: Iterable,
    normalize: Normalizer,
    device: torch.device,
    *,
    inputs: InputHook | None = None,
    max_steps: int | None = None,
) -> float:
    """Top-1 accuracy, on ``batches`` as they are or on what ``inputs`` makes of them."""
    model.eval()
    correct, seen = 0, 0
    for i, (x, y) in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            break
        x, y = x.to(device), y.to(device)
        if inputs is not None:
            x = inputs(model, x, y)  # outside no_grad: an attack needs input gradients
        with torch.no_grad():
            correct += int((model(normalize(x)).argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


@dataclass
class EpochResult:
    epoch: int
    loss: float
    acc: float
    started: float
    """time.monotonic() when the epoch began."""


def train_epochs(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    normalize: Normalizer,
    device: torch.device,
    schedule: Schedule,
    epochs: Iterable[int],
    *,
    max_steps: int | None = None,
    inputs: InputHook | None = None,
    after_step: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Iterator[EpochResult]:
    """Train the given epochs (numbered from 1) of ``schedule``, yielding after each one."""
    for epoch in epochs:
        started = time.monotonic()
        loss, acc, _ = train_one_epoch(
            model, batches, optimizer, normalize, device, lr_at=schedule.lr_at,
            first_step=schedule.first_step(epoch), max_steps=max_steps, inputs=inputs, after_step=after_step,
            progress=None if progress is None else (lambda m, e=epoch: progress(f"epoch {e}: {m}")),
        )
        yield EpochResult(epoch, loss, acc, started)


# ----------------------------------------------------------------------------- records, checkpoints


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float | None
    train_acc: float | None
    val_acc: float
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    def line(self, unit: str = "epoch") -> str:
        parts = [f"{unit} {self.epoch:3d}"]
        if self.train_acc is not None:
            parts.append(f"train loss {self.train_loss:.3f} acc {100 * self.train_acc:5.1f}%")
        parts.append(f"val acc {100 * self.val_acc:5.1f}%")
        parts += [f"{k} {100 * v:5.1f}%" if isinstance(v, float) and k.endswith("acc") else f"{k} {v}"
                  for k, v in self.extra.items()]
        parts.append(f"({self.seconds:.1f} s)")
        return "  ".join(parts)


def checkpoint_payload(model: nn.Module, epoch: int, **meta) -> dict:
    """What ``conceptmon dissect`` reads: epoch, a CPU state_dict, plain metadata only."""
    for k, v in meta.items():
        if not isinstance(v, (int, float, str, bool)) and v is not None:
            raise TypeError(f"checkpoint metadata {k!r} must be a plain int/float/str/bool, got {type(v).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"epoch": int(epoch), "state_dict": state, **meta}


def save_checkpoint(path: Path, model: nn.Module, epoch: int, **meta) -> Path:
    """Write atomically so that a dissect job watching the folder never reads half a file."""
    path = Path(path)
    with store.atomic_path(path) as tmp:
        torch.save(checkpoint_payload(model, epoch, **meta), tmp)
    return path


def checkpoint_name(epoch: int) -> str:
    return f"{store.epoch_stem(epoch)}.pt"


def fit(
    model: nn.Module,
    train_batches: Iterable,
    val_batches: Iterable,
    optimizer: torch.optim.Optimizer,
    normalize: Normalizer,
    device: torch.device,
    *,
    epochs: int,
    lr: float,
    checkpoints: Path,
    record: Callable[[EpochRecord], None],
    meta: dict | None = None,
    max_steps: int | None = None,
    inputs: InputHook | None = None,
    measure: Callable[[nn.Module], dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[EpochRecord]:
    """Checkpoint before training (epoch 0), then train ``epochs`` epochs with cosine decay
    from ``lr``, evaluating and checkpointing after each (``epoch_NNNN.pt`` in ``checkpoints``).

    ``record`` gets every epoch's :class:`EpochRecord`; ``measure(model)`` adds metrics
    (e.g. robust accuracy) to the record and the checkpoint; ``meta`` goes into every
    checkpoint; ``max_steps`` cuts every training and validation pass.
    """
    records = []

    def finish(epoch: int, loss: float | None, acc: float | None, started: float) -> None:
        val_acc = evaluate(model, val_batches, normalize, device, max_steps=max_steps)
        extra = measure(model) if measure is not None else {}
        scores = {"val_acc": val_acc, **({"train_acc": acc} if acc is not None else {}), **extra}
        save_checkpoint(Path(checkpoints) / checkpoint_name(epoch), model, epoch, **scores, **(meta or {}))
        records.append(EpochRecord(epoch, loss, acc, val_acc, time.monotonic() - started, extra))
        record(records[-1])

    finish(0, None, None, time.monotonic())
    schedule = Schedule.over(lr, epochs, train_batches, max_steps)
    for done in train_epochs(model, train_batches, optimizer, normalize, device, schedule, range(1, epochs + 1),
                             max_steps=max_steps, inputs=inputs, progress=progress):
        finish(done.epoch, done.loss, done.acc, done.started)
    return records


# ----------------------------------------------------------------------------- configs


def dissect_config(
    *,
    arch: str,
    kwargs: dict,
    layers: list[str],
    checkpoints: Path,
    out: Path,
    run: str,
    probe: dict,
    detector: dict | None = None,
    embedding: dict | None = None,
    concepts: str | None = None,
    batch_size: int = 64,
) -> dict:
    """A config dict that ``conceptmon dissect --config`` takes as is (validated here)."""
    data = {
        "run": run,
        "model": {"arch": arch, "kwargs": dict(kwargs)},
        "layers": list(layers),
        "checkpoints": str(Path(checkpoints).resolve()),
        "out": str(Path(out).resolve()),
        "probe": dict(probe),
        "detector": dict(detector or {"name": "netdissect"}),
        "batch_size": batch_size,
        "device": "auto",
    }
    if embedding:
        data["embedding"] = dict(embedding)
    if concepts:
        data["concepts"] = concepts
    config_from_dict(data, source="generated config")  # a bad value fails here, not at dissect time
    return data


def write_config(path: Path, data: dict) -> Config:
    """Write ``data`` as YAML (atomically) and return it parsed as a Config."""
    store.write_text(path, yaml.safe_dump(data, sort_keys=False))
    return config_from_dict(data, source=str(path))
