"""Global magnitude pruning for the lottery-ticket study (iterative pruning with rewinding)."""
from __future__ import annotations

import torch
from torch import nn

from . import TrainingError


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Convolution and linear weights: what lottery-ticket pruning removes (not biases or BN)."""
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def global_magnitude_masks(
    model: nn.Module, fraction: float, masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks that remove ``fraction`` of the still-unpruned weights with the smallest |w|,
    ranked globally over all prunable layers (as in the lottery-ticket experiments)."""
    if not 0 <= fraction < 1:
        raise TrainingError(f"--prune-fraction: must be in [0, 1), got {fraction}")
    weights = prunable_weights(model)
    masks = masks or {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    alive = torch.cat([w.detach().abs()[masks[k]].flatten().float().cpu() for k, w in weights.items()])
    n_prune = int(round(fraction * alive.numel()))
    if n_prune == 0:
        return {k: m.clone() for k, m in masks.items()}
    cutoff = torch.kthvalue(alive, n_prune).values
    new = {}
    for k, w in weights.items():
        keep = w.detach().abs().cpu() > cutoff
        new[k] = (masks[k].cpu() & keep).to(w.device)
    return new


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Zero pruned weights in place (after init, rewinding and every optimiser step)."""
    if not masks:
        return
    weights = prunable_weights(model)
    for k, m in masks.items():
        weights[k].mul_(m.to(weights[k].device, weights[k].dtype))


def sparsity(masks: dict[str, torch.Tensor] | None) -> float:
    """Share of prunable weights removed."""
    if not masks:
        return 0.0
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total
