"""A small MLP ResNet on flattened images: no BatchNorm, cheap; for tests and smoke runs.

Linear embedding of the flattened image, a residual stage of ``depth`` functions
``Linear(dim, hidden)-act-Linear(hidden, dim)`` (the paper's MLP block), then a linear head.
Without BatchNorm, data-parallel training gives exactly the single-process update on the union
batch, which the DDP test relies on. ``engine="fused"`` runs the stage as
:class:`resode.fused.MLPStack` (built from the generic stage: same weights for the same seed).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..stack import ResidualStack
from ._base import StageModel
from ._engine import select_engine
from ._registry import register_model
from .blocks import mlp_block


class MLPResNet(StageModel):
    """Flatten -> Linear(in, dim) -> residual stage of MLP blocks -> Linear(dim, classes).

    ``engine``: ``"generic"`` (a :class:`resode.ResidualStack`), ``"fused"``
    (:class:`resode.fused.MLPStack`) or ``"auto"`` (fused when the extension runs here).
    """

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
        engine: str = "generic",
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        stack = ResidualStack.from_factory(
            lambda: mlp_block(dim, hidden, activation),
            depth,
            tied=tied,
            scheme=scheme,
            backward=backward,
        )
        self.layer1 = select_engine(stack, engine, "MLPStack")
        self.fc = nn.Linear(dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer1(self.embed(x.flatten(1)))  # (B, dim)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x)  # (B, num_classes)


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
    engine: str = "generic",
) -> MLPResNet:
    """MLP ResNet on ``in_channels x image_size x image_size`` images (see :class:`MLPResNet`).

    ``engine`` defaults to ``"generic"`` (the pure-PyTorch reference); ``"fused"`` or ``"auto"``
    run the stage in the extension.
    """
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
        engine,
    )
