"""The reconstruction adjoint of a residual stage (the generic engine's ``backward="adjoint"``).

Forward: run the scheme without recording a graph and keep only the stage output.
Backward, for each step from the last: rebuild ``x_n`` from ``x_{n+1}`` with the scheme's reverse
step (``torch.no_grad``), recompute step ``n`` at ``x_n`` with autograd, take its vector-Jacobian
product with the incoming gradient, accumulate parameter and extra-argument gradients, free the
graph, go on. Peak memory is one step's graph, whatever the depth.

The gradients are approximate: the reconstructed ``x_n`` carry the scheme's local error, so the
relative gradient error is ``O(h)`` for Euler and ``O(h^2)`` for Heun with weights smooth in depth
(Sander, Ablin & Peyre, NeurIPS 2022, section 4).

The adjoint knows nothing of :class:`~resode.stack.ResidualStack`: a stage hands it an
:class:`AdjointProblem` (scheme, step, block evaluation, parameters of each block) and its tensors,
``ReconstructionAdjoint.apply(problem, x, *args, *params)``. See docs/design.md, "Data flow".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._recompute import frozen_batchnorm_stats
from .schemes import BlockFn, Scheme

# Positions in ``ReconstructionAdjoint.apply(problem, x, *args, *params)`` (and so in
# ``ctx.needs_input_grad``); the backward returns one gradient (or ``None``) per position.
PROBLEM_INPUT = 0
X_INPUT = 1
FIRST_ARG_INPUT = 2


@dataclasses.dataclass(frozen=True)
class AdjointProblem:
    """Everything the reconstruction adjoint needs from a stage, given explicitly.

    Attributes:
        scheme: the step rule (forward step, reverse step, blocks evaluated by each step).
        h: the step ``h``.
        num_steps: number of steps of the stage.
        step_fn: ``step_fn(n, args)`` is ``f(i, x)``, residual function ``i`` evaluated at ``x``
            in step ``n`` with the extra tensor arguments ``args`` (random layers replay step
            ``n``'s numbers when the stage preserves its RNG streams).
        block_params: ``block_params(i)``: the parameters residual function ``i`` uses (those
            that are adjoint inputs receive its gradient; others are ignored).
        frozen: modules whose training-mode BatchNorm keeps its running statistics during the
            backward's recomputations (:func:`~resode._recompute.frozen_batchnorm_stats`).
        n_args: number of extra tensor arguments passed after ``x``.
    """

    scheme: Scheme
    h: float
    num_steps: int
    step_fn: Callable[[int, tuple[Tensor, ...]], BlockFn]
    block_params: Callable[[int], Iterable[Tensor]]
    frozen: Sequence[nn.Module] = ()
    n_args: int = 0


#: ``rebuild_from(n, x_next)``: the point that step ``n``'s reverse step starts from, given the
#: chained reconstruction ``x_next`` of ``x_{n+1}`` (the memory-free adjoint uses ``x_next``).
RebuildFrom = Callable[[int, Tensor], Tensor]


def run_forward(
    problem: AdjointProblem,
    x: Tensor,
    args: tuple[Tensor, ...],
    trajectory: list[Tensor] | None = None,
) -> Tensor:
    """The stage's forward loop; appends ``x_0 .. x_{N-1}`` to ``trajectory`` when given."""
    y = x
    for n in range(problem.num_steps):
        if trajectory is not None:
            trajectory.append(y)
        y = problem.scheme.step(problem.step_fn(n, args), n, y, problem.h)
    if y is x:  # never return an input as is from a Function
        y = y.clone()
    return y


def split_inputs(
    problem: AdjointProblem, tensors: tuple[Tensor, ...]
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(args, params)`` from the tensors that follow ``x`` in ``apply``."""
    return tensors[: problem.n_args], tensors[problem.n_args :]


def save_context(
    ctx,
    problem: AdjointProblem,
    y: Tensor,
    args: tuple[Tensor, ...],
    params: tuple[Tensor, ...],
    extra: Sequence[Tensor] = (),
) -> None:
    """Keep for the backward: the output ``y``, the extra args, and ``extra`` tensors.

    ``y`` is kept as a private copy, not as the returned output: the backward starts its
    reconstruction from these values, and the caller may change the output in place
    (``nn.ReLU(inplace=True)`` right after the stage), which would otherwise fail autograd's
    version check. It costs one output-sized tensor, whatever the depth.
    """
    ctx.problem = problem
    ctx.params = params
    ctx.save_for_backward(y.clone(), *args, *extra)


def refuse_double_backward() -> None:
    """Raise when the backward is asked to build a graph (``create_graph=True``).

    The reconstruction adjoint's gradients are computed step by step from rebuilt states, so
    they cannot be differentiated again; without this, a second ``torch.autograd.grad`` would
    see no dependence and return ``None`` (or zeros) for inputs the stage does depend on.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "resode: a stage with backward='adjoint' (or 'adjoint_stored') cannot be "
            "differentiated twice (create_graph=True, double backward, Hessian-vector products): "
            "its gradients come from the reconstruction adjoint. Use backward='autograd' for "
            "this stage (stage.backward = 'autograd', or with resode.backward_mode(model, "
            "'autograd'): ...)"
        )


def saved(ctx) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(y, args, extra)`` as kept by :func:`save_context`."""
    tensors = ctx.saved_tensors
    n_args = ctx.problem.n_args
    return tensors[0], tuple(tensors[1 : 1 + n_args]), tuple(tensors[1 + n_args :])


class _Pullback:
    """One backward pass: the extra arguments as fresh leaves, the inputs that need gradients,
    the parameters each step uses, and the running sums of parameter and argument gradients."""

    def __init__(
        self,
        problem: AdjointProblem,
        params: Sequence[Tensor],
        raw_args: tuple[Tensor, ...],
        arg_needs: Sequence[bool],
    ) -> None:
        self.problem = problem
        self.params = params
        # Fresh leaves for the extra arguments so their gradients can be taken step by step.
        self.args = tuple(
            a.detach().requires_grad_(True) if need else a.detach()
            for a, need in zip(raw_args, arg_needs)
        )
        self.arg_idx = [j for j, need in enumerate(arg_needs) if need]
        self.param_sums: list[Tensor | None] = [None] * len(params)
        self.arg_sums: list[Tensor | None] = [None] * len(raw_args)
        self._index = {id(p): k for k, p in enumerate(params)}
        self._of_block: dict[int, list[int]] = {}

    def block_fn(self, n: int) -> BlockFn:
        """``f(i, x)`` as evaluated in step ``n`` (with the fresh extra arguments)."""
        return self.problem.step_fn(n, self.args)

    def _params_of_block(self, i: int) -> list[int]:
        if i not in self._of_block:
            ps = self.problem.block_params(i)
            self._of_block[i] = [self._index[id(p)] for p in ps if id(p) in self._index]
        return self._of_block[i]

    def _params_of_step(self, n: int) -> list[int]:
        out: list[int] = []
        for i in self.problem.scheme.blocks_of_step(n):
            for k in self._params_of_block(i):
                if k not in out:
                    out.append(k)
        return out

    def step(self, n: int, f: BlockFn, x_n: Tensor, g: Tensor) -> Tensor:
        """Recompute step ``n`` at the leaf ``x_n`` and pull ``g`` back through it.

        Adds the step's parameter and extra-argument gradients to the running sums; returns
        the gradient with respect to ``x_n``.
        """
        param_idx = self._params_of_step(n)
        params = [self.params[k] for k in param_idx]
        inputs = [x_n, *params, *(self.args[j] for j in self.arg_idx)]
        with torch.enable_grad():
            out = self.problem.scheme.step(f, n, x_n, self.problem.h)
        grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        _accumulate(self.param_sums, param_idx, grads[1 : 1 + len(param_idx)])
        _accumulate(self.arg_sums, self.arg_idx, grads[1 + len(param_idx) :])
        return grads[0] if grads[0] is not None else torch.zeros_like(x_n)


def _accumulate(sums: list[Tensor | None], idx: Sequence[int], grads: Sequence) -> None:
    for k, gk in zip(idx, grads):
        if gk is not None:
            sums[k] = gk if sums[k] is None else sums[k] + gk


def adjoint_backward(ctx, grad_y: Tensor, rebuild_from: RebuildFrom | None = None) -> tuple:
    """The backward of a reconstruction adjoint Function whose forward called
    :func:`save_context`: one gradient (or ``None``) per input of ``apply``.

    Each ``x_n`` is rebuilt with the scheme's reverse step from ``rebuild_from(n, x_next)``
    (default: the chained reconstruction ``x_next`` of ``x_{n+1}``, which is what makes the
    adjoint memory-free).
    """
    problem: AdjointProblem = ctx.problem
    y, raw_args, _ = saved(ctx)
    needs = ctx.needs_input_grad
    arg_needs = needs[FIRST_ARG_INPUT : FIRST_ARG_INPUT + problem.n_args]
    pull = _Pullback(problem, ctx.params, raw_args, arg_needs)
    g = grad_y
    x_next = y.detach()
    with frozen_batchnorm_stats(problem.frozen):
        for n in reversed(range(problem.num_steps)):
            f = pull.block_fn(n)
            with torch.no_grad():
                start = x_next if rebuild_from is None else rebuild_from(n, x_next)
                x_n = problem.scheme.reverse_step(f, n, start.detach(), problem.h)
            x_n = x_n.detach().requires_grad_(True)
            g = pull.step(n, f, x_n, g)
            x_next = x_n.detach()
    grad_x = g if needs[X_INPUT] else None
    return (*(None,) * X_INPUT, grad_x, *pull.arg_sums, *pull.param_sums)


class ReconstructionAdjoint(torch.autograd.Function):
    """``y = stage(x, *args)`` storing only ``y`` (and the extra args).

    ``ReconstructionAdjoint.apply(problem, x, *args, *params)`` with ``problem`` an
    :class:`AdjointProblem` (``problem.n_args == len(args)``) and ``params`` the parameters
    that should receive gradients.
    """

    @staticmethod
    def forward(ctx, problem: AdjointProblem, x: Tensor, *tensors: Tensor) -> Tensor:
        args, params = split_inputs(problem, tensors)
        y = run_forward(problem, x, args)
        save_context(ctx, problem, y, args, params)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        refuse_double_backward()
        return adjoint_backward(ctx, grad_y)
