"""ImageNet-style ResNets (He et al., CVPR 2016) adapted to 32x32 inputs.

The network of the ImbSAM (Zhou et al., ICCV 2023) and SSE-SAM (Lyu et al., AAAI 2025) protocols: a
standard ResNet-34 (basic blocks, stages of [3, 4, 6, 3] blocks with 64/128/256/512 channels, 1x1
convolution + BatchNorm "projection" shortcuts where the shape changes) whose 7x7 stride-2 stem and max-pool
are replaced by a single 3x3 stride-1 convolution, so that 32x32 images keep a 32x32 first feature map.
Their code calls it "ResNet-32"; samkit names it ``"resnet34-cifar"`` to avoid confusion with the CIFAR
ResNet-32 of :mod:`samkit.models.resnet_cifar`. With 100 classes it has 21,328,292 parameters.
ResNet-18 of the same style ([2, 2, 2, 2] blocks) is ``"resnet18-cifar"``.

Initialisation follows the common ImageNet recipe: Kaiming-normal (fan-out, ReLU gain) for convolutions,
BatchNorm weights 1 and biases 0, PyTorch's default for the linear classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samkit.models.heads import Classifier, make_head

__all__ = ["BasicBlock", "ResNet", "resnet18_cifar", "resnet34_cifar"]


class BasicBlock(nn.Module):
    """Basic residual block with a projection (1x1 conv + BN) shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Named ``downsample`` like torchvision's, so state-dict keys match apart from ``fc`` -> ``head``.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(Classifier):
    """ImageNet-style ResNet with a 3x3 stride-1 stem and no max-pool, classifier in ``self.head``.

    Args:
        layers: number of basic blocks in each of the four stages (``[3, 4, 6, 3]`` for ResNet-34).
        num_classes: number of classes (logits).
        in_channels: input channels (3 for RGB, 1 for grayscale).
        head: ``"linear"`` or ``"normed"``.
        widths: channels of the four stages (64, 128, 256, 512 as in torchvision).

    ``forward(x)`` returns ``head(features(x))``; ``features(x)`` returns the pooled ``(B, widths[-1])``
    feature vector.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 100,
        in_channels: int = 3,
        head: str = "linear",
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or any(n < 1 for n in layers):
            raise ValueError(
                f"layers must give >= 1 block for each of the {len(widths)} stages, got {list(layers)}"
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        self.num_stages = len(widths)
        for index, (num_blocks, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlock(channels, width, stride if block_index == 0 else 1))
                channels = width
            # layer1 ... layer4, as in torchvision.
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.feature_dim = channels
        self.head = make_head(head, channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, feature_dim)`` globally pooled features that the head receives."""
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def resnet18_cifar(num_classes: int = 100, in_channels: int = 3, head: str = "linear") -> ResNet:
    """ResNet-18 ([2, 2, 2, 2] basic blocks) with a 3x3 stride-1 stem and no max-pool."""
    return ResNet([2, 2, 2, 2], num_classes, in_channels, head)


def resnet34_cifar(num_classes: int = 100, in_channels: int = 3, head: str = "linear") -> ResNet:
    """ResNet-34 ([3, 4, 6, 3] basic blocks) with a 3x3 stride-1 stem and no max-pool.

    The network of the ImbSAM and SSE-SAM protocols (their "ResNet-32"): 21,328,292 parameters with
    100 classes and a linear head.
    """
    return ResNet([3, 4, 6, 3], num_classes, in_channels, head)
