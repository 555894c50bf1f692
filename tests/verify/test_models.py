"""The model zoo: shapes, parameter counts, the ResNet micro stem, importable builders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness.importing import import_callable
from verify.models import ModelError, has_batchnorm, mlp, resnet18_micro, small_cnn


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("act,cls", [("tanh", nn.Tanh), ("gelu", nn.GELU), ("relu", nn.ReLU)])
def test_mlp_shapes_and_count(act, cls):
    net = mlp(64, (32, 16), 10, act)
    assert count(net) == (64 + 1) * 32 + (32 + 1) * 16 + (16 + 1) * 10
    assert any(isinstance(m, cls) for m in net.modules())
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # flattens its input
    assert not has_batchnorm(net)


def test_small_cnn_shapes_and_size():
    net = small_cnn(3, 10, width=16, image=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 50_000 < count(net) < 70_000  # the benchmark's target size (~60k)
    digits = small_cnn(1, 10, width=8, image=8)
    assert digits(torch.randn(4, 64)).shape == (4, 10)  # flat inputs are reshaped to (C, H, W)
    assert small_cnn(1, 10, width=4, image=28)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert has_batchnorm(small_cnn(bn=True)) and not has_batchnorm(small_cnn())


def test_resnet18_micro_stem_and_count():
    net = resnet18_micro(num_classes=1000)
    assert count(net) == 11_689_512  # torchvision's resnet18: the micro form changes strides only
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (7, 7)
    assert net.maxpool.stride == 1 and net.maxpool.kernel_size == 3
    assert [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == [2, 2, 2, 2]
    small = resnet18_micro(10, 3, stem_kernel=3, width=8)
    out = small(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and has_batchnorm(small)
    # stride 1 stem: layer1 keeps the input resolution
    feats = small.maxpool(small.relu(small.bn1(small.conv1(torch.randn(1, 3, 16, 16)))))
    assert feats.shape[-2:] == (16, 16)


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet18_micro"])
def test_builders_are_importable(name):
    fn = import_callable(f"verify.models:{name}")
    assert isinstance(fn(), nn.Module)


def test_bad_options():
    with pytest.raises(ModelError, match="activation"):
        mlp(activation="sigmoidish")
    with pytest.raises(ModelError, match="at least 8x8"):
        small_cnn(image=4)
    with pytest.raises(ModelError, match="positive"):
        mlp(hidden=(0,))
