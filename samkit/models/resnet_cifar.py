"""CIFAR ResNets of He et al. (CVPR 2016, "Deep Residual Learning for Image Recognition", section 4.2).

The network of the LDAM-DRW protocol (Cao et al., NeurIPS 2019), whose code calls ResNet-32 "resnet32":

* a 3x3 convolution with 16 output channels, BatchNorm, ReLU;
* three stages of ``n`` basic blocks each, with 16, 32 and 64 channels; the first block of stages 2 and
  3 halves the spatial size with a stride-2 convolution (depth = 6n + 2: ResNet-20/32/56 for n = 3/5/9);
* "option A" shortcuts where the shape changes: the input is subsampled by taking every second pixel
  and the new channels are filled with zeros, so the shortcut has no parameters;
* global average pooling to a 64-dimensional feature vector, then the classifier ``model.head``.

Convolutions and linear layers get Kaiming-normal weights (fan-in, as ``torch.nn.init.kaiming_normal_``
defaults), as in the LDAM-DRW code. ResNet-32 with 10 classes and a linear head has 464,154 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samkit.models.heads import Classifier, make_head

__all__ = ["BasicBlockA", "CifarResNet", "ShortcutA", "resnet20", "resnet32", "resnet56"]


class ShortcutA(nn.Module):
    """Parameter-free shortcut ("option A" of He et al. 2016) for a change of shape.

    Subsamples the input spatially by ``stride`` (keeping every ``stride``-th pixel, the pixels a
    stride-``stride`` 3x3 convolution with padding 1 is centred on) and appends zero channels up to
    ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option-A shortcut can only add channels, got {in_channels} -> {out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            # F.pad pads the last dimensions first: (W_left, W_right, H_top, H_bottom, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


class BasicBlockA(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between, an identity or option-A shortcut, and a final ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2), classifier in ``self.head``.

    Args:
        num_blocks: basic blocks per stage (``n``); 3, 5 and 9 give ResNet-20, -32 and -56.
        num_classes: number of classes (logits).
        in_channels: input channels (3 for RGB, 1 for grayscale).
        head: ``"linear"`` or ``"normed"`` (the cosine classifier used with the LDAM loss).
        widths: channels of the three stages (16, 32, 64 in the paper).

    ``forward(x)`` returns ``head(features(x))``; ``features(x)`` returns the pooled ``(B, widths[-1])``
    feature vector.
    """

    def __init__(
        self,
        num_blocks: int,
        num_classes: int = 10,
        in_channels: int = 3,
        head: str = "linear",
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.num_blocks = num_blocks
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlockA(channels, width, stride if block_index == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = channels
        self.head = make_head(head, channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal for convolutions and plain linear layers, as in the LDAM-DRW code; the normed
        # head keeps its own initialisation.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, feature_dim)`` globally pooled features that the head receives."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def resnet20(num_classes: int = 10, in_channels: int = 3, head: str = "linear") -> CifarResNet:
    """ResNet-20 (3 blocks per stage, He et al. 2016)."""
    return CifarResNet(3, num_classes, in_channels, head)


def resnet32(num_classes: int = 10, in_channels: int = 3, head: str = "linear") -> CifarResNet:
    """ResNet-32 (5 blocks per stage): the network of the LDAM-DRW and Focal-SAM protocols."""
    return CifarResNet(5, num_classes, in_channels, head)


def resnet56(num_classes: int = 10, in_channels: int = 3, head: str = "linear") -> CifarResNet:
    """ResNet-56 (9 blocks per stage, He et al. 2016)."""
    return CifarResNet(9, num_classes, in_channels, head)
