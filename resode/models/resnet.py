"""The ResNet family of the paper's Figs 3a/3b and Table 2 (docs/design.md, "Models and training").

A torchvision-style stem (ImageNet: conv7x7 stride 2 + max-pool; ``small_input=True`` for
CIFAR-size images: conv3x3 stride 1, no max-pool), then four stages. Stage ``i`` is one
ordinary torchvision block (post-activation, possibly downsampling, plain autograd) followed by
a :class:`resode.ResidualStack` of ``layers[i] - 1`` pre-activation residual functions with step
``1 / (layers[i] - 1)``: ``ReLU-conv3x3-BN-ReLU-conv3x3-BN`` (basic) or
``ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN`` (bottleneck), last BN zero-initialised.
So ``layers`` counts blocks as torchvision does (``resnet101`` = ``[3, 4, 23, 3]``).
Then BN + ReLU, global average pooling and a linear layer.

``tied=True``: each stage's residual functions share one block (any number of steps, same
parameters), as in the paper's tied-weight experiments (Fig 3a, Table 2).

``step``: the step of every stack (default ``1/N``, the paper's; ``1.0`` gives a standard,
not ODE-like ResNet ``x + f(x)``, the regime of Fig. 3b). ``backward`` may be one mode for every
stack or a list of four, one per stage (e.g. the paper's ResNet-101, which used the adjoint only
on its 22-function third stack: ``["autograd", "autograd", "adjoint", "autograd"]``).

``engine``: the pre-activation conv blocks have no fused stage, so ``"generic"`` and ``"auto"``
both build :class:`resode.ResidualStack` s and ``"fused"`` is an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..stack import ResidualStack
from ._base import StageModel
from ._engine import no_fused_engine
from ._registry import ModelConfig, register_model
from .blocks import zero_init_last_bn

BLOCK_TYPES = ("basic", "bottleneck")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """torchvision's projection shortcut (conv1x1 + BN) when the shape changes, else ``None``."""
    if stride != 1 or cin != cout:
        return nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    return None


class BasicBlock(nn.Module):
    """torchvision's basic block (post-activation, optional projection shortcut)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    """torchvision's bottleneck block (stride on the 3x3 conv, v1.5)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


def preact_basic(channels: int) -> nn.Sequential:
    """Pre-activation basic residual function: ReLU-conv3x3-BN-ReLU-conv3x3-BN."""
    return nn.Sequential(
        nn.ReLU(),
        _conv3x3(channels, channels),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        _conv3x3(channels, channels),
        nn.BatchNorm2d(channels),
    )


def preact_bottleneck(channels: int, planes: int) -> nn.Sequential:
    """Pre-activation bottleneck function: ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN."""
    return nn.Sequential(
        nn.ReLU(),
        _conv1x1(channels, planes),
        nn.BatchNorm2d(planes),
        nn.ReLU(),
        _conv3x3(planes, planes),
        nn.BatchNorm2d(planes),
        nn.ReLU(),
        _conv1x1(planes, channels),
        nn.BatchNorm2d(channels),
    )


def _stage_backwards(backward: str | Sequence[str]) -> list[str]:
    """The backward mode of each of the four stages (one string: the same for all)."""
    if isinstance(backward, str):
        return [backward] * 4
    modes = list(backward)
    if len(modes) != 4 or not all(isinstance(m, str) for m in modes):
        raise ValueError(
            f"backward must be a mode or a list of 4 modes (one per stage), got {backward!r}"
        )
    return modes


class ResNetStage(nn.Module):
    """One stage: an ordinary (possibly downsampling) block, then a residual stack (if any)."""

    def __init__(self, first: nn.Module, stack: ResidualStack | None) -> None:
        super().__init__()
        self.first = first
        self.stack = stack

    def forward(self, x: Tensor) -> Tensor:
        x = self.first(x)
        return x if self.stack is None else self.stack(x)


class ODEResNet(StageModel):
    """ResNet whose stages end in ODE-like residual stacks (see the module docstring).

    Args:
        layers: blocks per stage, torchvision-style (stage ``i`` = 1 ordinary block +
            ``layers[i] - 1`` residual functions). Heun needs ``layers[i] - 1 >= 2``.
        block: ``"basic"`` or ``"bottleneck"``.
        num_classes, in_channels: classifier output / input channels.
        small_input: CIFAR-size stem (conv3x3 stride 1, no max-pool) instead of ImageNet's.
        width: channels of the first stage (64 in torchvision); stages use
            ``width * (1, 2, 4, 8)`` (times 4 after a bottleneck). Shrink it for CPU runs.
        scheme: of every residual stack.
        backward: ``"autograd"``, ``"adjoint"``, ``"auto"`` (see :class:`resode.Stage`) for
            every stack, or a list of four modes, one per stage (the entry of a stage without
            residual functions is unused).
        step: step ``h`` of every stack: ``None`` (``1/N``, default), ``"unit"`` or a positive
            number (``1.0``: a standard ResNet, ``x_{n+1} = x_n + f_n(x_n)``).
        tied: one shared residual function per stage.
        engine: ``"generic"`` or ``"auto"`` (the same here); ``"fused"`` raises ``ValueError``
            (no fused equivalent of these blocks).
    """

    def __init__(
        self,
        layers: Sequence[int],
        block: str = "basic",
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
        width: int = 64,
        scheme: str = "euler",
        backward: str | Sequence[str] = "autograd",
        tied: bool = False,
        engine: str = "generic",
        step: float | str | None = None,
    ) -> None:
        super().__init__()
        no_fused_engine(engine, "the ResNet family (pre-activation conv-BN blocks)")
        layers = [int(n) for n in layers]
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        backwards = _stage_backwards(backward)
        if block not in BLOCK_TYPES:
            raise ValueError(f"unknown block type {block!r}; choose one of {list(BLOCK_TYPES)}")
        ordinary = BasicBlock if block == "basic" else Bottleneck
        if small_input:
            self.stem = nn.Sequential(
                _conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            first = ordinary(cin, planes, stride=1 if i == 0 else 2)
            cin = planes * ordinary.expansion
            stack = None
            if n > 1:
                depth = n - 1

                def make(cin=cin, planes=planes):
                    f = preact_basic(cin) if block == "basic" else preact_bottleneck(cin, planes)
                    zero_init_last_bn(f)
                    return f

                try:
                    stack = ResidualStack.from_factory(
                        make, depth, tied=tied, scheme=scheme, backward=backwards[i], step=step
                    )
                except ValueError as e:
                    raise ValueError(
                        f"stage {i + 1} (layers[{i}] = {n}: {depth} residual functions): {e}"
                    ) from None
            self.add_module(f"layer{i + 1}", ResNetStage(first, stack))
        self.norm = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # the full arguments of the generic ``resnet`` entry (used when depths change)
        self._arch = dict(
            layers=layers,
            block=block,
            num_classes=num_classes,
            in_channels=in_channels,
            small_input=small_input,
            width=width,
            scheme=scheme,
            backward=backward,
            tied=tied,
            engine=engine,
            step=step,
        )

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, width, H/4, W/4) on ImageNet, (B, width, H, W) small_input
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.norm(x)  # (B, num_features, H/32, W/32)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)

    def config_with(self, depths=None, tied=None):
        cfg = self.config
        if depths is not None:
            layers = []
            it = iter(depths)
            for i in range(4):
                stage = getattr(self, f"layer{i + 1}")
                layers.append(1 if stage.stack is None else 1 + next(it))
            # named entries (resnet18, ...) fix their layers: fall back to the generic entry
            kw = {**self._arch, **{k: v for k, v in cfg.kwargs.items() if k in self._arch}}
            cfg = ModelConfig("resnet", {**kw, "layers": layers})
        if tied is not None:
            cfg = cfg.replace(tied=tied)
        return cfg


@register_model
def resnet(
    layers: Sequence[int] = (2, 2, 2, 2),
    block: str = "basic",
    num_classes: int = 1000,
    in_channels: int = 3,
    small_input: bool = False,
    width: int = 64,
    scheme: str = "euler",
    backward: str | Sequence[str] = "autograd",
    tied: bool = False,
    engine: str = "generic",
    step: float | str | None = None,
) -> ODEResNet:
    """A ResNet with custom per-stage block counts ``layers`` (see :class:`ODEResNet`)."""
    rest = (num_classes, in_channels, small_input, width, scheme, backward, tied, engine, step)
    return ODEResNet(layers, block, *rest)


#: the keywords of the named entries (``resnet18`` ...): those of :func:`resnet` but the layout
_NAMED_ENTRY_PARAMS = [
    p for n, p in inspect.signature(resnet).parameters.items() if n not in ("layers", "block")
]


def _make(name: str, layers: list[int], block: str):
    """Register ``name``: :func:`resnet` with fixed ``layers`` and ``block``."""

    def fn(**kwargs: Any) -> ODEResNet:
        return ODEResNet(layers, block, **kwargs)

    fn.__signature__ = inspect.Signature(_NAMED_ENTRY_PARAMS, return_annotation="ODEResNet")
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"ResNet with layers {layers} ({block} blocks); see ODEResNet."
    return register_model(fn)


resnet18 = _make("resnet18", [2, 2, 2, 2], "basic")
resnet34 = _make("resnet34", [3, 4, 6, 3], "basic")
resnet50 = _make("resnet50", [3, 4, 6, 3], "bottleneck")
resnet101 = _make("resnet101", [3, 4, 23, 3], "bottleneck")
resnet152 = _make("resnet152", [3, 8, 36, 3], "bottleneck")
