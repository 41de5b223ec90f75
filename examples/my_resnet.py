"""Your own model in ``resode check``: a module with a factory that takes no arguments.

    resode check examples/my_resnet.py:make_model --shape 3 16 16
    python -m resode.check examples.my_resnet:make_model --shape 3 16 16 --json

``MyResNet`` has two residual stages built with :class:`resode.ResidualStack`: a standard ResNet
stage (3 blocks, step 1: not an ODE, the memory-free adjoint is wrong there) and a deep stage
(16 blocks, step 1/16: an Euler discretisation, the adjoint is accurate). ``resode check`` tells
them apart and recommends a backward for each.
"""

from __future__ import annotations

import torch
from torch import nn

import resode
from resode.models.blocks import conv_block


class MyResNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        # a ResNet stage as torchvision has it: few blocks, x + f(x)
        self.shallow = resode.ResidualStack.from_factory(lambda: conv_block(width), 3, step=1.0)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        # an ODE-like stage: many blocks, x + f(x) / N
        self.deep = resode.ResidualStack.from_factory(lambda: conv_block(2 * width), 16)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shallow(self.stem(x))  # (B, width, H, W)
        x = self.deep(self.down(x))  # (B, 2 width, H/2, W/2)
        return self.head(x)  # (B, num_classes)


def make_model() -> MyResNet:
    """The factory ``resode check`` calls (no arguments)."""
    torch.manual_seed(0)
    return MyResNet()
