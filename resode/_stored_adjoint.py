"""``backward="adjoint_stored"``: the paper's public-code protocol, a diagnostic of the adjoint.

Sander, Ablin & Peyre (NeurIPS 2022, Fig. 4) measured adjoint gradients with code that rebuilds
each ``x_n`` from the *stored* ``x_{n+1}`` (one reverse step from the exact forward state) instead
of chaining reconstructions from the stage output. That variant keeps every activation (memory
``O(N)``, like autograd) and hides how reconstruction errors accumulate over the steps, so its
gradient error is smaller than the true memory-free adjoint's. resode offers it to reproduce the
paper's figure and to compare (:func:`resode.diagnostics.gradient_error` with
``variant="adjoint_stored"``), and as a backward mode of every stage, so experiments can train with
it too. Its :class:`~resode._adjoint.BackwardReport` measures the one-step errors (``drift``: the
input rebuilt from the stored ``x_1``).

It shares the per-step recompute-and-pull-back of :mod:`resode._adjoint`; what is specific lives
here: the forward keeps the trajectory, and the backward restarts each reverse step from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._adjoint import (
    AdjointProblem,
    adjoint_backward,
    refuse_double_backward,
    run_forward,
    save_context,
    saved,
    split_inputs,
)

#: the backward-mode name of this variant
MODE = "adjoint_stored"


class StoredReconstructionAdjoint(torch.autograd.Function):
    """``y = stage(x, *args)`` storing ``x_0 .. x_{N-1}``, ``y`` and the extra args.

    Same call as :class:`resode._adjoint.ReconstructionAdjoint`:
    ``StoredReconstructionAdjoint.apply(problem, x, *args, *params)``.
    """

    @staticmethod
    def forward(ctx, problem: AdjointProblem, x: Tensor, *tensors: Tensor) -> Tensor:
        args, params = split_inputs(problem, tensors)
        trajectory: list[Tensor] = []
        y = run_forward(problem, x, args, trajectory)
        # x_0 is saved as the input; the trajectory adds x_1 .. x_{N-1}
        save_context(ctx, problem, x, y, args, params, extra=trajectory[1:])
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        refuse_double_backward()
        state = saved(ctx)
        stored = state.extra

        def rebuild_from(n: int, x_next: Tensor) -> Tensor:
            # the stored x_{n+1} (the output for the last step), not the chained reconstruction
            return stored[n] if n < len(stored) else state.y

        return adjoint_backward(ctx, grad_y, rebuild_from, mode=MODE, state=state)
