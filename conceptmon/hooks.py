"""Capture several layers' outputs in one forward pass, with hooks that are always removed."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import ConceptmonError
from .registry import did_you_mean


class LayerError(ConceptmonError):
    """A layer name that the model does not have."""


class _StopForward(Exception):
    """Raised from the last needed hook: layers after it are never computed."""


def resolve_layers(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """Modules by dotted name; an unknown name fails with the closest valid names."""
    modules = dict(model.named_modules())
    if not names:
        tops = [n for n in modules if n and "." not in n]
        raise LayerError(f"layers: none given; top-level modules of this model: {', '.join(tops)}")
    found = {}
    for name in names:
        if name not in modules or name == "":
            hint = did_you_mean(name, [n for n in modules if n], n=5, cutoff=0.4)
            raise LayerError(f"layers: no layer named {name!r} in this model{hint}")
        found[name] = modules[name]
    return found


def primary_output(output):
    """The tensor a layer's output stands for: the first item of a tuple (attention blocks
    return (hidden, weights)), or ``last_hidden_state`` (else the first tensor) of a
    mapping such as a transformers ``ModelOutput``."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, Mapping):
        hidden = output.get("last_hidden_state")
        if isinstance(hidden, torch.Tensor):
            return hidden
        return next((v for v in output.values() if isinstance(v, torch.Tensor)), output)
    return output


class LayerTrace:
    """Context manager recording the outputs of ``layers`` during ``run(x)``.

    >>> with LayerTrace(model, ["layer2", "layer4"]) as trace:
    ...     outputs = trace.run(images)   # {"layer2": tensor, "layer4": tensor}

    The forward pass stops as soon as every requested layer has produced its output,
    and the hooks are removed on exit, also when an exception escapes.
    """

    def __init__(self, model: torch.nn.Module, layers: list[str], stop_early: bool = True):
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.stop_early = stop_early
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerTrace":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            output = primary_output(output)
            if name not in self.outputs:  # a module called twice keeps its first output
                self.outputs[name] = output
            if self.stop_early and len(self.outputs) == len(self.modules):
                raise _StopForward

        return hook

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.outputs = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        missing = [n for n in self.modules if n not in self.outputs]
        if missing:
            raise LayerError(f"layers: {', '.join(missing)} never ran in the forward pass (not used by forward())")
        return self.outputs
