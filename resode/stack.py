"""Residual stages as ODE solvers: the generic engine (pure PyTorch, the reference).

``ResidualStack`` runs ``N`` residual functions as the Euler or Heun scheme with step ``h``
(default ``1/N``), and differentiates either exactly (``backward="autograd"``: activations are
stored) or with the memory-free *reconstruction adjoint* (``backward="adjoint"``: only the output
is stored; activations are rebuilt backwards in depth). See Sander, Ablin & Peyre, "Do Residual
Neural Networks discretize Neural Ordinary Differential Equations?", NeurIPS 2022.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from . import _stored_adjoint
from ._adjoint import AdjointProblem, ReconstructionAdjoint
from ._recompute import frozen_batchnorm_stats, mix_seed, seeded_rng
from .schemes import BlockFn, Scheme, get_scheme

__all__ = [
    "BACKWARD_MODES",
    "ResidualStack",
    "Stage",
    "backward_mode",
    "frozen_batchnorm_stats",
    "set_backward",
    "stages",
]

#: The backward strategies of a stage.
BACKWARD_MODES: tuple[str, ...] = ("autograd", "adjoint")
# Diagnostic only (Fig. 4 of the paper, public code): rebuild each x_n from the *stored* x_{n+1}
# instead of chaining reconstructions from the stage output. Stores every activation (O(N)).
# Implemented with the diagnostics (resode/_stored_adjoint.py).
_DIAGNOSTIC_MODES: tuple[str, ...] = (_stored_adjoint.MODE,)
# backward mode -> the autograd Function that implements it for the generic engine
_ADJOINTS: dict[str, type[torch.autograd.Function]] = {
    "adjoint": ReconstructionAdjoint,
    _stored_adjoint.MODE: _stored_adjoint.StoredReconstructionAdjoint,
}


def _check_backward(mode: str) -> str:
    if mode not in BACKWARD_MODES + _DIAGNOSTIC_MODES:
        raise ValueError(f"unknown backward mode {mode!r}; choose one of {list(BACKWARD_MODES)}")
    return mode


def _is_positive_finite(step: object) -> bool:
    return (
        isinstance(step, (int, float))
        and not isinstance(step, bool)
        and math.isfinite(step)
        and step > 0
    )


class Stage(nn.Module):
    """Base of every residual stage (generic and fused): scheme, depth, step, backward mode.

    Every stage, whatever its engine, offers: ``depth``, ``scheme``, ``backward`` (settable),
    ``step``, ``tied``, ``num_steps``, ``block(n)``, ``integrate(x, args, seed)`` and
    ``reverse(y, *args, seed)``, and its constructor takes ``(..., depth, *, scheme, backward,
    step, tied)`` (see docs/design.md, "Engines").

    Args:
        depth: number of residual functions ``N``.
        scheme: ``"euler"`` or ``"heun"`` (see :mod:`resode.schemes`).
        backward: ``"autograd"`` (exact gradients, activations stored, memory ``O(N)``) or
            ``"adjoint"`` (memory ``O(1)`` in depth; gradients approximate, error ``O(1/N)`` for
            Euler and ``O(1/N^2)`` for Heun when the weights are smooth in depth; Sander, Ablin
            & Peyre, NeurIPS 2022). ``"adjoint_stored"`` is the paper code's diagnostic variant
            (memory ``O(N)``; see :func:`resode.diagnostics.gradient_error`).
        step: the step ``h``; ``None`` means ``1/N``.
        tied: one residual function (one set of parameters) used for all ``N`` steps.
    """

    def __init__(
        self,
        depth: int,
        *,
        scheme: str | Scheme = "euler",
        backward: str = "autograd",
        step: float | None = None,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.scheme = get_scheme(scheme)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if depth < self.scheme.min_depth:
            raise ValueError(
                f"scheme {self.scheme.name!r} needs at least {self.scheme.min_depth} residual "
                f"functions, got {depth}; use more blocks or scheme='euler'"
            )
        if step is not None and not _is_positive_finite(step):
            raise ValueError(
                f"step must be a positive finite number or None (1/depth), got {step!r}"
            )
        self._depth = depth
        self._step = None if step is None else float(step)
        self._tied = bool(tied)
        self.backward = backward

    @property
    def depth(self) -> int:
        """Number of residual functions ``N``."""
        return self._depth

    @property
    def step(self) -> float:
        """Step ``h`` of the scheme (``1/N`` unless given)."""
        return self._step if self._step is not None else 1.0 / self._depth

    @property
    def tied(self) -> bool:
        """Whether one residual function (one set of parameters) serves all ``N`` steps."""
        return self._tied

    @property
    def num_steps(self) -> int:
        """Steps taken: ``N`` for Euler, ``N - 1`` for Heun."""
        return self.scheme.num_steps(self._depth)

    @property
    def backward(self) -> str:
        """The backward mode: ``"autograd"``, ``"adjoint"`` (or ``"adjoint_stored"``)."""
        return self._backward

    @backward.setter
    def backward(self, mode: str) -> None:
        self._backward = _check_backward(mode)

    def stage_kwargs(self) -> dict:
        """The keywords every stage constructor takes, as this stage was built:
        ``{"scheme", "backward", "step", "tied"}`` (``step`` is ``None`` when it is ``1/N``)."""
        return dict(
            scheme=self.scheme.name, backward=self.backward, step=self._step, tied=self.tied
        )

    def block(self, n: int) -> nn.Module:
        """The residual function ``f_n`` as an ``nn.Module`` (a copy for the fused stages)."""
        raise NotImplementedError

    def integrate(
        self, x: Tensor, args: tuple[Tensor, ...] = (), seed: int | None = None
    ) -> Tensor:
        """The plain forward loop ``x_0 -> x_N`` (records a graph only if autograd is on).

        ``args`` are extra tensors passed to every block; ``seed`` replays the random streams of
        one forward (``None``: the global RNG).
        """
        raise NotImplementedError

    def reverse(self, y: Tensor, *args: Tensor, seed: int | None = None) -> Tensor:
        """The reverse steps from the stage output ``y`` back to an estimate of its input.

        Without a graph; training-mode BatchNorm uses batch statistics and its running
        statistics are left alone.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, scheme={self.scheme.name!r}, backward={self.backward!r}, "
            f"step={self.step:.6g}, tied={self.tied}"
        )


def stages(model: nn.Module) -> list[Stage]:
    """Every :class:`Stage` inside ``model`` (``model`` itself included)."""
    return [m for m in model.modules() if isinstance(m, Stage)]


def set_backward(model: nn.Module, mode: str) -> dict[Stage, str]:
    """Set the backward mode of every stage in ``model``; returns the previous modes."""
    _check_backward(mode)
    previous = {}
    for s in stages(model):
        previous[s] = s.backward
        s.backward = mode
    return previous


@contextlib.contextmanager
def backward_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Context manager: run every stage of ``model`` with backward ``mode``, then restore."""
    previous = set_backward(model, mode)
    try:
        yield model
    finally:
        for s, m in previous.items():
            s.backward = m


def _block_list(
    blocks: Sequence[nn.Module] | nn.Module, depth: int | None, tied: bool
) -> tuple[list[nn.Module], int]:
    """The blocks of a :class:`ResidualStack` as a list, and its depth (checked)."""
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        if not tied:
            # An nn.Sequential is one residual function (Linear-Tanh-Linear...), never a list of
            # them: taking its layers as N residual functions would silently build another net.
            raise TypeError(
                f"ResidualStack got one module ({type(blocks).__name__}), not a list of blocks. "
                "For one block applied N times: ResidualStack(block, depth=N, tied=True) (shared "
                "weights) or ResidualStack.from_factory(make_block, N) (N blocks); for blocks "
                "you built: ResidualStack([block1, block2, ...]) (a list, tuple or nn.ModuleList)"
            )
        blocks = [blocks]
    blocks = list(blocks)
    if not blocks:
        raise ValueError("ResidualStack needs at least one residual block, got an empty list")
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise TypeError(f"block {i} is a {type(b).__name__}, not an nn.Module")
    if tied:
        if len(blocks) != 1:
            raise ValueError(f"a tied stage takes one block, got {len(blocks)}")
        if depth is None:
            raise ValueError(
                "a tied stage needs its depth: ResidualStack(block, depth=N, tied=True)"
            )
        return blocks, depth
    if depth is not None and depth != len(blocks):
        raise ValueError(f"depth={depth} but {len(blocks)} blocks were given (untied)")
    return blocks, len(blocks)


class ResidualStack(Stage):
    """A residual stage read as an ODE solver, with an optional memory-free backward.

    ``x_{n+1} = x_n + h f_n(x_n)`` (Euler) or Heun's two-stage step, with ``N`` residual
    functions ``f_n`` given as modules. Every block is called as ``block(x, *args)`` and must
    return a tensor shaped like ``x``.

    Args:
        blocks: the ``N`` residual functions as a list, tuple or ``nn.ModuleList`` of modules
            (untied); with ``tied=True``, one module (or a list of one) applied ``depth`` times.
            A single module is refused when untied: an ``nn.Sequential`` is one residual
            function, not ``N`` of them. :meth:`from_factory` builds either from a block
            constructor.
        depth: number of residual functions ``N``; defaults to ``len(blocks)`` (untied) and is
            required when ``tied``.
        scheme: ``"euler"`` (order 1) or ``"heun"`` (order 2; ``N`` functions, ``N - 1`` steps).
        backward: ``"autograd"`` stores every activation and gives exact gradients.
            ``"adjoint"`` stores only the stage output and, in the backward, rebuilds each
            ``x_n`` with the scheme's reverse step, recomputes the step with autograd and takes
            its vector-Jacobian product. Activation memory is then constant in depth, but the
            gradients are **approximate**: the relative error is ``O(1/N)`` for Euler and
            ``O(1/N^2)`` for Heun when the weights are smooth in depth (Sander et al. 2022,
            Prop. 3-5). It is only small when the network behaves like an ODE.
        step: step ``h`` (positive and finite); ``None`` means ``1/N``.
        tied: one module shared by all ``N`` residual functions (its parameter gradients are
            accumulated over the steps).
        preserve_rng: replay random numbers (dropout masks) in the adjoint's recomputations.
            ``None`` turns it on when a dropout module with ``p > 0`` is inside the blocks. When
            on, each block evaluation draws from its own RNG stream seeded from a per-forward
            seed, in both backward modes; the global RNG advances by one draw per forward.

    Training-mode BatchNorm inside the blocks is recomputed with batch statistics; its running
    statistics are updated once per forward evaluation (as in autograd mode), never by the
    backward. ``torch.no_grad()`` runs the plain loop. The output may be changed in place
    (``nn.ReLU(inplace=True)``) in every mode. Adjoint gradients cannot be differentiated again:
    ``create_graph=True`` through an adjoint stage raises; use ``backward="autograd"`` there.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module] | nn.Module,
        depth: int | None = None,
        *,
        scheme: str | Scheme = "euler",
        backward: str = "autograd",
        step: float | None = None,
        tied: bool = False,
        preserve_rng: bool | None = None,
    ) -> None:
        blocks, depth = _block_list(blocks, depth, tied)
        super().__init__(depth, scheme=scheme, backward=backward, step=step, tied=tied)
        self.blocks = nn.ModuleList(blocks)
        if preserve_rng is None:
            preserve_rng = any(
                isinstance(m, _DropoutNd) and m.p > 0 for b in blocks for m in b.modules()
            )
        self.preserve_rng = bool(preserve_rng)

    @classmethod
    def from_factory(
        cls, make_block: Callable[[], nn.Module], depth: int, *, tied: bool = False, **kwargs
    ) -> ResidualStack:
        """A stage of ``depth`` residual functions built by ``make_block()``.

        ``tied=False`` calls ``make_block`` ``depth`` times (one module per function);
        ``tied=True`` calls it once and shares that module over all ``depth`` steps. Other
        keywords are those of :class:`ResidualStack`.
        """
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if tied:
            return cls(make_block(), depth, tied=True, **kwargs)
        return cls([make_block() for _ in range(depth)], **kwargs)

    def block(self, n: int) -> nn.Module:
        """The module of residual function ``f_n``."""
        if not 0 <= n < self.depth:
            raise IndexError(f"residual function index {n} out of range for depth {self.depth}")
        return self.blocks[0] if self.tied else self.blocks[n]

    # ------------------------------------------------------------------ evaluation
    def _eval(
        self, i: int, x: Tensor, *, args: tuple[Tensor, ...], step: int, seed: int | None
    ) -> Tensor:
        block = self.block(i)
        if seed is None:
            out = block(x, *args)
        else:
            with seeded_rng(mix_seed(seed, step, i), x.device):
                out = block(x, *args)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"residual function {i} ({type(block).__name__}) maps an input of shape "
                f"{tuple(x.shape)} to {got}; a residual block must return a tensor of the "
                "same shape as its input (put shape-changing layers outside the stack)"
            )
        return out

    def _block_fn(self, n: int, args: tuple[Tensor, ...], seed: int | None) -> BlockFn:
        """``f(i, x)``: residual function ``i`` at ``x`` as step ``n`` evaluates it."""
        return partial(self._eval, args=args, step=n, seed=seed)

    def integrate(
        self, x: Tensor, args: tuple[Tensor, ...] = (), seed: int | None = None
    ) -> Tensor:
        """The plain forward loop (records a graph only if autograd is on)."""
        h = self.step
        for n in range(self.num_steps):
            x = self.scheme.step(self._block_fn(n, args, seed), n, x, h)
        return x

    def reverse_step(
        self, n: int, x_next: Tensor, args: tuple[Tensor, ...] = (), seed: int | None = None
    ) -> Tensor:
        """Approximate ``x_n`` from ``x_{n+1}`` (scheme's reverse step)."""
        return self.scheme.reverse_step(self._block_fn(n, args, seed), n, x_next, self.step)

    @torch.no_grad()
    def reverse(self, y: Tensor, *args: Tensor, seed: int | None = None) -> Tensor:
        """Run the reverse steps from the stage output ``y`` back to an estimate of the input.

        Training-mode BatchNorm uses batch statistics and its running statistics are left alone.
        """
        with frozen_batchnorm_stats([self]):
            x = y
            for n in reversed(range(self.num_steps)):
                x = self.reverse_step(n, x, args, seed)
        return x

    def _grad_params(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        out = []
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def adjoint_problem(self, n_args: int = 0, seed: int | None = None) -> AdjointProblem:
        """What the reconstruction adjoint needs from this stage (:mod:`resode._adjoint`)."""
        return AdjointProblem(
            scheme=self.scheme,
            h=self.step,
            num_steps=self.num_steps,
            step_fn=partial(self._block_fn, seed=seed),
            block_params=lambda i: self.block(i).parameters(),
            frozen=(self,),
            n_args=n_args,
        )

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"ResidualStack expects a tensor input, got {type(x).__name__}")
        for j, a in enumerate(args):
            if not isinstance(a, Tensor):
                raise TypeError(
                    f"extra argument {j} is a {type(a).__name__}; ResidualStack passes only "
                    "tensors to its blocks (wrap constants in the block, or pass a tensor)"
                )
        seed = None
        if self.preserve_rng and self.training:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if self.backward == "autograd" or not torch.is_grad_enabled():
            return self.integrate(x, args, seed)
        params = self._grad_params()
        if not (x.requires_grad or params or any(a.requires_grad for a in args)):
            return self.integrate(x, args, seed)
        adjoint = _ADJOINTS[self.backward]
        return adjoint.apply(self.adjoint_problem(len(args), seed), x, *args, *params)
