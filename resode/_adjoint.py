"""The reconstruction adjoint of a generic :class:`~resode.stack.ResidualStack`.

Forward: run the scheme without recording a graph and keep only the stage output.
Backward, for each step from the last: rebuild ``x_n`` from ``x_{n+1}`` with the scheme's reverse
step (``torch.no_grad``), recompute step ``n`` at ``x_n`` with autograd, take its vector-Jacobian
product with the incoming gradient, accumulate parameter and extra-argument gradients, free the
graph, go on. Peak memory is one step's graph, whatever the depth.

The gradients are approximate: the reconstructed ``x_n`` carry the scheme's local error, so the
relative gradient error is ``O(h)`` for Euler and ``O(h^2)`` for Heun with weights smooth in depth
(Sander, Ablin & Peyre, NeurIPS 2022, section 4).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .stack import ResidualStack, frozen_batchnorm_stats


class ReconstructionAdjoint(torch.autograd.Function):
    """``y = stack(x, *args)`` storing only ``y`` (and the extra args)."""

    @staticmethod
    def forward(ctx, stack: ResidualStack, seed, n_args: int, n_params: int, x, *tensors):
        args = tensors[:n_args]
        params = tensors[n_args:]
        stored = stack.backward == "adjoint_stored"
        trajectory = []
        h = stack.step
        y = x
        for n in range(stack.num_steps):
            if stored:
                trajectory.append(y)
            y = stack.scheme.step(stack._f(args, n, seed), n, y, h)
        if y is x:  # never return an input as is from a Function
            y = y.clone()
        ctx.stack = stack
        ctx.seed = seed
        ctx.n_args = n_args
        ctx.params = params
        ctx.stored = stored
        ctx.save_for_backward(y, *args, *trajectory)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        stack: ResidualStack = ctx.stack
        saved = ctx.saved_tensors
        y = saved[0]
        n_args = ctx.n_args
        raw_args = saved[1 : 1 + n_args]
        trajectory = saved[1 + n_args :]
        needs = ctx.needs_input_grad
        arg_needs = needs[5 : 5 + n_args]
        # Fresh leaves for the extra arguments so their gradients can be taken step by step.
        args = tuple(
            a.detach().requires_grad_(True) if need else a.detach()
            for a, need in zip(raw_args, arg_needs)
        )
        grad_args_idx = [j for j, need in enumerate(arg_needs) if need]
        params = ctx.params
        index = {id(p): k for k, p in enumerate(params)}
        # Parameters touched by each residual function.
        block_params: dict[int, list[int]] = {}

        def params_of_block(i: int) -> list[int]:
            if i not in block_params:
                block_params[i] = [
                    index[id(p)] for p in stack.block(i).parameters() if id(p) in index
                ]
            return block_params[i]

        grad_params: list[Tensor | None] = [None] * len(params)
        grad_args: list[Tensor | None] = [None] * n_args
        h = stack.step
        scheme = stack.scheme
        g = grad_y
        x_next = y.detach()
        with frozen_batchnorm_stats([stack]):
            for n in reversed(range(stack.num_steps)):
                f = stack._f(args, n, ctx.seed)
                with torch.no_grad():
                    if ctx.stored:
                        x_next = trajectory[n + 1].detach() if n + 1 < len(trajectory) else y
                    x_n = scheme.reverse_step(f, n, x_next.detach(), h)
                x_n = x_n.detach().requires_grad_(True)
                step_params: list[int] = []
                for i in scheme.blocks_of_step(n):
                    for k in params_of_block(i):
                        if k not in step_params:
                            step_params.append(k)
                inputs = [x_n, *(params[k] for k in step_params), *(args[j] for j in grad_args_idx)]
                with torch.enable_grad():
                    out = scheme.step(f, n, x_n, h)
                grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
                g = grads[0] if grads[0] is not None else torch.zeros_like(x_n)
                for k, gk in zip(step_params, grads[1 : 1 + len(step_params)]):
                    if gk is not None:
                        grad_params[k] = gk if grad_params[k] is None else grad_params[k] + gk
                for j, gj in zip(grad_args_idx, grads[1 + len(step_params) :]):
                    if gj is not None:
                        grad_args[j] = gj if grad_args[j] is None else grad_args[j] + gj
                x_next = x_n.detach()
                del out, grads
        grad_x = g if needs[4] else None
        return (None, None, None, None, grad_x, *grad_args, *grad_params)
