"""Small models for fast CPU work: a 2D CNN for 28x28 grayscale images, an MLP and a 1D CNN.

They follow the same contract as the ResNets: the classifier lives in ``model.head`` and is called once,
last, on ``model.features(x)``.

* :class:`SmallCNN`: two conv-BN-ReLU-max-pool stages (32 and 64 channels), then a flattened (or
  globally averaged) feature map, an optional hidden layer, and the head. Sized for Fashion-MNIST
  (Xiao et al. 2017): one epoch of the 60,000 training images at batch 128 (forward, backward, SGD)
  takes about 16 to 22 s on two CPU cores, about 30 s on one, and reaches about 90% balanced test
  accuracy in three epochs.
* :class:`MLP`: flatten, then fully connected hidden layers with ReLU, then the head; the MNIST-1D
  baseline family (Greydanus, 2020, "Scaling down deep learning").
* :class:`CNN1D`: 1D convolutions with BatchNorm and ReLU and global average pooling, for MNIST-1D
  signals of shape ``(N, 1, 40)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from samkit.models.heads import Classifier

__all__ = ["CNN1D", "MLP", "SmallCNN"]


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class SmallCNN(Classifier):
    """A small 2D CNN: [conv3x3-BN-ReLU-maxpool2] x len(channels), pool, optional hidden layer, head.

    Args:
        num_classes: number of classes (logits).
        in_channels: input channels (1 for Fashion-MNIST).
        head: ``"linear"`` or ``"normed"``.
        channels: output channels of the conv stages (each halves the spatial size).
        hidden: size of a fully connected ReLU layer before the head; ``None`` or 0 for none.
        pool: ``"flatten"`` keeps the whole last feature map (needs ``input_size``), ``"avg"`` averages it
            globally (any input size).
        input_size: side of the square input images, used only by ``pool="flatten"``.

    The default (``channels=(32, 64)``, ``hidden=128``, ``pool="flatten"``, 28x28) has 421,738
    parameters with 10 classes and a linear head.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        head: str = "linear",
        channels: Sequence[int] = (32, 64),
        hidden: int | None = 128,
        pool: str = "flatten",
        input_size: int = 28,
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        if len(channels) < 1:
            raise ValueError("channels must name at least one conv stage")
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool must be 'flatten' or 'avg', got {pool!r}")
        layers: list[nn.Module] = []
        previous = in_channels
        size = input_size
        for width in channels:
            _check_positive("channel width", width)
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            previous = width
            size //= 2
        if pool == "flatten":
            if size < 1:
                raise ValueError(
                    f"input_size {input_size} is too small for {len(channels)} pooling stages"
                )
            layers.append(nn.Flatten(1))
            dim = previous * size * size
        else:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
            dim = previous
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.ReLU()]
            dim = hidden
        self._assemble(layers, dim, num_classes, head)


class MLP(Classifier):
    """Multi-layer perceptron: flatten, then [Linear-ReLU] for each hidden size, then the head.

    Args:
        num_classes: number of classes (logits).
        in_channels: input channels.
        head: ``"linear"`` or ``"normed"``.
        input_size: spatial shape of one channel: an int for 1D signals (40 for MNIST-1D) or a tuple such
            as ``(28, 28)`` for images. The input is flattened to ``in_channels * prod(input_size)``.
        hidden: sizes of the hidden layers (the features are the last one's output; with no hidden layer
            the features are the flattened input).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        head: str = "linear",
        input_size: int | Sequence[int] = 40,
        hidden: Sequence[int] = (256, 256),
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        shape = (input_size,) if isinstance(input_size, int) else tuple(input_size)
        for side in shape:
            _check_positive("input_size", side)
        dim = in_channels * math.prod(shape)
        layers: list[nn.Module] = [nn.Flatten(1)]
        for width in hidden:
            _check_positive("hidden width", width)
            layers += [nn.Linear(dim, width), nn.ReLU()]
            dim = width
        self._assemble(layers, dim, num_classes, head)


class CNN1D(Classifier):
    """1D CNN for signals of shape ``(N, in_channels, L)`` (MNIST-1D: ``(N, 1, 40)``).

    Each stage is Conv1d (kernel ``kernel_size``, "same" padding; stride 1 in the first stage, 2 after) -
    BatchNorm - ReLU; the last feature map is averaged over its length, so any signal length works.

    Args:
        num_classes: number of classes (logits).
        in_channels: input channels.
        head: ``"linear"`` or ``"normed"``.
        channels: output channels of the conv stages.
        kernel_size: odd kernel size of every convolution.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        head: str = "linear",
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        if len(channels) < 1:
            raise ValueError("channels must name at least one conv stage")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            _check_positive("channel width", width)
            stride = 1 if index == 0 else 2
            layers += [
                nn.Conv1d(
                    previous,
                    width,
                    kernel_size,
                    stride=stride,
                    padding=kernel_size // 2,
                    bias=False,
                ),
                nn.BatchNorm1d(width),
                nn.ReLU(),
            ]
            previous = width
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(1)]
        self._assemble(layers, previous, num_classes, head)
