"""Concept-Monitor inside a training loop, without saving checkpoints.

    monitor = conceptmon.Monitor("conceptmon.yaml", out="runs/x/concepts")
    for epoch in range(epochs):
        train_one_epoch(model)
        obs = monitor.observe(model, epoch)      # same files as `conceptmon dissect`
        print(obs.summary)

The model is dissected where it lives (its own device) and its train/eval mode is
restored afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .config import Config, config_from_dict, load_config
from .engine import Dissector, state_sha256


@dataclass
class Observation:
    epoch: int
    table: pd.DataFrame
    """The epoch's DISSECT rows (one per layer, neuron and rank)."""
    summary: dict
    """Per layer: interpretable neurons, neurons, distinct concepts among interpretable ones."""


def _as_config(config: Config | dict | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


class Monitor:
    def __init__(self, config: Config | dict | str | Path, out: str | Path | None = None,
                 log: Callable[[str], None] = print):
        self.cfg = _as_config(config)
        self.out = out
        self.log = log
        self._dissector: Dissector | None = None

    def observe(self, model: torch.nn.Module, epoch: int) -> Observation:
        """Dissect ``model`` now as epoch ``epoch``; writes OUT/dissect/epoch_NNNN.* like the CLI."""
        if self._dissector is None or self._dissector.model is not model:
            self._dissector = Dissector(self.cfg, self.out, model=model, force=True, log=self.log)
        table, summary = self._dissector.dissect_current(int(epoch), "(in memory)", state_sha256(model))
        return Observation(int(epoch), table, summary)

    def detector_categories(self) -> tuple[str, ...]:
        """The concept categories of the detector in use (empty before the first observation)."""
        if self._dissector is None:
            return ()
        return tuple(dict.fromkeys(self._dissector.detector.concepts.categories))

    @property
    def output(self) -> Path:
        if self._dissector is None:
            from .config import resolve_out

            return resolve_out(self.cfg, str(self.out) if self.out else None)
        return self._dissector.out


def lightning_callback(config: Config | dict | str | Path, out: str | Path | None = None,
                       every_n_epochs: int = 1, observe_start: bool = True, **options):
    """A :class:`conceptmon.lightning.ConceptMonitorCallback` (the short form).

    Epoch numbers: 0 before training (``observe_start``), then k after k finished epochs,
    as ``conceptmon dissect`` reads Lightning's ModelCheckpoint files. ``options``:
    ``module`` (the LightningModule's attribute holding the network), ``log_metrics``, ``log``.
    """
    from .lightning import ConceptMonitorCallback  # needs lightning; conceptmon itself does not

    return ConceptMonitorCallback(config, out, every_n_epochs=every_n_epochs, observe_start=observe_start, **options)
