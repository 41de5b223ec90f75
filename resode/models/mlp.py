"""A small MLP ResNet on flattened images: no BatchNorm, cheap; for tests and smoke runs.

Linear embedding of the flattened image, a residual stage of ``depth`` functions
``Linear(dim, hidden)-act-Linear(hidden, dim)`` (the paper's MLP block), then a linear head.
Without BatchNorm, data-parallel training gives exactly the single-process update on the union
batch, which the DDP test relies on.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..stack import ResidualStack
from ._base import StageModel
from ._registry import register_model
from .blocks import mlp_block


class MLPResNet(StageModel):
    """Flatten -> Linear(in, dim) -> ResidualStack of MLP blocks -> Linear(dim, classes)."""

    def __init__(
        self,
        depth: int,
        dim: int,
        hidden: int,
        in_features: int,
        num_classes: int,
        activation: str,
        scheme: str,
        backward: str,
        tied: bool,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.layer1 = ResidualStack.from_factory(
            lambda: mlp_block(dim, hidden, activation),
            depth,
            tied=tied,
            scheme=scheme,
            backward=backward,
        )
        self.fc = nn.Linear(dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer1(self.embed(x.flatten(1)))  # (B, dim)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x)  # (B, num_classes)

    def config_with(self, depths=None, tied=None):
        kw = {}
        if depths is not None:
            (kw["depth"],) = depths
        if tied is not None:
            kw["tied"] = tied
        return self.config.replace(**kw)


@register_model
def mlp_resnet(
    depth: int = 4,
    dim: int = 32,
    hidden: int = 64,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    activation: str = "tanh",
    scheme: str = "euler",
    backward: str = "autograd",
    tied: bool = False,
) -> MLPResNet:
    """MLP ResNet on ``in_channels x image_size x image_size`` images (see :class:`MLPResNet`)."""
    return MLPResNet(
        depth,
        dim,
        hidden,
        in_channels * image_size**2,
        num_classes,
        activation,
        scheme,
        backward,
        tied,
    )
