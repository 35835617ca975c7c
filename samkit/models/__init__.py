"""Models for samkit: CIFAR ResNets, ImageNet-style ResNets for 32x32 inputs, ResNet-50 and
ResNeXt-50 for 224x224 inputs, small CNNs, heads.

Every model here is a plain :class:`torch.nn.Module` with

* ``forward(x) -> logits``;
* ``features(x)``: the features fed to the classifier;
* ``head``: the classifier (features -> logits), called exactly once per forward, last.

Nothing else in samkit requires these models: any ``nn.Module`` works with the optimizers and the
training loop; only the classifier-only variant of CC-SAM needs a ``head`` attribute and a ``features``
method, which these models provide.

Build one by name with :func:`build_model`; :func:`available_models` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from samkit.models.heads import HEAD_KINDS, Classifier, NormedLinear, make_head
from samkit.models.resnet import BasicBlock, ResNet, resnet18_cifar, resnet34_cifar
from samkit.models.resnet_cifar import (
    BasicBlockA,
    CifarResNet,
    ShortcutA,
    resnet20,
    resnet32,
    resnet56,
)
from samkit.models.resnet_imagenet import (
    Bottleneck,
    ImageNetResNet,
    resnet50,
    resnext50_32x4d,
)
from samkit.models.small import CNN1D, MLP, SmallCNN

__all__ = [
    "CNN1D",
    "Classifier",
    "HEAD_KINDS",
    "ImageNetResNet",
    "MLP",
    "BasicBlock",
    "BasicBlockA",
    "Bottleneck",
    "CifarResNet",
    "NormedLinear",
    "ResNet",
    "ShortcutA",
    "SmallCNN",
    "available_models",
    "build_model",
    "make_head",
    "resnet18_cifar",
    "resnet20",
    "resnet32",
    "resnet34_cifar",
    "resnet50",
    "resnet56",
    "resnext50_32x4d",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda **kw: CifarResNet(3, **kw),
    "resnet32": lambda **kw: CifarResNet(5, **kw),
    "resnet56": lambda **kw: CifarResNet(9, **kw),
    "resnet18-cifar": lambda **kw: ResNet([2, 2, 2, 2], **kw),
    "resnet34-cifar": lambda **kw: ResNet([3, 4, 6, 3], **kw),
    "resnet50": resnet50,
    "resnext50-32x4d": resnext50_32x4d,
    "small-cnn": SmallCNN,
    "mlp": MLP,
    "cnn1d": CNN1D,
}


def available_models() -> list[str]:
    """The names :func:`build_model` accepts, sorted."""
    return sorted(_REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    head: str = "linear",
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of :func:`available_models` (``"resnet20"``, ``"resnet32"``, ``"resnet56"``,
            ``"resnet18-cifar"``, ``"resnet34-cifar"``, ``"resnet50"``, ``"resnext50-32x4d"``,
            ``"small-cnn"``, ``"mlp"``, ``"cnn1d"``).
        num_classes: number of classes (logits).
        in_channels: input channels (3 for RGB, 1 for grayscale or MNIST-1D).
        head: ``"linear"`` or ``"normed"`` (the LDAM cosine classifier).
        **kwargs: passed to the model's constructor (e.g. ``hidden=`` for ``"small-cnn"`` and ``"mlp"``,
            ``input_size=`` for ``"mlp"``, ``channels=`` for ``"cnn1d"``, ``widths=`` for the ResNets).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or an unknown head kind.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {head!r}; valid kinds: {', '.join(HEAD_KINDS)}")
    return _REGISTRY[key](num_classes=num_classes, in_channels=in_channels, head=head, **kwargs)
