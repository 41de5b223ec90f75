"""The residual functions of the paper, defined once: the MLP block, the tiny conv block, and
the initialisations used with them.

* :func:`mlp_block` -- ``Linear(dim, hidden)-act-Linear(hidden, dim)`` (the paper's MLP block;
  what :class:`resode.fused.MLPStack` fuses).
* :func:`conv_block` -- ``conv3x3(bias)-BN-ReLU-conv3x3(bias)-BN`` (the tiny ResNet's residual
  function, Figs 3c/4; what :class:`resode.fused.ConvStack` fuses).
* :func:`zero_init_last_bn` -- the residual function starts at zero.
* :func:`smooth_in_depth_` -- weights that are a smooth function of depth,
  ``theta_n = theta(n / N)``: the regime in which a ResNet discretises an ODE (paper, section 4),
  used by the tests, benchmarks and experiments that measure convergence orders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

#: activation name -> module class, for the MLP block (``gelu`` is the exact erf form)
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    """A new activation module by name (see :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def activation_name(module: nn.Module) -> str | None:
    """The name of an activation module of :data:`ACTIVATIONS` (``None`` for anything else)."""
    if type(module) is nn.GELU and module.approximate != "none":
        return None
    for name, cls in ACTIVATIONS.items():
        if type(module) is cls:
            return name
    return None


def mlp_block(dim: int, hidden: int, activation: str = "tanh", bias: bool = True) -> nn.Sequential:
    """Residual function ``Linear(dim, hidden)-act-Linear(hidden, dim)`` (``nn.Linear`` init)."""
    act = make_activation(activation)
    return nn.Sequential(nn.Linear(dim, hidden, bias=bias), act, nn.Linear(hidden, dim, bias=bias))


def conv_block(channels: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Sequential:
    """The tiny ResNet's residual function: conv3x3(bias)-BN-ReLU-conv3x3(bias)-BN."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=True),
        nn.BatchNorm2d(channels, eps=eps, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=True),
        nn.BatchNorm2d(channels, eps=eps, momentum=momentum),
    )


def zero_init_last_bn(block: nn.Module) -> nn.Module:
    """Zero the weight of the last BatchNorm in ``block`` (the residual function starts at 0)."""
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        nn.init.zeros_(bns[-1].weight)
    return block


def _fan_in(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else shape[0]


@torch.no_grad()
def smooth_in_depth_(
    blocks: Sequence[nn.Module] | nn.Module, seed: int = 0, scale: float = 1.0
) -> None:
    """Give residual functions weights that are a smooth function of depth (in place).

    ``theta_n = s (A + B sin(2 pi t_n) + C cos(2 pi t_n))`` with ``t_n = n / N``, random
    ``A, B, C`` drawn once per parameter tensor from a generator seeded with ``seed``, and
    ``s = scale / sqrt(fan_in)``. Then ``||theta_{n+1} - theta_n|| = O(1/N)`` (paper, Fig. 2),
    the regime where the reconstruction adjoint converges at the scheme's order.

    Args:
        blocks: ``N`` modules with the same parameter shapes (a list, or an untied
            ``ResidualStack``'s ``blocks``), or a fused stage whose parameters are stacked with a
            leading dimension ``N``.
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        stacked = [p for p in blocks.parameters()]  # fused stage: (N, ...) per tensor
        n = stacked[0].shape[0]
        t = torch.arange(n, dtype=torch.float64) / n
        for p in stacked:
            shape = p.shape[1:]
            a, b, c = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
            tt = t.reshape(-1, *([1] * len(shape)))
            s = scale / math.sqrt(_fan_in(shape))
            value = s * (a + b * torch.sin(2 * math.pi * tt) + c * torch.cos(2 * math.pi * tt))
            p.copy_(value.to(p.dtype))
        return
    blocks = list(blocks)
    n = len(blocks)
    params = [list(b.parameters()) for b in blocks]
    for k, p0 in enumerate(params[0]):
        a, b, c = (torch.randn(p0.shape, generator=g, dtype=torch.float64) for _ in range(3))
        s = scale / math.sqrt(_fan_in(p0.shape))
        for i in range(n):
            t = i / n
            value = s * (a + b * math.sin(2 * math.pi * t) + c * math.cos(2 * math.pi * t))
            params[i][k].copy_(value.to(params[i][k].dtype))
