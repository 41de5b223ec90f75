"""The tiny ResNet of the paper's Figs 3c and 4 (docs/design.md, "Models and training").

stem: conv5x5 stride 3 (in -> ``channels``) + BN + ReLU; one residual stage of ``depth``
residual functions conv3x3(bias)-BN-ReLU-conv3x3(bias)-BN (last BN weight zero-initialised),
Euler or Heun with step ``h = 1/depth``; average pooling; linear to the classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..stack import ResidualStack, Stage
from ._base import StageModel
from ._engine import select_engine
from ._registry import register_model
from .blocks import conv_block, zero_init_last_bn


def conv_stage(
    channels: int,
    depth: int,
    scheme: str = "euler",
    backward: str = "autograd",
    tied: bool = False,
    engine: str = "auto",
) -> Stage:
    """A stage of ``depth`` tiny conv blocks: fused when possible (``engine``), else generic.

    The generic stage (a :class:`resode.ResidualStack` of :func:`conv_block`) is the reference;
    the fused one (``resode.fused.ConvStack``) is built from it, so both start from the same
    weights for the same seed.
    """
    stack = ResidualStack.from_factory(
        lambda: zero_init_last_bn(conv_block(channels)),
        depth,
        tied=tied,
        scheme=scheme,
        backward=backward,
    )
    return select_engine(stack, engine, "ConvStack")


class TinyResNet(StageModel):
    """The paper's tiny ResNet (Figs 3c, 4).

    Args:
        depth: number of residual functions ``N`` (step ``1/N``).
        channels: width of the residual stage (16 in the paper).
        num_classes: output classes.
        in_channels: 3 (CIFAR) or 1 (Fashion-MNIST).
        scheme: ``"euler"`` or ``"heun"`` (Heun needs ``depth >= 2``).
        backward: ``"autograd"`` (exact), ``"adjoint"`` (memory-free, approximate gradients) or
            ``"auto"`` (the adjoint, exact gradients when its drift is too large); see
            :class:`resode.Stage`. ``refine``/``tol``: ``resode.backward_mode(model, mode,
            refine=K)`` or the stage's attributes.
        tied: one residual function shared by all ``depth`` steps.
        engine: ``"auto"`` (fused stage when the extension is available, else generic, with
            one warning unless ``RESODE_DISABLE_EXTENSION=1``), ``"generic"`` or ``"fused"``.
            Both engines implement every backward mode, ``refine`` and ``tol``.
        pool_size: side of the pooled feature map fed to the linear layer. The paper uses
            ``AvgPool2d(4)`` on the stem output; we use an adaptive average pool to
            ``pool_size x pool_size`` (default 2) so every input size works. On 28x28 inputs
            (Fashion-MNIST: 8x8 feature maps) it is exactly ``AvgPool2d(4)``; on 32x32 CIFAR
            images (10x10 maps) it averages 5x5 windows where ``AvgPool2d(4)`` would average
            4x4 windows and drop the last two rows and columns.
    """

    def __init__(
        self,
        depth: int,
        channels: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        scheme: str = "euler",
        backward: str = "autograd",
        tied: bool = False,
        engine: str = "auto",
        pool_size: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 5, stride=3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.layer1 = conv_stage(channels, depth, scheme, backward, tied, engine)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(channels * pool_size * pool_size, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, C, H', W'), H' = (H - 5) // 3 + 1
        return self.layer1(x)  # (B, C, H', W')

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)


@register_model
def tiny_resnet(
    depth: int = 8,
    channels: int = 16,
    num_classes: int = 10,
    in_channels: int = 3,
    scheme: str = "euler",
    backward: str = "autograd",
    tied: bool = False,
    engine: str = "auto",
    pool_size: int = 2,
) -> TinyResNet:
    """The paper's tiny ResNet (see :class:`TinyResNet`)."""
    return TinyResNet(
        depth, channels, num_classes, in_channels, scheme, backward, tied, engine, pool_size
    )
