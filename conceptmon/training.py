"""Old home of the demo model, kept as an alias: configs written before the demo moved to
:mod:`conceptmon.demo` (``model.arch: conceptmon.training:small_resnet``, in demo folders
and script runs) still build the same model. New configs name
``conceptmon.demo.model:small_resnet``."""
from .demo.model import small_resnet

__all__ = ["small_resnet"]
