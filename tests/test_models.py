"""Every architecture: forward + backward on its dataset's shape, right output, all parameters get gradients."""

from __future__ import annotations

import pytest
import torch

from qexp.models.lenet import LeNet5
from qexp.models.mlp import MLP
from qexp.models.resnet import CifarResNet, resnet18
from qexp.models.vgg import VGG
from qexp.models.wrn import WideResNet

# name -> (constructor, (channels, image size, classes)) on the dataset each is used with
MODELS = {
    "lenet5_mnist": (lambda c, n, s: LeNet5(c, n, s), (1, 28, 10)),
    "lenet5_cifar": (lambda c, n, s: LeNet5(c, n, s, bn=True), (3, 32, 10)),
    "mlp_mnist": (lambda c, n, s: MLP(c, n, s), (1, 28, 10)),
    "vgg7_cifar": (lambda c, n, s: VGG("vgg7", c, n, s), (3, 32, 10)),
    "vgg7_nobn_nobias": (lambda c, n, s: VGG("vgg7", c, n, s, bn=False, bias=False), (3, 32, 10)),
    "vgg9_cifar": (lambda c, n, s: VGG("vgg9", c, n, s), (3, 32, 10)),
    "vgg11_cifar100": (lambda c, n, s: VGG("vgg11", c, n, s), (3, 32, 100)),
    "resnet20_cifar": (lambda c, n, s: CifarResNet(20, c, n, s), (3, 32, 10)),
    "resnet56_cifar100": (lambda c, n, s: CifarResNet(56, c, n, s), (3, 32, 100)),
    "wrn56_2_cifar": (lambda c, n, s: WideResNet(56, 2, c, n, s), (3, 32, 10)),
    "resnet18_imagenet": (lambda c, n, s: resnet18(c, n, s), (3, 224, 1000)),
    "resnet18_grey": (lambda c, n, s: resnet18(c, n, s), (1, 64, 10)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name):
    make, (c, size, classes) = MODELS[name]
    torch.manual_seed(0)
    model = make(c, classes, size)
    x = torch.randn(2, c, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_models_are_plain_float_modules():
    """A fresh model is float32 and carries no quantization: no parametrization, no hook, no module
    from qexp.quant or qexp.methods (a method adds those in prepare)."""
    from torch.nn.utils import parametrize

    for make, (c, size, classes) in MODELS.values():
        model = make(c, classes, size)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for m in model.modules():
            assert not parametrize.is_parametrized(m), type(m).__name__
            assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), type(m).__name__
            assert not type(m).__module__.startswith(("qexp.quant", "qexp.methods")), type(m).__name__


def test_depth_rules_are_checked():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="6n\\+2"):
        WideResNet(28, 10)
    with pytest.raises(ValueError, match="at least 16"):
        LeNet5(1, 10, 12)
    for bad in (2, -4):  # 6n+2 with n < 1: no residual block at all
        with pytest.raises(ValueError, match="n >= 1"):
            CifarResNet(bad)
        with pytest.raises(ValueError, match="n >= 1"):
            WideResNet(bad)
    with pytest.raises(ValueError, match="width"):
        CifarResNet(20, width=0)  # once a traceback from inside BatchNorm
    with pytest.raises(ValueError, match="widen"):
        WideResNet(26, widen=0)
    for bad in (float("nan"), 1.0, -0.1):  # nan passed nn.Dropout's check and failed at the first step
        with pytest.raises(ValueError, match="dropout"):
            MLP(dropout=bad)
        with pytest.raises(ValueError, match="dropout"):
            WideResNet(26, dropout=bad)


def test_resnet_parameter_counts_match_the_papers():
    """He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(CifarResNet(20)) / 1e6, 2) == 0.27
    assert round(count(CifarResNet(56)) / 1e6, 2) == 0.85
