"""The ``conceptmon`` command: thin Click commands over the library API."""
from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conceptmon")
def main():
    """Concept-Monitor: label every neuron of every checkpoint with concepts, place them
    in one embedding space, and watch how they change over training.

    Typical use: conceptmon init; conceptmon dissect --ckpts runs/x/; conceptmon plot --anchors windmill,field
    """


# Each command lives in its own module; importing it registers it on ``main``.
from . import dissect  # noqa: E402,F401
from . import stats  # noqa: E402,F401
from . import watch  # noqa: E402,F401
from . import embed  # noqa: E402,F401
from . import probe  # noqa: E402,F401
from . import demo  # noqa: E402,F401
from . import plugins  # noqa: E402,F401
from . import validate  # noqa: E402,F401
from . import export  # noqa: E402,F401
from . import slurm  # noqa: E402,F401
# [commands: add one import line per command module above this marker]
