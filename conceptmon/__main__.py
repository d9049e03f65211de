"""``python -m conceptmon``: the same as the ``conceptmon`` command."""
from .entry import run

run()
