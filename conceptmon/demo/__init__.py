"""``conceptmon demo`` and the little it needs: the narrow ResNet (:mod:`.model`), its
synthetic scene-or-texture task (:mod:`.data`), the one training loop (:mod:`.loop`,
shared with the case-study scripts in ``scripts/casestudies``), and what the demo may
conclude from its run (:mod:`.verdict`). The runner itself is :mod:`.run`.
"""
from .run import DemoError, DemoResult, DemoSettings, run_demo
from .verdict import closing_line, learned, observation

__all__ = ["DemoError", "DemoResult", "DemoSettings", "closing_line", "learned", "observation", "run_demo"]
