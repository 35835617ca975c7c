"""A model without normalization layers, for runs that must equal each other across batch splits
(micro-batches, processes); importable as model.name=tiny_models:mlp when tests/ is on the path."""

from samkit.models.small import MLP


def mlp(num_classes: int, in_channels: int) -> MLP:
    return MLP(num_classes, in_channels, input_size=(28, 28), hidden=(32,))
