"""``python -m conceptmon``: the same as the ``conceptmon`` command."""
from .cli import main

main()
