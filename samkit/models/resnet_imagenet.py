"""ImageNet ResNet-50 (He et al., CVPR 2016) and ResNeXt-50 32x4d (Xie et al., CVPR 2017), for 224x224
inputs: the networks of the large long-tailed benchmarks (ImageNet-LT, Places-LT, iNaturalist 2018).

The torchvision layout: a 7x7 stride-2 stem and a 3x3 stride-2 max-pool, four stages of [3, 4, 6, 3]
bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4) with the stride on the 3x3 convolution ("ResNet
v1.5"), 1x1 convolution + BatchNorm projection shortcuts where the shape changes, global average
pooling and the classifier in ``head``. ResNeXt splits the 3x3 convolution into ``groups`` groups of
``width_per_group`` channels (32 x 4 at the first stage). With 1000 classes and a linear head
ResNet-50 has 25,557,032 parameters and ResNeXt-50 32x4d 25,028,904, as in torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samkit.models.heads import Classifier, make_head

__all__ = ["Bottleneck", "ImageNetResNet", "resnet50", "resnext50_32x4d"]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups) -> 1x1 (x4 channels) with BatchNorm, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, groups: int = 1,
                 width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ImageNetResNet(Classifier):
    """A bottleneck ResNet / ResNeXt for ImageNet-size images, classifier in ``self.head``.

    Args:
        layers: bottleneck blocks per stage ([3, 4, 6, 3] for the 50-layer networks).
        num_classes: number of classes (logits).
        in_channels: input channels.
        head: ``"linear"`` or ``"normed"``.
        groups, width_per_group: ResNeXt's cardinality and group width (1, 64: a plain ResNet).
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3,
                 head: str = "linear", groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must give >= 1 block for each of 4 stages, got {list(layers)}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for index, (num_blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(Bottleneck(channels, planes, stride, groups, width_per_group))
                channels = planes * Bottleneck.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.feature_dim = channels
        self.head = make_head(head, channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, 2048)`` globally pooled features that the head receives."""
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for index in range(4):
            out = getattr(self, f"layer{index + 1}")(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def resnet50(num_classes: int = 1000, in_channels: int = 3, head: str = "linear") -> ImageNetResNet:
    """ResNet-50: 25,557,032 parameters with 1000 classes."""
    return ImageNetResNet([3, 4, 6, 3], num_classes, in_channels, head)


def resnext50_32x4d(num_classes: int = 1000, in_channels: int = 3,
                    head: str = "linear") -> ImageNetResNet:
    """ResNeXt-50 32x4d: 25,028,904 parameters with 1000 classes."""
    return ImageNetResNet([3, 4, 6, 3], num_classes, in_channels, head, 32, 4)
