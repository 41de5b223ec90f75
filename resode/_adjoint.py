"""The reconstruction adjoint of a residual stage (the generic engine's ``backward="adjoint"``).

Forward: run the scheme without recording a graph and keep the stage output ``y`` and input
``x_0`` (two tensors, whatever the depth), the extra arguments and the parameters (kept through
``ctx.save_for_backward``, so autograd's version counter catches an in-place change between
forward and backward and raises its usual error instead of returning a silently wrong gradient).

Backward, for each step ``n`` from the last, starting at ``x^_N = y``:

1. rebuild ``x^_n`` from ``x^_{n+1}`` under ``torch.no_grad``: the scheme's explicit reverse step,
   then ``refine = K`` fixed-point iterations ``x <- x^_{n+1} - (Phi_n(x) - x)`` of the implicit
   equation ``Phi_n(x_n) = x_{n+1}`` (:meth:`~resode.schemes.Scheme.reverse`);
2. recompute step ``n`` at ``x^_n`` with autograd, take its vector-Jacobian product with the
   incoming gradient, add the parameter and extra-argument gradients to accumulators allocated
   once before the loop, free the graph;
3. measure the step's consistency ``||Phi_n(x^_n) - x^_{n+1}||`` from the recomputed output
   (free: the recomputation is needed anyway) and keep the running maximum.

At the end, ``drift = ||x^_0 - x_0|| / ||x_0||`` compares the fully rebuilt input with the stored
one, and ``max_step_error = max_n ||Phi_n(x^_n) - x^_{n+1}|| / ||y||``. Both numbers are kept
as 0-dim tensors (no device synchronisation) in the stage's :class:`BackwardReport`. Peak memory
is one step's graph, whatever the depth.

The gradients are approximate: the rebuilt ``x^_n`` carry the reverse step's local error, so the
relative gradient error is ``O(h^{K+1})`` for Euler and ``O(h^2)`` or better (measured about
``h^3``) for Heun when the weights are smooth in depth (Sander, Ablin & Peyre, NeurIPS 2022,
section 4; ``K = 0`` is their method). ``backward="auto"`` (:mod:`resode._auto`) checks the drift
and returns exact gradients when it exceeds a tolerance.

The gradient accumulators are allocated before the loop on purpose: allocated step by step (as
``torch.autograd.grad`` returns them), these long-lived small tensors land between the step's
large short-lived buffers in glibc's heap and keep the freed space from being reused, and the
process's peak memory then grows linearly in depth on CPU although no activation is kept.

The adjoint knows nothing of :class:`~resode.stack.ResidualStack`: a stage hands it an
:class:`AdjointProblem` and its tensors, ``ReconstructionAdjoint.apply(problem, x, *args,
*params)``. See docs/design.md, "Data flow".
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

#: ``backward="auto"``'s default tolerance on the drift ``||x^_0 - x_0|| / ||x_0||`` (see
#: :class:`resode.stack.Stage`, ``tol``, for the measurements behind it).
DEFAULT_TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class BackwardReport:
    """What a stage's last backward did (``stage.last_backward``).

    Attributes:
        mode: the backward mode that ran (``"autograd"``, ``"adjoint"``, ``"auto"``, ...).
        exact: the returned gradients are exact: ``True`` for ``"autograd"`` and when
            ``"auto"`` fell back; ``False`` for the reconstruction adjoints.
        fell_back: ``"auto"`` discarded its adjoint pass (drift above ``tol``) and recomputed
            exact gradients from the stored input.
        refine: fixed-point iterations per reverse step.
        num_steps: steps of the stage.
        tol: ``"auto"``'s drift tolerance (``None`` for the other modes).
        drift_tensor: ``||x^_0 - x_0|| / ||x_0||`` as a 0-dim tensor (0 for ``"autograd"``:
            nothing is rebuilt); ``drift`` gives it as a float.
        step_error_tensor: ``max_n ||Phi_n(x^_n) - x^_{n+1}|| / ||y||`` (``y = x^_N`` the stage
            output; 0 for ``"autograd"``) as a 0-dim tensor; ``max_step_error`` gives it as a
            float.

    The values stay tensors until read, so a backward never waits for the device to report.
    """

    mode: str
    exact: bool
    fell_back: bool
    refine: int
    num_steps: int
    tol: float | None
    drift_tensor: Tensor | float
    step_error_tensor: Tensor | float

    @property
    def drift(self) -> float:
        """Relative distance of the rebuilt stage input to the true one (reads the device)."""
        return float(self.drift_tensor)

    @property
    def max_step_error(self) -> float:
        """Largest per-step inconsistency ``max_n ||Phi_n(x^_n) - x^_{n+1}|| / ||y||``."""
        return float(self.step_error_tensor)

    def to_dict(self) -> dict:
        """Plain values (floats) of every field, for logs and JSON."""
        return dict(
            mode=self.mode,
            exact=self.exact,
            fell_back=self.fell_back,
            refine=self.refine,
            num_steps=self.num_steps,
            tol=self.tol,
            drift=self.drift,
            max_step_error=self.max_step_error,
        )


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
        refine: fixed-point iterations after each explicit reverse step.
        tol: drift tolerance of ``backward="auto"``.
        on_report: called with the :class:`BackwardReport` of each backward.
        modules: the residual functions as modules (used by the paper-code variant, which
            switches them to eval mode).
    """

    scheme: Scheme
    h: float
    num_steps: int
    step_fn: Callable[[int, tuple[Tensor, ...]], BlockFn]
    block_params: Callable[[int], Iterable[Tensor]]
    frozen: Sequence[nn.Module] = ()
    n_args: int = 0
    refine: int = 0
    tol: float = DEFAULT_TOL
    on_report: Callable[[BackwardReport], None] | None = None
    modules: Sequence[nn.Module] = ()


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
    x: Tensor,
    y: Tensor,
    args: tuple[Tensor, ...],
    params: tuple[Tensor, ...],
    extra: Sequence[Tensor] = (),
) -> None:
    """Keep for the backward: the output ``y``, the input ``x``, the extra args, the parameters
    and ``extra`` tensors, all through ``ctx.save_for_backward``.

    ``y`` is kept as a private copy, not as the returned output: the backward starts its
    reconstruction from these values, and the caller may change the output in place
    (``nn.ReLU(inplace=True)`` right after the stage), which would otherwise fail autograd's
    version check. It costs one output-sized tensor, whatever the depth. ``x`` (for the drift
    check and ``"auto"``'s exact recomputation), the args and the parameters are saved as they
    are: changing one of them in place before the backward raises autograd's error, as it would
    without the adjoint.
    """
    ctx.problem = problem
    ctx.n_params = len(params)
    ctx.save_for_backward(y.clone(), x, *args, *params, *extra)


def refuse_double_backward() -> None:
    """Raise when the backward is asked to build a graph (``create_graph=True``).

    The reconstruction adjoint's gradients are computed step by step from rebuilt states, so
    they cannot be differentiated again; without this, a second ``torch.autograd.grad`` would
    see no dependence and return ``None`` (or zeros) for inputs the stage does depend on.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "resode: a stage with backward='adjoint' (or 'auto', 'adjoint_stored', "
            "'adjoint_paper_code') cannot be differentiated twice (create_graph=True, double "
            "backward, Hessian-vector products): its gradients come from the reconstruction "
            "adjoint. Use backward='autograd' for this stage (stage.backward = 'autograd', or "
            "with resode.backward_mode(model, 'autograd'): ...)"
        )


@dataclasses.dataclass(frozen=True)
class Saved:
    """The tensors kept by :func:`save_context` (unpacking them runs autograd's version check)."""

    y: Tensor
    x: Tensor
    args: tuple[Tensor, ...]
    params: tuple[Tensor, ...]
    extra: tuple[Tensor, ...]


def saved(ctx) -> Saved:
    """The tensors kept by :func:`save_context`."""
    t = ctx.saved_tensors
    a = 2 + ctx.problem.n_args
    p = a + ctx.n_params
    return Saved(t[0], t[1], tuple(t[2:a]), tuple(t[a:p]), tuple(t[p:]))


def norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype drift measures are computed in: ``x``'s, float32 for half types."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def dist(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||`` as a 0-dim tensor (in :func:`norm_dtype`), without a synchronisation."""
    return torch.linalg.vector_norm(a - b, dtype=norm_dtype(a))


def rel_norm(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b|| / ||b||`` as a 0-dim tensor, without a device synchronisation."""
    return relative(dist(a, b), b)


def relative(num: Tensor, b: Tensor) -> Tensor:
    """``num / ||b||`` (``0/0 = 0``)."""
    den = torch.linalg.vector_norm(b, dtype=num.dtype)
    return num / den.clamp_min(torch.finfo(num.dtype).tiny)


class Pullback:
    """One backward pass: the extra arguments as fresh leaves, the parameters each step uses,
    and the gradient accumulators of parameters and arguments (allocated up front)."""

    def __init__(self, ctx, state: Saved) -> None:
        problem: AdjointProblem = ctx.problem
        needs = ctx.needs_input_grad
        arg_needs = needs[FIRST_ARG_INPUT : FIRST_ARG_INPUT + problem.n_args]
        self.problem = problem
        self.params = state.params
        # Fresh leaves for the extra arguments so their gradients can be taken step by step.
        self.args = tuple(
            a.detach().requires_grad_(True) if need else a.detach()
            for a, need in zip(state.args, arg_needs)
        )
        self.arg_idx = [j for j, need in enumerate(arg_needs) if need]
        # Allocated before the loop, accumulated in place (see the module docstring).
        self.param_sums = [torch.zeros_like(p) for p in state.params]
        self.arg_sums = [
            torch.zeros_like(a) if need else None for a, need in zip(state.args, arg_needs)
        ]
        self._touched = [False] * len(state.params)
        self._index = {id(p): k for k, p in enumerate(state.params)}
        self._of_block: dict[int, list[int]] = {}

    def block_fn(self, n: int) -> BlockFn:
        """``f(i, x)`` as evaluated in step ``n`` (with the fresh extra arguments)."""
        return self.problem.step_fn(n, self.args)

    def _params_of_block(self, i: int) -> list[int]:
        if i not in self._of_block:
            ps = self.problem.block_params(i)
            self._of_block[i] = [self._index[id(p)] for p in ps if id(p) in self._index]
        return self._of_block[i]

    def _params_of_steps(self, steps: range) -> list[int]:
        out: list[int] = []
        for n in steps:
            for i in self.problem.scheme.blocks_of_step(n):
                for k in self._params_of_block(i):
                    if k not in out:
                        out.append(k)
        return out

    def pull(self, steps: range, x_first: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Recompute ``steps`` (consecutive) from the leaf ``x_first`` and pull ``g`` back.

        Adds the parameter and extra-argument gradients to the accumulators; returns the
        gradient with respect to ``x_first`` and the recomputed output (detached).
        """
        param_idx = self._params_of_steps(steps)
        params = [self.params[k] for k in param_idx]
        inputs = [x_first, *params, *(self.args[j] for j in self.arg_idx)]
        with torch.enable_grad():
            out = x_first
            for n in steps:
                out = self.problem.scheme.step(self.block_fn(n), n, out, self.problem.h)
        grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        for k, gk in zip(param_idx, grads[1 : 1 + len(param_idx)]):
            if gk is not None:
                self.param_sums[k].add_(gk)
                self._touched[k] = True
        for j, gj in zip(self.arg_idx, grads[1 + len(param_idx) :]):
            if gj is not None:
                self.arg_sums[j].add_(gj)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(x_first)
        return gx, out.detach()

    def gradients(self, ctx, grad_x: Tensor) -> tuple:
        """One gradient (or ``None``) per input of ``apply``."""
        grad_x = grad_x if ctx.needs_input_grad[X_INPUT] else None
        params = [s if t else None for s, t in zip(self.param_sums, self._touched)]
        return (*(None,) * X_INPUT, grad_x, *self.arg_sums, *params)


@dataclasses.dataclass
class Reconstruction:
    """Result of one reconstruction pass: the pullback, ``dL/dx_0`` and the drift measures."""

    pull: Pullback
    grad_x: Tensor
    drift: Tensor
    step_error: Tensor


def reconstruct_and_pull(
    ctx, state: Saved, grad_y: Tensor, rebuild_from: RebuildFrom | None = None
) -> Reconstruction:
    """The reconstruction adjoint's loop (module docstring, steps 1-3) and the final drift.

    Each ``x_n`` is rebuilt from ``rebuild_from(n, x_next)`` (default: the chained
    reconstruction ``x_next`` of ``x_{n+1}``, which is what makes the adjoint memory-free).
    """
    problem: AdjointProblem = ctx.problem
    pull = Pullback(ctx, state)
    scheme, h = problem.scheme, problem.h
    g = grad_y
    x_next = state.y.detach()
    step_error = torch.zeros((), dtype=norm_dtype(x_next), device=x_next.device)
    with frozen_batchnorm_stats(problem.frozen):
        for n in reversed(range(problem.num_steps)):
            f = pull.block_fn(n)
            with torch.no_grad():
                start = x_next if rebuild_from is None else rebuild_from(n, x_next).detach()
                x_n = scheme.reverse(f, n, start, h, problem.refine)
            x_n = x_n.detach().requires_grad_(True)
            g, out = pull.pull(range(n, n + 1), x_n, g)
            with torch.no_grad():
                torch.maximum(step_error, dist(out, start), out=step_error)
            x_next = x_n.detach()
        with torch.no_grad():
            drift = rel_norm(x_next, state.x.detach())
            step_error = relative(step_error, state.y)
    return Reconstruction(pull, g, drift, step_error)


def publish(
    problem: AdjointProblem,
    mode: str,
    drift: Tensor,
    step_error: Tensor,
    exact: bool,
    fell_back: bool,
) -> None:
    """Hand the :class:`BackwardReport` of this backward to the stage."""
    if problem.on_report is None:
        return
    problem.on_report(
        BackwardReport(
            mode=mode,
            exact=exact,
            fell_back=fell_back,
            refine=problem.refine,
            num_steps=problem.num_steps,
            tol=problem.tol if mode == "auto" else None,
            drift_tensor=drift.detach(),
            step_error_tensor=step_error.detach(),
        )
    )


def adjoint_backward(
    ctx,
    grad_y: Tensor,
    rebuild_from: RebuildFrom | None = None,
    mode: str = "adjoint",
    state: Saved | None = None,
) -> tuple:
    """The backward of a reconstruction adjoint Function whose forward called
    :func:`save_context`: one gradient (or ``None``) per input of ``apply``; publishes the
    :class:`BackwardReport` (``exact=False``) under ``mode``. ``state``: the saved tensors
    when the caller has unpacked them already."""
    state = saved(ctx) if state is None else state
    rec = reconstruct_and_pull(ctx, state, grad_y, rebuild_from)
    publish(ctx.problem, mode, rec.drift, rec.step_error, exact=False, fell_back=False)
    return rec.pull.gradients(ctx, rec.grad_x)


def adjoint_forward(ctx, problem: AdjointProblem, x: Tensor, tensors: tuple[Tensor, ...]):
    """The forward of every reconstruction adjoint Function that keeps only ``x`` and ``y``."""
    args, params = split_inputs(problem, tensors)
    y = run_forward(problem, x, args)
    save_context(ctx, problem, x, y, args, params)
    return y


class ReconstructionAdjoint(torch.autograd.Function):
    """``y = stage(x, *args)`` storing only ``y``, ``x`` (and the extra args, the parameters).

    ``ReconstructionAdjoint.apply(problem, x, *args, *params)`` with ``problem`` an
    :class:`AdjointProblem` (``problem.n_args == len(args)``) and ``params`` the parameters
    that should receive gradients.
    """

    @staticmethod
    def forward(ctx, problem: AdjointProblem, x: Tensor, *tensors: Tensor) -> Tensor:
        return adjoint_forward(ctx, problem, x, tensors)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        refuse_double_backward()
        return adjoint_backward(ctx, grad_y)
