"""One training run's folder: checkpoints, history and the config that dissects it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptmon import store
from conceptmon.config import ModelConfig
from conceptmon.demo.loop import (
    EpochRecord,
    InputHook,
    checkpoint_name,
    dissect_config,
    fit,
    save_checkpoint,
    seed_everything,
    stderr_log,
    write_config,
)
from conceptmon.models import build_model

from .datasets import Data, load_data, loaders
from .options import pick_device


def make_model(arch: str, num_classes: int) -> tuple[torch.nn.Module, dict]:
    """A fresh model and the kwargs that rebuild it from the config (model.kwargs)."""
    kwargs = {"num_classes": num_classes}
    return build_model(ModelConfig(arch=arch, kwargs=kwargs)), kwargs


@dataclass
class Setup:
    device: torch.device
    data: Data
    train_dl: torch.utils.data.DataLoader
    val_dl: torch.utils.data.DataLoader
    model: torch.nn.Module
    """Fresh, still on the CPU (a backbone may be loaded into it first)."""
    kwargs: dict
    """model.kwargs that rebuild ``model`` from the config."""


def set_up(args: argparse.Namespace) -> Setup:
    """Seed everything, pick the device, load the data and build a fresh ``--arch`` model."""
    seed_everything(args.seed)
    device = pick_device(args.device)
    data = load_data(args)
    train_dl, val_dl = loaders(data, args, device)
    model, kwargs = make_model(args.arch, data.num_classes)
    return Setup(device, data, train_dl, val_dl, model, kwargs)


def sgd(params, args: argparse.Namespace, *, nesterov: bool = True) -> torch.optim.SGD:
    """SGD with the scripts' --lr, --momentum and --weight-decay (Nesterov when asked and momentum > 0)."""
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=nesterov and args.momentum > 0)


class RunFolder:
    """Checkpoints, config and history of one training run."""

    def __init__(self, out: Path, ckpt_folder: str = "checkpoints"):
        self.out = Path(out)
        self.checkpoints = self.out / ckpt_folder
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []

    def save(self, model: torch.nn.Module, epoch: int, **meta) -> Path:
        return save_checkpoint(self.checkpoints / checkpoint_name(epoch), model, epoch, **meta)

    def record(self, rec: EpochRecord, unit: str = "epoch", history_name: str = "history.json") -> None:
        print(rec.line(unit), flush=True)
        self.history.append(rec.as_dict())
        store.write_json(self.out / history_name, self.history)

    def fit(self, model, train_dl, val_dl, opt, normalize, device, args: argparse.Namespace, *, unit: str = "epoch",
            inputs: InputHook | None = None, measure=None, **meta) -> None:
        """The shared loop (:func:`conceptmon.demo.loop.fit`) with this folder's checkpoints and history."""
        fit(model, train_dl, val_dl, opt, normalize, device, epochs=args.epochs, lr=args.lr,
            checkpoints=self.checkpoints, record=lambda rec: self.record(rec, unit), meta=meta,
            max_steps=args.max_steps, inputs=inputs, measure=measure, progress=stderr_log)

    def write_config(self, args: argparse.Namespace, *, arch: str, kwargs: dict, mean, std, run: str,
                     name: str = "conceptmon.yaml", dissect_out: str = "conceptmon_out") -> Path:
        probe = {"name": args.probe, "image_size": args.image_size, "mean": list(mean), "std": list(std)}
        if args.probe_root:
            probe["root"] = str(Path(args.probe_root).resolve())
        data = dissect_config(
            arch=arch, kwargs=kwargs, layers=args.layer_list, checkpoints=self.checkpoints,
            out=self.out / dissect_out, run=run, probe=probe, detector={"name": args.detector},
            concepts=args.concepts,
        )
        path = self.out / name
        write_config(path, data)
        return path
