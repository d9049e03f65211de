"""``conceptmon slurm-script``: print the Slurm array job for sharded dissection."""
from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from . import main
from .common import fail_cleanly, log_to_stderr

DEFAULTS = {"gpus": 0, "cpus": 4, "mem": "16G", "time": "02:00:00", "array": "0-3", "logs": "slurm-logs"}


@main.command("slurm-script")
@click.option("--gpus", type=int, default=DEFAULTS["gpus"], show_default=True,
              help="GPUs per task (--gres=gpu:N); 0 writes no GPU request, so any partition takes it.")
@click.option("--cpus", type=int, default=DEFAULTS["cpus"], show_default=True,
              help="CPUs per task; also the data-loading workers.")
@click.option("--mem", default=DEFAULTS["mem"], show_default=True, help="Memory per task, e.g. 16G.")
@click.option("--time", "time_limit", default=DEFAULTS["time"], show_default=True, help="Time limit per task.")
@click.option("--partition", default=None, help="Partition (default: the cluster's default).")
@click.option("--array", default=DEFAULTS["array"], show_default=True,
              help="Array range A-B: B-A+1 tasks, one shard each.")
@click.option("--venv", default=None, help="Environment with conceptmon installed (default: this one, sys.prefix).")
@click.option("--logs", default=DEFAULTS["logs"], show_default=True,
              help="Folder for the task logs (created now; relative to where sbatch runs).")
@click.option("--config", "config_path", default=None,
              help="Config used when the job is submitted without one.")
@fail_cleanly
def slurm_script(gpus, cpus, mem, time_limit, partition, array, venv, logs, config_path):
    """Print a Slurm array job that runs `conceptmon dissect --shard I/N` per task.

    Example: conceptmon slurm-script --gpus 1 --array 0-7 > dissect.sbatch;
    sbatch dissect.sbatch runs/r1/conceptmon.yaml
    """
    from ..slurm import SlurmOptions, render

    kwargs = dict(gpus=gpus, cpus=cpus, mem=mem, time=time_limit, partition=partition, array=array, logs=logs,
                  config=config_path)
    options = SlurmOptions(**kwargs, **({"venv": venv} if venv is not None else {}))
    click.echo(render(options, given_options()), nl=False)
    Path(logs).mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    venv_bin = Path(options.venv) / "bin" / "conceptmon"
    if Path(options.venv).is_absolute() and not venv_bin.exists():
        log_to_stderr(f"notice: {venv_bin} does not exist here; each task checks again on its node")


def given_options() -> list[str]:
    """The options typed on the command line, in declaration order (recorded in the script)."""
    ctx = click.get_current_context()
    argv = []
    for param in ctx.command.params:
        if isinstance(param, click.Option) and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            argv += [param.opts[0], str(ctx.params[param.name])]
    return argv
