"""``backward="adjoint_paper_code"``: the paper code's Euler adjoint, bug included (diagnostic).

The public code of Sander, Ablin & Peyre (NeurIPS 2022; ``resnet_ode/resnet_memory.py``,
``ResNetTransformMemory.backward``) calls ``.eval()`` on every residual function inside the
backward and never switches them back. Its reconstruction and recomputation therefore use
BatchNorm's *running* statistics (while the forward used batch statistics), and every later forward
of the stage runs its residual functions in eval mode too (running statistics, not updated; no
dropout) until the next ``model.train()``. In the paper's ResNet-101 experiment (Fig. 3b) this
applied to the stacks with more than 10 residual functions.

This mode reproduces that behaviour **on purpose**, so experiments can tell the method's failures
from this behaviour's; it is never a default and should not be used to train a model for its own
sake (the style guide's rule "no ``.eval()``/``.train()`` inside a backward" is broken here
deliberately). Otherwise it is the memory-free adjoint of :mod:`resode._adjoint` (chained
reconstruction from the output, step ``h`` of the stage, the stage's ``refine``; ``refine=0`` is
the paper's code). Euler only, as in the paper's code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._adjoint import AdjointProblem, adjoint_backward, adjoint_forward, refuse_double_backward

#: the backward-mode name
MODE = "adjoint_paper_code"


class PaperCodeAdjoint(torch.autograd.Function):
    """The memory-free Euler adjoint that switches the residual functions to eval mode in its
    backward and leaves them there. Called like :class:`resode._adjoint.ReconstructionAdjoint`;
    ``problem.modules`` are the residual functions switched."""

    @staticmethod
    def forward(ctx, problem: AdjointProblem, x: Tensor, *tensors: Tensor) -> Tensor:
        return adjoint_forward(ctx, problem, x, tensors)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        refuse_double_backward()
        for module in ctx.problem.modules:
            module.eval()  # deliberately never undone (module docstring)
        return adjoint_backward(ctx, grad_y, mode=MODE)
