"""The demo's model: a narrow ResNet with torchvision's layer names.

Configs name it ``model.arch: conceptmon.demo.model:small_resnet``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..models import ModelError


class SmallResNet(nn.Module):
    """A narrow ResNet with torchvision's layer names (conv1, bn1, layer1..layer4, fc).

    Keeping torchvision's names means the same ``layers: [layer2, layer3, layer4]``
    config works for the demo model and for a real ResNet-18.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Iterable[int] = (16, 32, 64, 128),
        blocks: Iterable[int] = (1, 1, 1, 1),
        stem_stride: int = 2,
    ):
        super().__init__()
        widths, blocks = [int(w) for w in widths], [int(b) for b in blocks]
        if len(widths) != 4 or len(blocks) != 4:
            raise ModelError(f"model.kwargs: widths and blocks need 4 entries each, got {widths} and {blocks}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(n):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or in_ch != w:
                    down = nn.Sequential(nn.Conv2d(in_ch, w, 1, stride=s, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(in_ch, w, stride=s, downsample=down))
                in_ch = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(
    num_classes: int = 10,
    widths: Iterable[int] = (16, 32, 64, 128),
    blocks: Iterable[int] = (1, 1, 1, 1),
    stem_stride: int = 2,
) -> SmallResNet:
    """Factory for ``model.arch: conceptmon.demo.model:small_resnet``."""
    return SmallResNet(num_classes=num_classes, widths=widths, blocks=blocks, stem_stride=stem_stride)


MODEL_ARCH = f"{__name__}:{small_resnet.__name__}"
"""The ``model.arch`` spec of :func:`small_resnet`, as configs write it."""
