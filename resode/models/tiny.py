"""The tiny ResNet of the paper's Figs 3c and 4 (DESIGN.md section 4).

stem: conv5x5 stride 3 (in -> ``channels``) + BN + ReLU; one residual stage of ``depth``
residual functions conv3x3(bias)-BN-ReLU-conv3x3(bias)-BN (last BN weight zero-initialised),
Euler or Heun with step ``h = 1/depth``; average pooling; linear to the classes.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..stack import ResidualStack
from ._base import StageModel
from ._registry import register_model
from .blocks import conv_block, zero_init_last_bn

ENGINES = ("auto", "generic", "fused")


def _fused_conv_stack_cls():
    """``resode.fused.ConvStack`` if the extension runs on every device here, else ``None``.

    "Every device": the CPU, and CUDA too when a GPU is visible (a model is built on the CPU
    and may be moved to the GPU afterwards).
    """
    try:
        from .. import fused

        ok = fused.available_for("cpu")
        if ok and torch.cuda.is_available():
            ok = fused.available_for("cuda")
        return fused.ConvStack if ok else None
    except Exception:  # extension missing, not built, or fused module not there yet
        return None


def conv_stage(
    channels: int,
    depth: int,
    scheme: str = "euler",
    backward: str = "autograd",
    tied: bool = False,
    engine: str = "auto",
) -> nn.Module:
    """A stage of ``depth`` tiny conv blocks: fused when possible (``engine``), else generic.

    The generic stage (a :class:`resode.ResidualStack` of :func:`conv_block`) is the reference;
    the fused one (``resode.fused.ConvStack``) is built from it, so both start from the same
    weights for the same seed.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    stack = ResidualStack.from_factory(
        lambda: zero_init_last_bn(conv_block(channels)),
        depth,
        tied=tied,
        scheme=scheme,
        backward=backward,
    )
    if engine == "generic":
        return stack
    cls = _fused_conv_stack_cls()
    if cls is None:
        if engine == "fused":
            raise RuntimeError(
                "engine='fused' needs the compiled extension (resode._C), which is not available; "
                "build it (pip install -e .) or use engine='generic'"
            )
        return stack
    try:
        return cls.from_generic(stack)
    except Exception as e:  # pragma: no cover - depends on the extension
        if engine == "fused":
            raise
        warnings.warn(f"fused ConvStack unavailable ({e}); using the generic engine", stacklevel=2)
        return stack


class TinyResNet(StageModel):
    """The paper's tiny ResNet (Figs 3c, 4).

    Args:
        depth: number of residual functions ``N`` (step ``1/N``).
        channels: width of the residual stage (16 in the paper).
        num_classes: output classes.
        in_channels: 3 (CIFAR) or 1 (Fashion-MNIST).
        scheme: ``"euler"`` or ``"heun"`` (Heun needs ``depth >= 2``).
        backward: ``"autograd"`` (exact) or ``"adjoint"`` (memory-free, approximate gradients).
        tied: one residual function shared by all ``depth`` steps.
        engine: ``"auto"`` (fused stage when the extension is available, else generic),
            ``"generic"`` or ``"fused"``.
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

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, and also accepts the other engine's stage keys.

        A checkpoint written with the fused stage (``layer1.conv1_weight``...) loads into a
        generic model (``layer1.blocks.0.0.weight``...) and the other way round.
        """
        return super().load_state_dict(self._convert_stage_keys(state_dict), strict, assign)

    def _convert_stage_keys(self, state_dict):
        pre = "layer1."
        sub = {k[len(pre) :]: v for k, v in state_dict.items() if k.startswith(pre)}
        generic_here = isinstance(self.layer1, ResidualStack)
        fused_keys = "conv1_weight" in sub
        if not sub or generic_here != fused_keys:
            return state_dict  # same engine (or nothing to convert)
        try:
            from ..fused import ConvStack
        except ImportError:
            return state_dict
        s = self.layer1
        if generic_here:  # fused checkpoint -> generic model
            src = ConvStack(
                s.block(0)[0].in_channels,
                s.depth,
                scheme=s.scheme.name,
                backward=s.backward,
                tied=s.tied,
            )
            src.load_state_dict(sub)
            new = src.to_generic().state_dict()
        else:  # generic checkpoint -> fused model
            src = s.to_generic()
            src.load_state_dict(sub)
            new = ConvStack.from_generic(src).state_dict()
        out = {k: v for k, v in state_dict.items() if not k.startswith(pre)}
        out.update({pre + k: v for k, v in new.items()})
        return out

    def config_with(self, depths=None, tied=None):
        kw = {}
        if depths is not None:
            (kw["depth"],) = depths
        if tied is not None:
            kw["tied"] = tied
        return self.config.replace(**kw)


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
