"""A PyTorch Lightning callback that dissects the network during ``Trainer.fit``.

    from conceptmon.lightning import ConceptMonitorCallback
    trainer = Trainer(callbacks=[ConceptMonitorCallback("conceptmon.yaml", out="runs/x/concepts",
                                                        module="model")])

Epochs follow conceptmon's convention: 0 is before training, k is after k completed
epochs. A ``ModelCheckpoint`` file saved at the end of the k-th epoch stores Lightning's
``epoch = k - 1`` (the 0-based index of the epoch it was saved in), and
:func:`conceptmon.checkpoints.lightning_epoch` reads it back as k, so ``conceptmon dissect``
of those ``.ckpt`` files writes the same tables as this callback for the same weights.

Only global rank zero dissects; the other ranks wait at a barrier so that all stay in
step. Per-layer scalars go to every logger the trainer has (``conceptmon/<layer>/...``,
at ``step = trainer.global_step``, with ``conceptmon/epoch``). The callback's state (output
folder, epochs observed) is saved in Lightning checkpoints, so a fit resumed with
``ckpt_path=...`` continues the same folder and never relabels trained weights as epoch 0.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .errors import ConceptmonError

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ConceptmonError(
            "the Lightning callback needs PyTorch Lightning: pip install lightning "
            "(or pip install conceptmon[lightning])"
        ) from None

import torch

from .config import Config
from .monitor import Monitor, Observation

STATE_VERSION = 1
METRIC_PREFIX = "conceptmon/"


def log_to_stderr(message: str) -> None:
    """Progress goes to stderr, like the CLI's (a module-level function: ddp_spawn pickles callbacks)."""
    print(message, file=sys.stderr, flush=True)


def _submodule(root: torch.nn.Module, path: str | None) -> torch.nn.Module:
    if not path:
        return root
    module = root
    for part in path.split("."):
        child = getattr(module, part, None)
        if not isinstance(child, torch.nn.Module):
            children = [n for n, _ in root.named_children()]
            raise ConceptmonError(
                f"module={path!r}: the LightningModule has no submodule {path!r}; its children: {', '.join(children)}"
            )
        module = child
    return module


def _fitting_child(root: torch.nn.Module, layers: list[str]) -> str | None:
    """The name of a direct child holding every configured layer (for the error message)."""
    for name, child in root.named_children():
        names = dict(child.named_modules())
        if layers and all(layer in names for layer in layers):
            return name
    return None


class ConceptMonitorCallback(Callback):
    """Dissects the network every ``every_n_epochs`` epochs, and before training (``observe_start``).

    ``config``: a Config, a dict or a YAML path, describing the network as
    ``conceptmon dissect`` sees it (layer names inside that network). ``module``: the
    attribute of the LightningModule holding that network (e.g. ``"model"``); ``None``
    dissects the LightningModule itself. Use the same config for this callback and for
    ``conceptmon dissect`` of the ``.ckpt`` files: their tables are then the same.
    """

    def __init__(self, config: Config | dict | str | Path, out: str | Path | None = None, *,
                 every_n_epochs: int = 1, observe_start: bool = True, module: str | None = None,
                 log_metrics: bool = True, log: Callable[[str], None] = log_to_stderr):
        if int(every_n_epochs) < 1:
            raise ConceptmonError(f"every_n_epochs: must be at least 1, got {every_n_epochs}")
        self.monitor = Monitor(config, out, log=log)
        self.given_out = out
        self.every_n_epochs = int(every_n_epochs)
        self.observe_start = observe_start
        self.module = module
        self.log_metrics = log_metrics
        self.log = log
        self.observed: list[int] = []

    # ------------------------------------------------------------------------- state

    @property
    def state_key(self) -> str:
        # Two callbacks writing to two folders keep two states in one checkpoint.
        return self._generate_state_key(out=str(self.given_out) if self.given_out is not None else None)

    @property
    def out(self) -> Path:
        return self.monitor.output

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "out": str(self.out.resolve()), "observed": sorted(self.observed)}

    def load_state_dict(self, state: dict) -> None:
        saved_out = state.get("out")
        if saved_out and self.given_out is None:
            self.monitor.out = saved_out  # the resumed fit continues the folder it started
        elif saved_out and Path(self.given_out).resolve() != Path(saved_out):
            self.log(f"notice: resuming into {self.given_out}; the checkpoint's run wrote to {saved_out}")
        self.observed = sorted(int(e) for e in state.get("observed", []))

    # ------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer, pl_module) -> None:
        # Epoch 0 means untrained weights: only at the very start of a fresh fit.
        fresh = trainer.global_step == 0 and trainer.current_epoch == 0 and 0 not in self.observed
        if self.observe_start and fresh:
            self._observe(trainer, pl_module, 0)
        elif self.observed:
            later = [e for e in self.observed if e > trainer.current_epoch]
            if later and trainer.is_global_zero:
                self.log(f"notice: resumed after epoch {trainer.current_epoch}; epochs {later} of the interrupted "
                         f"fit are redone as training reaches them")
            self.observed = [e for e in self.observed if e <= trainer.current_epoch]
        self._barrier(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # current_epoch is still the 0-based index of the epoch that just finished.
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0:
            self._observe(trainer, pl_module, epoch)
        self._barrier(trainer)

    # ------------------------------------------------------------------------- work

    def _network(self, pl_module) -> torch.nn.Module:
        network = _submodule(pl_module, self.module)
        names = dict(network.named_modules())
        missing = [layer for layer in self.monitor.cfg.layers if layer not in names]
        if missing and self.module is None:
            child = _fitting_child(pl_module, self.monitor.cfg.layers)
            if child is not None:
                raise ConceptmonError(
                    f"layers: {missing[0]!r} is not a layer of the LightningModule but of its {child!r}: "
                    f"pass module={child!r} to ConceptMonitorCallback"
                )
        return network

    def _observe(self, trainer, pl_module, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        observation = self.monitor.observe(self._network(pl_module), epoch)
        self.observed = sorted(set(self.observed) | {epoch})
        if self.log_metrics:
            self._log_metrics(trainer, observation)

    def _log_metrics(self, trainer, observation: Observation) -> None:
        from .export import observation_scalars

        loggers = list(getattr(trainer, "loggers", None) or [])
        if not loggers:
            return
        categories = list(self.monitor.detector_categories())
        metrics = observation_scalars(observation.table, categories, prefix=METRIC_PREFIX)
        metrics[f"{METRIC_PREFIX}epoch"] = float(observation.epoch)
        for logger in loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    @staticmethod
    def _barrier(trainer) -> None:
        if getattr(trainer, "world_size", 1) > 1:
            trainer.strategy.barrier("conceptmon")


__all__ = ["ConceptMonitorCallback", "METRIC_PREFIX"]
