"""What every command shares: finding the config and output folder, and one-line errors."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from ..config import Config, ConfigError, DEFAULT_CONFIG, load_config, read_out_setting, resolve_out
from ..errors import ConceptmonError


def fail_cleanly(fn):
    """Turn expected errors into one line on stderr and exit 1; no traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConceptmonError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def log_to_stderr(message: str) -> None:
    """Progress and notices go to stderr, so stdout stays clean for pipelines."""
    click.echo(message, err=True)


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help=f"YAML config (default: ./{DEFAULT_CONFIG}).",
)
out_option = click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Output folder (default: the config's out:, else ./conceptmon_out).",
)


def load_cfg(config_path: Path | None, required: bool = True) -> Config | None:
    """The config from --config or ./conceptmon.yaml; None when optional and absent."""
    if config_path is None and not Path(DEFAULT_CONFIG).exists() and not required:
        return None
    return load_config(config_path)


def find_out(config_path: Path | None, out: Path | None) -> Path:
    """Output folder for commands that read results: --out, else the config's ``out:``, else
    the default. Only the ``out:`` key is read (commands that read results need no model,
    detector or probe, so the rest of the config is not validated or imported here)."""
    if out is not None:
        return Path(out)
    path = Path(config_path) if config_path is not None else Path(DEFAULT_CONFIG)
    if config_path is not None and not path.exists():
        raise ConfigError(f"{path}: config file not found")
    return resolve_out(None, read_out_setting(path) if path.exists() else None)


def split_csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_epochs(value: str | None) -> list[int] | None:
    items = split_csv(value)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint="--epochs")
