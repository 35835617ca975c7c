"""Tests of samkit.models: shapes, parameter counts from hand formulas, the head contract, heads."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from samkit.models import (
    CNN1D,
    MLP,
    BasicBlockA,
    CifarResNet,
    NormedLinear,
    ResNet,
    ShortcutA,
    SmallCNN,
    available_models,
    build_model,
    make_head,
    resnet32,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny inputs: one intra-op thread is as fast, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# name -> (num_classes, in_channels, input shape of one sample)
CASES = {
    "resnet20": (10, 3, (3, 32, 32)),
    "resnet32": (10, 3, (3, 32, 32)),
    "resnet56": (7, 3, (3, 32, 32)),
    "resnet18-cifar": (5, 3, (3, 32, 32)),
    "resnet34-cifar": (100, 3, (3, 32, 32)),
    "small-cnn": (10, 1, (1, 28, 28)),
    "mlp": (10, 1, (1, 40)),
    "cnn1d": (10, 1, (1, 40)),
}
# The biggest models get a single sample to keep the tests fast.
BATCH = {"resnet18-cifar": 1, "resnet34-cifar": 1}
# 224x224 networks: too big for the per-model loops above; tested on their own below.
IMAGENET_MODELS = ["resnet50", "resnext50-32x4d"]


def make(name: str, head: str = "linear", **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    classes, channels, _ = CASES[name]
    return build_model(name, classes, in_channels=channels, head=head, **kwargs)


def sample(name: str, batch: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch or BATCH.get(name, 3), *CASES[name][2], generator=generator)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter counts by hand


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # no bias: every conv is followed by BatchNorm


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running statistics are buffers)


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def cifar_resnet_params(n: int, classes: int, in_ch: int = 3, normed: bool = False) -> int:
    """He et al.'s CIFAR ResNet: stem, 3 stages of n blocks (two conv3x3+BN), option-A shortcuts."""
    total = conv(in_ch, 16, 3) + bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            cin = width  # option-A shortcuts add nothing
    return total + linear(64, classes, bias=not normed)


def imagenet_resnet_params(layers: list[int], classes: int, in_ch: int = 3) -> int:
    """3x3-stem ResNet with basic blocks and 1x1-conv+BN projection shortcuts where the shape changes."""
    total = conv(in_ch, 64, 3) + bn(64)
    cin = 64
    for stage, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512))):
        for block in range(blocks):
            total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if block == 0 and (stage > 0 or cin != width):
                total += conv(cin, width, 1) + bn(width)
            cin = width
    return total + linear(512, classes)


def test_resnet32_parameter_count() -> None:
    # Closed form for 10 classes: stem 464; stage 1: 5 * 2 * (2304 + 32) = 23,360;
    # stage 2: (4608 + 64) + (9216 + 64) + 4 * 2 * (9216 + 64) = 88,192;
    # stage 3: (18432 + 128) + (36864 + 128) + 4 * 2 * (36864 + 128) = 351,488; head 650.
    assert 464 + 23_360 + 88_192 + 351_488 + 650 == 464_154
    assert cifar_resnet_params(5, 10) == 464_154
    assert count(resnet32(10)) == 464_154
    assert count(resnet32(10, head="normed")) == cifar_resnet_params(5, 10, normed=True) == 464_144
    assert count(resnet32(100)) == cifar_resnet_params(5, 100)
    assert count(resnet32(10, in_channels=1)) == cifar_resnet_params(5, 10, in_ch=1)


def test_other_cifar_resnet_counts() -> None:
    assert count(build_model("resnet20", 10)) == cifar_resnet_params(3, 10) == 269_722
    assert count(build_model("resnet56", 10)) == cifar_resnet_params(9, 10) == 853_018


def test_imagenet_style_resnet_counts() -> None:
    assert count(build_model("resnet34-cifar", 100)) == imagenet_resnet_params([3, 4, 6, 3], 100)
    assert imagenet_resnet_params([3, 4, 6, 3], 100) == 21_328_292
    assert count(build_model("resnet18-cifar", 10)) == imagenet_resnet_params([2, 2, 2, 2], 10)


def bottleneck_resnet_params(classes: int, groups: int = 1, width_per_group: int = 64) -> int:
    """Parameters of a [3, 4, 6, 3] bottleneck ResNet(Xt) for 224x224 images, counted by hand."""
    total = 3 * 64 * 49 + 2 * 64  # 7x7 stem conv + BN
    channels = 64
    for blocks, planes in zip([3, 4, 6, 3], [64, 128, 256, 512]):
        width = planes * width_per_group // 64 * groups
        for b in range(blocks):
            total += channels * width + 2 * width  # 1x1 reduce + BN
            total += width * (width // groups) * 9 + 2 * width  # grouped 3x3 + BN
            total += width * planes * 4 + 2 * planes * 4  # 1x1 expand + BN
            if b == 0:  # projection shortcut (stride 2, or 64 -> 256 channels)
                total += channels * planes * 4 + 2 * planes * 4
            channels = planes * 4
    return total + channels * classes + classes


def test_resnet50_and_resnext50_parameter_counts() -> None:
    """The known torchvision counts: ResNet-50 25,557,032, ResNeXt-50 32x4d 25,028,904 (1000
    classes), and the hand count for other class numbers."""
    resnet = build_model("resnet50", 1000)
    assert count(resnet) == bottleneck_resnet_params(1000) == 25_557_032
    assert count(build_model("resnext50-32x4d", 1000)) == bottleneck_resnet_params(
        1000, 32, 4) == 25_028_904
    x = torch.randn(2, 3, 32, 32)
    resnet.eval()
    with torch.no_grad():
        features = resnet.features(x)
        assert features.shape == (2, 2048)
        torch.testing.assert_close(resnet(x), resnet.head(features))


def test_small_cnn_parameter_count() -> None:
    expected = conv(1, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64)
    expected += linear(64 * 7 * 7, 128) + linear(128, 10)
    assert count(SmallCNN(10, in_channels=1)) == expected == 421_738


# ---------------------------------------------------------------- CIFAR ResNet structure


def test_option_a_shortcut_has_no_parameters_and_pads_zeros() -> None:
    model = resnet32(10)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # first block of stages 2 and 3
    assert all(not list(s.parameters()) and not list(s.buffers()) for s in shortcuts)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlockA)]
    assert len(blocks) == 15 and sum(isinstance(b.shortcut, nn.Identity) for b in blocks) == 13

    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4))


def test_projection_shortcuts_in_imagenet_style_resnet() -> None:
    model = build_model("resnet18-cifar", 10)
    assert isinstance(model, ResNet)
    projections = [name for name, _ in model.named_modules() if name.endswith("downsample")]
    assert projections == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]


def test_kaiming_normal_init() -> None:
    model = resnet32(10)
    weight = model.layer3[2].conv1.weight  # 64 x 64 x 3 x 3, fan-in 576
    expected_std = (2.0 / 576) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.05
    assert abs(model.head.weight.std().item() / (2.0 / 64) ** 0.5 - 1) < 0.15


# ---------------------------------------------------------------- the forward / head contract


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_and_head_contract(name: str) -> None:
    model = make(name).eval()
    x = sample(name)
    classes = CASES[name][0]
    with torch.no_grad():
        logits = model(x)
        features = model.features(x)
    assert logits.shape == (x.shape[0], classes)
    assert features.dim() == 2 and features.shape[0] == x.shape[0]
    assert isinstance(model.head, nn.Module)
    # The head alone maps the features to the logits.
    with torch.no_grad():
        torch.testing.assert_close(model.head(features), logits)

    class Recorder(nn.Module):
        """Stands in for the head: records what it receives and returns a marker tensor."""

        def __init__(self) -> None:
            super().__init__()
            self.inputs: list[torch.Tensor] = []
            self.output = torch.full((x.shape[0], 3), 7.0)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            self.inputs.append(h.detach().clone())
            return self.output

    recorder = Recorder()
    model.head = recorder
    with torch.no_grad():
        out = model(x)
    assert len(recorder.inputs) == 1  # called exactly once per forward
    assert out is recorder.output  # nothing is applied after the head
    torch.testing.assert_close(recorder.inputs[0], features)


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_mode_is_deterministic(name: str) -> None:
    model = make(name).eval()
    x = sample(name)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["resnet20", "small-cnn", "cnn1d", "mlp"])
def test_normed_head_outputs_lie_in_unit_interval(name: str) -> None:
    model = make(name, head="normed").eval()
    assert isinstance(model.head, NormedLinear)
    with torch.no_grad():
        out = model(sample(name) * 100)
    assert out.abs().max() <= 1.0 + 1e-6


def test_normed_linear() -> None:
    torch.manual_seed(0)
    head = NormedLinear(64, 10)
    assert head.weight.shape == (64, 10)
    assert list(dict(head.named_parameters())) == ["weight"]  # no bias
    assert (head.weight.norm(dim=0) <= 1.0 + 1e-5).all()
    x = torch.randn(5, 64) * 50
    out = head(x)
    assert out.shape == (5, 10) and out.abs().max() <= 1.0 + 1e-6
    # Cosine similarity by an independent formula.
    w = head.weight.detach()
    cosine = (x @ w) / (x.norm(dim=1, keepdim=True) * w.norm(dim=0, keepdim=True))
    torch.testing.assert_close(out.detach(), cosine, rtol=1e-5, atol=1e-6)
    # A feature parallel to a class column scores exactly 1 for that class.
    assert torch.isclose(head(w[:, 3].unsqueeze(0) * 4)[0, 3], torch.tensor(1.0))
    assert head(torch.zeros(1, 64)).isfinite().all()  # a zero feature does not give NaN


def test_make_head() -> None:
    assert isinstance(make_head("linear", 8, 3), nn.Linear)
    assert isinstance(make_head("normed", 8, 3), NormedLinear)
    with pytest.raises(ValueError, match="linear, normed"):
        make_head("cosine", 8, 3)
    with pytest.raises(ValueError):
        make_head("linear", 8, 0)


# ---------------------------------------------------------------- inputs, training, registry


def test_grayscale_inputs() -> None:
    for name in ("resnet20", "resnet18-cifar"):
        model = build_model(name, 10, in_channels=1).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert isinstance(build_model("small-cnn", 10, in_channels=1), SmallCNN)
    # 28x28 grayscale through a CIFAR ResNet works too (global pooling).
    with torch.no_grad():
        assert build_model("resnet20", 10, in_channels=1).eval()(
            torch.randn(2, 1, 28, 28)
        ).shape == (
            2,
            10,
        )
    mlp = build_model("mlp", 10, in_channels=1, input_size=(28, 28), hidden=(32,))
    assert isinstance(mlp, MLP) and mlp(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    rgb = build_model("small-cnn", 10, in_channels=3, input_size=32)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    pooled = build_model("small-cnn", 10, in_channels=1, pool="avg", hidden=None)
    assert pooled.features(torch.randn(2, 1, 20, 20)).shape == (2, 64)
    assert isinstance(build_model("cnn1d", 4, in_channels=2), CNN1D)
    assert build_model("cnn1d", 4, in_channels=2)(torch.randn(3, 2, 57)).shape == (3, 4)


@pytest.mark.parametrize("name", ["resnet20", "small-cnn", "mlp", "cnn1d"])
def test_training_step_reaches_every_parameter(name: str) -> None:
    model = make(name).train()
    x = sample(name, batch=4)
    target = torch.arange(4) % CASES[name][0]
    nn.functional.cross_entropy(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_models_are_plain_modules() -> None:
    model = make("resnet20").eval()
    clone = copy.deepcopy(model)
    x = sample("resnet20")
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    fresh = build_model("resnet20", 10)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    assert isinstance(model, CifarResNet)


def test_build_model_registry() -> None:
    assert available_models() == sorted([*CASES, *IMAGENET_MODELS])
    with pytest.raises(ValueError, match="valid names: .*resnet32.*small-cnn"):
        build_model("resnet101", 10)
    with pytest.raises(ValueError, match="head kind"):
        build_model("resnet32", 10, head="cosine")
    assert isinstance(build_model("ResNet32", 10), CifarResNet)
