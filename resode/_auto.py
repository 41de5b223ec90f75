"""``backward="auto"``: the reconstruction adjoint, checked, with an exact fallback.

The backward first runs the reconstruction adjoint of :mod:`resode._adjoint` (with the stage's
``refine``). Its drift ``||x^_0 - x_0|| / ||x_0||`` (the rebuilt stage input against the stored
one) is then read (one device synchronisation per backward):

* ``drift <= tol`` (and finite): the adjoint's gradients are returned (``exact=False``). Cost: that
  of ``"adjoint"``, memory ``O(1)`` in depth.
* otherwise that pass is discarded and exact gradients are computed from the stored input
  ``x_0`` with ``ceil(sqrt(N))`` checkpoints: a forward without graph keeps ``x_s`` every
  ``L = ceil(sqrt(N))`` steps, then, from the last segment to the first, the ``L`` steps of
  the segment are recomputed with autograd and differentiated (``exact=True``,
  ``fell_back=True``). Extra cost of that backward: about one forward, one recompute-forward
  and one ordinary backward of the stage, on top of the discarded adjoint pass; activation
  memory ``O(sqrt(N))`` for that backward only (the forward still keeps only ``x_0`` and
  ``y``). The gradients are autograd's up to the order of floating-point sums, provided the
  blocks are deterministic (random layers replay their numbers when the stage preserves its
  RNG streams, which :class:`resode.ResidualStack` turns on for dropout).

The fallback's recomputations, like the adjoint's, use batch statistics in training-mode
BatchNorm and leave the running statistics alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._adjoint import (
    AdjointProblem,
    Pullback,
    Saved,
    adjoint_forward,
    publish,
    reconstruct_and_pull,
    refuse_double_backward,
    saved,
)
from ._recompute import frozen_batchnorm_stats

#: the backward-mode name
MODE = "auto"


def checkpoint_every(num_steps: int) -> int:
    """Segment length ``L = ceil(sqrt(N))`` of the exact fallback (``ceil(N / L)`` segments)."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def exact_backward(ctx, state: Saved, grad_y: Tensor) -> tuple[Pullback, Tensor]:
    """Exact gradients from the stored input with ``ceil(sqrt(N))`` checkpoints.

    Returns a fresh :class:`~resode._adjoint.Pullback` holding the parameter and argument
    gradients, and ``dL/dx_0``.
    """
    problem: AdjointProblem = ctx.problem
    pull = Pullback(ctx, state)
    n_steps, every = problem.num_steps, checkpoint_every(problem.num_steps)
    with frozen_batchnorm_stats(problem.frozen):
        checkpoints = []
        with torch.no_grad():
            x = state.x.detach()
            for n in range(n_steps):
                if n % every == 0:
                    checkpoints.append(x)
                x = problem.scheme.step(pull.block_fn(n), n, x, problem.h)
            del x
        g = grad_y
        for first in reversed(range(0, n_steps, every)):
            x_first = checkpoints.pop().detach().requires_grad_(True)
            g, _ = pull.pull(range(first, min(first + every, n_steps)), x_first, g)
    return pull, g


class AutoAdjoint(torch.autograd.Function):
    """``y = stage(x, *args)`` storing ``y`` and ``x``; adjoint gradients when the drift is
    within ``problem.tol``, exact ones otherwise. Called like
    :class:`resode._adjoint.ReconstructionAdjoint`."""

    @staticmethod
    def forward(ctx, problem: AdjointProblem, x: Tensor, *tensors: Tensor) -> Tensor:
        return adjoint_forward(ctx, problem, x, tensors)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        refuse_double_backward()
        problem: AdjointProblem = ctx.problem
        state = saved(ctx)
        rec = reconstruct_and_pull(ctx, state, grad_y)
        drift, step_error = rec.drift, rec.step_error
        if float(drift) <= problem.tol:  # False for nan: a diverged rebuild falls back
            publish(problem, MODE, drift, step_error, exact=False, fell_back=False)
            return rec.pull.gradients(ctx, rec.grad_x)
        del rec  # the discarded pass's accumulators
        pull, grad_x = exact_backward(ctx, state, grad_y)
        publish(problem, MODE, drift, step_error, exact=True, fell_back=True)
        return pull.gradients(ctx, grad_x)
