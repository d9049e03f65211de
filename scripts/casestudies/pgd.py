"""l-infinity PGD (Madry et al.) in [0, 1] pixel space, for the standard-vs-robust study."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conceptmon.demo.data import Normalizer
from conceptmon.demo.loop import InputHook


@dataclass(frozen=True)
class PGDSettings:
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalize: Normalizer,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The adversarial batch: ``steps`` signed-gradient steps of ``alpha`` within ``eps`` of ``x``."""
    was_training = model.training
    model.eval()  # attack the current weights without touching BatchNorm statistics
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        adv = (x + eps * noise).clamp_(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(normalize(adv)), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 1)
    model.train(was_training)
    return adv.detach()


def adversarial_inputs(settings: PGDSettings, normalize: Normalizer, generator: torch.Generator) -> InputHook:
    """The training loop's ``inputs`` hook that swaps each batch for its PGD examples."""

    def inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_attack(model, x, y, normalize, eps=settings.eps, alpha=settings.alpha, steps=settings.steps,
                          generator=generator)

    return inputs
