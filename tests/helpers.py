"""Shared builders for the tests: MLP residual blocks with iid or depth-smooth weights."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SCHEMES = ("euler", "heun")
BACKWARDS = ("autograd", "adjoint")
DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())


def mlp_block(dim: int, hidden: int, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim))


def mlp_blocks(
    depth: int, dim: int = 6, hidden: int = 12, smooth: bool = False, seed: int = 0, scale=1.0
) -> list[nn.Sequential]:
    """``depth`` Linear-tanh-Linear blocks in float64.

    ``smooth=False``: iid weights. ``smooth=True``: ``theta_n = theta(n / depth)`` for a smooth
    curve ``theta(t) = P0 + P1 sin(2 pi t) + P2 cos(2 pi t)`` with random ``P0, P1, P2``.
    """
    g = torch.Generator().manual_seed(seed)
    template = mlp_block(dim, hidden).double()
    shapes = [p.shape for p in template.parameters()]

    def rnd(shape):
        fan_in = shape[-1] if len(shape) > 1 else dim
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale / math.sqrt(fan_in)

    if smooth:
        coeffs = [(rnd(s), rnd(s), rnd(s)) for s in shapes]
    blocks = []
    for n in range(depth):
        b = mlp_block(dim, hidden).double()
        with torch.no_grad():
            for p, s, k in zip(b.parameters(), shapes, range(len(shapes))):
                if smooth:
                    t = n / depth
                    c0, c1, c2 = coeffs[k]
                    p.copy_(c0 + c1 * math.sin(2 * math.pi * t) + c2 * math.cos(2 * math.pi * t))
                else:
                    p.copy_(rnd(s))
        blocks.append(b)
    return blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||``."""
    return float((a - b).detach().norm() / b.detach().norm())


def flat_rel(ga, gb) -> float:
    """Global relative error over lists of tensors."""
    a = torch.cat([t.reshape(-1) for t in ga])
    b = torch.cat([t.reshape(-1) for t in gb])
    return rel(a, b)


def loglog_slope(ns, errs) -> float:
    """Least-squares slope of log(err) against log(n)."""
    return float(np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(errs, float)), 1)[0])
