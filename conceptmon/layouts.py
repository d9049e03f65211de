"""How a layer's output is read: detected once per layer from the module and its output shape.

Detectors see one canonical form: maps ``(B, C, H, W)`` or linear outputs ``(B, C)``.

=========  ====================  ==========================================================
layout     raw output            canonical form
=========  ====================  ==========================================================
nchw       (B, C, H, W)          as is (CNNs)
nhwc       (B, H, W, C)          permuted to (B, C, H, W) (Swin, ConvNeXt-style blocks)
tokens     (B, P + h*w, C)       the h*w patch tokens as a (B, C, h, w) map; the P prefix
                                 tokens (class, registers) are left out -- or, for a detector
                                 that asks for it (CLIP-Dissect ``pool: cls``), the first
                                 token as (B, C)
linear     (B, C)                as is (a unit's value covers the whole image)
=========  ====================  ==========================================================

``auto`` decides from the shape and the input size, and from the module where the shape
alone is ambiguous; anything it cannot decide is refused before the first batch with one
line naming the layer, its shape and the ``layout`` values that would work.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .config import LAYOUTS, LayerSpec
from .errors import ConceptmonError

MAX_PREFIX_TOKENS = 16
"""Prefix tokens (class + registers) tried when inferring a token grid."""


class LayoutError(ConceptmonError):
    """A layer output whose layout cannot be detected or does not fit the configured one."""


@dataclass(frozen=True)
class ResolvedLayout:
    layout: str
    channels: int
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    """(h, w) of the canonical map (maps and tokens); None for linear outputs."""

    def describe(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid else None
        return d


def _shape(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _hint(layer: str, shape, reason: str) -> LayoutError:
    return LayoutError(
        f"layer {layer}: output {_shape(shape)} {reason}; set its layout in the config "
        f"(layers: [{{name: {layer}, layout: L}}] with L one of {', '.join(LAYOUTS[1:])}: "
        f"nchw (B, C, H, W), nhwc (B, H, W, C), tokens (B, prefix + h*w, C), linear (B, C))"
    )


def _module_channels(module: torch.nn.Module) -> tuple[set[int], set[int]]:
    """Channel counts the module's last layers suggest: (conv-like, channels-last-like).

    Conv and BatchNorm layers work on dim 1; LayerNorm and Linear on the last dim.
    """
    conv, last = set(), set()
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            conv.add(int(m.out_channels))
        elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.InstanceNorm2d)):
            conv.add(int(getattr(m, "num_features", getattr(m, "num_channels", 0))))
        elif isinstance(m, torch.nn.LayerNorm):
            last.add(int(m.normalized_shape[-1]))
        elif isinstance(m, torch.nn.Linear):
            last.add(int(m.out_features))
    return conv, last


def infer_token_grid(n_tokens: int, input_hw: tuple[int, int], prefix: int | None = None,
                     grid: tuple[int, int] | None = None) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, (h, w)) for a token sequence, or None when nothing fits.

    The grid must tile the input with square patches of one integer size; the smallest
    prefix that allows that wins (ViT: 1 class token; DeiT: 2; with registers: 5).
    """
    if grid is not None:
        p = n_tokens - grid[0] * grid[1] if prefix is None else prefix
        return (p, tuple(grid)) if p >= 0 and p + grid[0] * grid[1] == n_tokens else None
    height, width = input_hw
    prefixes = [prefix] if prefix is not None else range(0, min(MAX_PREFIX_TOKENS, n_tokens - 1) + 1)
    for p in prefixes:
        n = n_tokens - p
        if n < 1:
            continue
        # h / w = height / width and h * w = n
        h = round(math.sqrt(n * height / width))
        for hh in (h - 1, h, h + 1):
            if hh < 1 or n % hh:
                continue
            ww = n // hh
            if height % hh == 0 and width % ww == 0 and height // hh == width // ww:
                return p, (hh, ww)
    return None


def resolve_layout(spec: LayerSpec, module: torch.nn.Module, shape: tuple[int, ...],
                   input_hw: tuple[int, int]) -> ResolvedLayout:
    """The layout of ``spec``'s output of ``shape`` for images of ``input_hw``."""
    layer, want, dims = spec.name, spec.layout, len(shape)
    if dims == 2:
        if want not in ("auto", "linear"):
            raise _hint(layer, shape, f"is (B, C), not layout {want}")
        return ResolvedLayout("linear", int(shape[1]))
    if dims == 4:
        if want not in ("auto", "nchw", "nhwc"):
            raise _hint(layer, shape, f"is 4-D, not layout {want}")
        layout = want if want != "auto" else _detect_4d(layer, module, shape, input_hw)
        if layout == "nchw":
            return ResolvedLayout("nchw", int(shape[1]), 0, (int(shape[2]), int(shape[3])))
        return ResolvedLayout("nhwc", int(shape[3]), 0, (int(shape[1]), int(shape[2])))
    if dims == 3:
        if want not in ("auto", "tokens"):
            raise _hint(layer, shape, f"is 3-D, not layout {want}")
        found = infer_token_grid(int(shape[1]), input_hw, spec.prefix_tokens, spec.grid)
        if found is None:
            raise _hint(layer, shape, f"looks like tokens (B, T, C) but no prefix + h x w grid of square patches "
                                      f"fits a {input_hw[0]}x{input_hw[1]} input (give grid: [h, w] and "
                                      f"prefix_tokens)")
        prefix, grid = found
        return ResolvedLayout("tokens", int(shape[2]), prefix, grid)
    raise LayoutError(
        f"layer {layer}: output {_shape(shape)} " + ("has no unit dimension (one value per image)" if dims < 2
                                                     else f"is {dims}-D, which no layout reads")
        + "; dissect a layer whose output has units: (B, C, H, W), (B, H, W, C), (B, tokens, C) or (B, C)"
    )


def _detect_4d(layer, module, shape, input_hw) -> str:
    height, width = input_hw
    aspect = height / width

    def spatial(a: int, b: int) -> bool:
        return a >= 1 and b >= 1 and abs(a / b - aspect) < 0.15 * aspect

    nchw, nhwc = spatial(shape[2], shape[3]), spatial(shape[1], shape[2])
    if nchw != nhwc:
        return "nchw" if nchw else "nhwc"
    conv, last = _module_channels(module)
    by_module_nchw = shape[1] in conv and shape[3] not in last
    by_module_nhwc = shape[3] in last and shape[1] not in conv
    if by_module_nchw != by_module_nhwc:
        return "nchw" if by_module_nchw else "nhwc"
    raise _hint(layer, shape, "could be (B, C, H, W) or (B, H, W, C)")


def canonical(output: torch.Tensor, resolved: ResolvedLayout, class_token: bool = False) -> torch.Tensor:
    """The canonical form of a raw output: (B, C, H, W) maps or (B, C) vectors."""
    if output.dim() == {"linear": 2, "nchw": 4, "nhwc": 4, "tokens": 3}[resolved.layout] and \
            output.shape[-1 if resolved.layout in ("nhwc", "tokens", "linear") else 1] == resolved.channels:
        if resolved.layout == "nhwc":
            return output.permute(0, 3, 1, 2)
        if resolved.layout == "tokens":
            if class_token and resolved.prefix_tokens > 0:
                return output[:, 0, :]
            h, w = resolved.grid
            patches = output[:, resolved.prefix_tokens:, :]
            return patches.transpose(1, 2).reshape(output.shape[0], resolved.channels, h, w)
        return output
    raise LayoutError(f"output of shape {_shape(output.shape)} does not fit layout {resolved.layout} with "
                      f"{resolved.channels} channels (found at the first batch)")


__all__ = ["LayoutError", "ResolvedLayout", "canonical", "infer_token_grid", "resolve_layout"]
