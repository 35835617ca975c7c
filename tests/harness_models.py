"""Model factories that the harness tests name as model.name=harness_models:NAME."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A conv layer, BatchNorm (the running statistics under test) and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=2), nn.BatchNorm2d(4),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class NanOnFifth(TinyNet):
    """TinyNet whose 5th forward in training mode gets one NaN pixel (a bad batch)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(num_classes, in_channels)
        self.train_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_forwards += 1
            if self.train_forwards == 5:
                x = x.clone()
                x.view(-1)[0] = float("nan")
        return super().forward(x)


def cifar_only(num_classes: int = 10) -> nn.Module:
    """A model made for 3x32x32 images only (it does not fit Fashion-MNIST)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
