"""The library verbs in one place; what the CLI commands call.

    from conceptmon.api import dissect_run, embed_run, stats_run, report_run
    dissect_run(load_config("conceptmon.yaml"), ckpts="runs/x/checkpoints")
    embed_run("conceptmon_out", anchors=["windmill", "field"])
"""
from __future__ import annotations

from .compare import compare_runs
from .config import Config, config_from_dict, load_config
from .embedding import embed_run
from .engine import Dissector, dissect_run
from .export import export_tensorboard
from .monitor import Monitor, lightning_callback
from .planted import run_planted_check
from .plots import plot_run
from .report import report_run
from .stats import stats_run
from .validate import validate_run
from .watch import watch_run

__all__ = [
    "Config", "Dissector", "Monitor", "compare_runs", "config_from_dict", "dissect_run", "embed_run",
    "export_tensorboard", "lightning_callback", "load_config", "plot_run", "report_run", "run_planted_check",
    "stats_run", "validate_run", "watch_run",
]
