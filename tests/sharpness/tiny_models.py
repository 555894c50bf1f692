"""Tiny float64 models shared by the functional-core and HVP tests."""

import torch
from torch import nn

DT = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def bn_cnn(seed: int = 0) -> nn.Module:
    """Conv -> BatchNorm -> tanh -> Linear; running stats made non-trivial by train-mode passes."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DT)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 6, 6, dtype=DT) * 2 + 0.5)
    net.eval()
    assert not torch.allclose(net[1].running_var, torch.ones(3, dtype=DT))
    return net
