"""Shared builders for the tests: MLP residual blocks with iid or depth-smooth weights.

The blocks and the depth-smooth initialisation are those of :mod:`resode.models.blocks`; this
module only fixes the test sizes, the dtype (float64) and the iid alternative.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from resode.models.blocks import mlp_block, smooth_in_depth_

SCHEMES = ("euler", "heun")
BACKWARDS = ("autograd", "adjoint")
DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())

__all__ = ["BACKWARDS", "DEVICES", "SCHEMES", "flat_rel", "mlp_block", "mlp_blocks", "rel"]


def mlp_blocks(
    depth: int, dim: int = 6, hidden: int = 12, smooth: bool = False, seed: int = 0, scale=1.0
) -> list[nn.Sequential]:
    """``depth`` Linear-tanh-Linear blocks (:func:`~resode.models.blocks.mlp_block`) in float64.

    ``smooth=True``: weights smooth in depth, :func:`~resode.models.blocks.smooth_in_depth_`
    with ``seed`` and ``scale``. ``smooth=False``: iid weights, ``N(0, scale^2 / fan_in)`` per
    entry (``fan_in`` = the last dimension for matrices, ``dim`` for biases), from a generator
    seeded with ``seed``.
    """
    blocks = [mlp_block(dim, hidden).double() for _ in range(depth)]
    if smooth:
        smooth_in_depth_(blocks, seed=seed, scale=scale)
        return blocks
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in blocks:
            for p in b.parameters():
                fan_in = p.shape[-1] if p.dim() > 1 else dim
                p.copy_(
                    torch.randn(p.shape, generator=g, dtype=torch.float64)
                    * scale
                    / math.sqrt(fan_in)
                )
    return blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||``."""
    return float((a - b).detach().norm() / b.detach().norm())


def flat_rel(ga, gb) -> float:
    """Global relative error over lists of tensors."""
    a = torch.cat([t.reshape(-1) for t in ga])
    b = torch.cat([t.reshape(-1) for t in gb])
    return rel(a, b)


def conv_adjoint_peak_mib(
    depth: int, batch: int = 64, channels: int = 8, size: int = 8, train_params: bool = True
) -> tuple[float, float]:
    """Peak process memory (MiB, :class:`resode.utils.PeakMemory`) of one forward and backward of
    a generic conv-BN stage of ``depth`` blocks with ``backward="adjoint"`` (float32, training
    mode), and the MiB of the parameter gradients it returns. ``train_params=False`` freezes
    the parameters (only the input gets a gradient). Run it in a fresh process
    (:func:`resode.utils.run_in_child`)."""
    import resode
    from resode.models.blocks import conv_block
    from resode.utils import PeakMemory

    torch.manual_seed(0)
    stack = resode.ResidualStack.from_factory(lambda: conv_block(channels), depth)
    stack.backward = "adjoint"
    stack.requires_grad_(train_params)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    with PeakMemory("cpu") as pm:
        stack.train()(x).square().sum().backward()
    grads = sum(p.grad.nbytes for p in stack.parameters() if p.grad is not None)
    return pm.peak_bytes / 2**20, grads / 2**20
