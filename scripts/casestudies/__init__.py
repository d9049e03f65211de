"""What the paper's case studies need beyond the monitoring package, for the scripts beside it.

``python scripts/train_pgd.py`` puts ``scripts/`` on the import path, so the scripts import
this package as ``casestudies``; ``conceptmon`` itself must be installed
(``pip install -e .`` or ``make install``). The training loop is not here: every script
trains with the demo's loop, :mod:`conceptmon.demo.loop`, through its input and
after-step hooks.

  options      command-line options shared by the scripts, one-line errors
  datasets     Places365, CIFAR, image folders and the synthetic task; how to obtain each
  runs         RunFolder: checkpoints, history and the dissection config of one run
  pgd          l-infinity PGD attack and adversarial training inputs
  lottery      global magnitude pruning masks for lottery-ticket rewinding
  finetuning   pretrained backbones with a new head
"""
from typing import NoReturn

from conceptmon.errors import ConceptmonError


class TrainingError(ConceptmonError):
    """Training data or settings that cannot be used (missing data set, bad option)."""


def fail(message: str) -> NoReturn:
    raise TrainingError(message)
