"""Residual stages as ODE solvers: the generic engine (pure PyTorch, the reference).

``ResidualStack`` runs ``N`` residual functions as the Euler or Heun scheme with step ``h``
(default ``1/N``), and differentiates either exactly (``backward="autograd"``: activations are
stored), with the memory-free *reconstruction adjoint* (``backward="adjoint"``: only the input
and output are stored; activations are rebuilt backwards in depth), or with the adjoint checked
by its drift and replaced by exact gradients when it drifted (``backward="auto"``). See Sander,
Ablin & Peyre, "Do Residual Neural Networks discretize Neural Ordinary Differential Equations?",
NeurIPS 2022.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from . import _auto, _paper_adjoint, _stored_adjoint
from ._adjoint import DEFAULT_TOL, AdjointProblem, BackwardReport, ReconstructionAdjoint
from ._recompute import frozen_batchnorm_stats, mix_seed, seeded_rng
from .schemes import BlockFn, Scheme, get_scheme

__all__ = [
    "BACKWARD_MODES",
    "BackwardReport",
    "DEFAULT_TOL",
    "ResidualStack",
    "Stage",
    "backward_mode",
    "backward_reports",
    "frozen_batchnorm_stats",
    "set_backward",
    "stages",
]

#: The backward strategies of a stage.
BACKWARD_MODES: tuple[str, ...] = ("autograd", "adjoint", "auto")
# Diagnostic modes, never defaults:
# * "adjoint_stored" (Fig. 4 of the paper, public code): rebuild each x_n from the *stored*
#   x_{n+1} instead of chaining reconstructions from the stage output. Stores every activation
#   (O(N)). Implemented with the diagnostics (resode/_stored_adjoint.py).
# * "adjoint_paper_code" (Fig. 3b, public code): the Euler adjoint that switches the residual
#   functions to eval mode in its backward and leaves them there (resode/_paper_adjoint.py).
_DIAGNOSTIC_MODES: tuple[str, ...] = (_stored_adjoint.MODE, _paper_adjoint.MODE)
# backward mode -> the autograd Function that implements it for the generic engine
_ADJOINTS: dict[str, type[torch.autograd.Function]] = {
    "adjoint": ReconstructionAdjoint,
    _auto.MODE: _auto.AutoAdjoint,
    _stored_adjoint.MODE: _stored_adjoint.StoredReconstructionAdjoint,
    _paper_adjoint.MODE: _paper_adjoint.PaperCodeAdjoint,
}
#: ``step="unit"``: ``h = 1 / num_steps``, the stage spans ``[0, 1]`` whatever the scheme
UNIT_STEP = "unit"


def _check_backward(mode: str, scheme: Scheme | None = None) -> str:
    if mode not in BACKWARD_MODES + _DIAGNOSTIC_MODES:
        raise ValueError(
            f"unknown backward mode {mode!r}; choose one of {list(BACKWARD_MODES)} (diagnostic "
            f"modes: {list(_DIAGNOSTIC_MODES)})"
        )
    if mode == _paper_adjoint.MODE and scheme is not None and scheme.name != "euler":
        raise ValueError(
            f"backward={mode!r} reproduces the paper code's Euler adjoint; this stage uses "
            f"scheme {scheme.name!r} (use backward='adjoint' or scheme='euler')"
        )
    return mode


def _is_positive_finite(step: object) -> bool:
    return (
        isinstance(step, (int, float))
        and not isinstance(step, bool)
        and math.isfinite(step)
        and step > 0
    )


def _check_refine(refine: object) -> int:
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine must be a non-negative integer, got {refine!r}")
    return refine


def _check_tol(tol: object) -> float:
    if not _is_positive_finite(tol):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    return float(tol)


class Stage(nn.Module):
    """Base of every residual stage (generic and fused): scheme, depth, step, backward mode.

    Every stage, whatever its engine, offers: ``depth``, ``scheme``, ``backward``, ``refine``,
    ``tol`` (settable), ``step``, ``tied``, ``num_steps``, ``last_backward``, ``block(n)``,
    ``integrate(x, args, seed)`` and ``reverse(y, *args, seed)``, and its constructor takes
    ``(..., depth, *, scheme, backward, step, tied, refine, tol)`` (see docs/design.md,
    "Engines").

    Args:
        depth: number of residual functions ``N``.
        scheme: ``"euler"`` or ``"heun"`` (see :mod:`resode.schemes`).
        backward: how gradients are computed (Sander, Ablin & Peyre, NeurIPS 2022):

            * ``"autograd"``: exact; every activation is stored (memory ``O(N)``).
            * ``"adjoint"``: memory ``O(1)`` in depth (the stage input and output are kept);
              gradients **approximate**: the relative error falls like ``O(1/N^{K+1})`` for
              Euler with ``K = refine`` and like ``O(1/N^2)`` or faster for Heun (measured about
              ``1/N^3``) when the weights are smooth in depth, and can be arbitrarily large when
              they are not (few blocks, step 1, iid weights: the paper's Fig. 3b).
            * ``"auto"``: the adjoint, checked: when its drift (below) exceeds ``tol`` the pass
              is discarded and exact gradients are recomputed from the stored input with
              ``ceil(sqrt(N))`` checkpoints (``last_backward.exact`` is then ``True``). Cost
              when it does not fall back: that of ``"adjoint"`` plus one device
              synchronisation. When it falls back: about one more forward, one recompute-forward
              and one ordinary backward of the stage, and ``O(sqrt(N))`` activations for that
              backward only.
            * diagnostics, never defaults: ``"adjoint_stored"`` (the paper code's Fig. 4
              protocol, memory ``O(N)``; see :func:`resode.diagnostics.gradient_error`) and
              ``"adjoint_paper_code"`` (the paper code's Euler adjoint, which leaves the
              residual functions in eval mode after its backward; :mod:`resode._paper_adjoint`).
        step: the step ``h``: ``None`` means ``1/N`` (the paper's choice; a Heun stage then
            spans ``[0, (N-1)/N]`` and is only first order as an approximation of the flow on
            ``[0, 1]``), ``"unit"`` means ``1/num_steps`` (the stage spans ``[0, 1]``: ``1/N``
            for Euler, ``1/(N-1)`` for Heun), or a positive number.
        tied: one residual function (one set of parameters) used for all ``N`` steps.
        refine: fixed-point iterations ``K`` after each explicit reverse step of the adjoint:
            ``x^{k+1} = x^k - (Phi_n(x^k) - x^_{n+1})`` (Euler: ``x^_{n+1} - h f_n(x^k)``),
            :meth:`resode.schemes.Scheme.reverse`. ``0`` (default) is the paper's method; each
            iteration costs one more forward step per step and no memory.
        tol: ``"auto"``'s tolerance on the drift ``||x^_0 - x_0|| / ||x_0||`` (default
            :data:`DEFAULT_TOL` ``= 1e-2``). Measured over 420 stages in float64 (MLP and
            conv-BN blocks, Euler and Heun, ``N = 4..64``, iid and depth-smooth weights, step
            ``1/N`` and 1, ``refine = 0..2``): no pass with drift ``<= 1e-2`` had a relative
            gradient error above 5% (the largest was 4.6%, a conv-BN stage; the median ratio of
            gradient error to drift was 0.5 for MLP and 1.6 for conv-BN stages, at most 7 and
            16). ``3e-2`` let two passes above 5% through; ``1e-3`` fell back on twice as many
            accurate passes.

    After each backward, ``stage.last_backward`` is a :class:`BackwardReport`: ``drift``,
    ``max_step_error`` (``max_n ||Phi_n(x^_n) - x^_{n+1}|| / ||y||``, free from the
    recomputation), ``exact``, ``fell_back``, ``mode``, ``refine``. When a stage runs several
    times in one forward, it describes the backward that ran last.
    """

    #: whether this engine implements ``refine > 0`` (engines without it refuse the setting)
    supports_refine: bool = False

    def __init__(
        self,
        depth: int,
        *,
        scheme: str | Scheme = "euler",
        backward: str = "autograd",
        step: float | str | None = None,
        tied: bool = False,
        refine: int = 0,
        tol: float = DEFAULT_TOL,
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
        if step is not None and step != UNIT_STEP and not _is_positive_finite(step):
            raise ValueError(
                f"step must be a positive finite number, 'unit' (1/num_steps) or None (1/depth), "
                f"got {step!r}"
            )
        self._depth = depth
        self._step = step if step is None or step == UNIT_STEP else float(step)
        self._tied = bool(tied)
        self.backward = backward
        self.refine = refine
        self.tol = tol
        #: the :class:`BackwardReport` of the last backward through this stage (``None`` before)
        self.last_backward: BackwardReport | None = None

    @property
    def depth(self) -> int:
        """Number of residual functions ``N``."""
        return self._depth

    @property
    def step(self) -> float:
        """Step ``h`` of the scheme (``1/N`` unless given; ``1/num_steps`` for ``"unit"``)."""
        if self._step is None:
            return 1.0 / self._depth
        if self._step == UNIT_STEP:
            return 1.0 / self.num_steps
        return self._step

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
        """The backward mode (see the class docstring)."""
        return self._backward

    @backward.setter
    def backward(self, mode: str) -> None:
        self._backward = _check_backward(mode, self.scheme)

    @property
    def refine(self) -> int:
        """Fixed-point iterations per reverse step of the adjoint (``0``: the paper's method)."""
        return self._refine

    @refine.setter
    def refine(self, refine: int) -> None:
        refine = _check_refine(refine)
        if refine and not self.supports_refine:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement refine > 0 yet; use the generic "
                "engine (stage.to_generic(), or engine='generic' in resode.models)"
            )
        self._refine = refine

    @property
    def tol(self) -> float:
        """``backward="auto"``'s drift tolerance."""
        return self._tol

    @tol.setter
    def tol(self, tol: float) -> None:
        self._tol = _check_tol(tol)

    def stage_kwargs(self) -> dict:
        """The keywords every stage constructor takes, as this stage was built:
        ``{"scheme", "backward", "step", "tied", "refine", "tol"}`` (``step`` is ``None`` when
        it is ``1/N``, ``"unit"`` when it is ``1/num_steps``)."""
        return dict(
            scheme=self.scheme.name,
            backward=self.backward,
            step=self._step,
            tied=self.tied,
            refine=self.refine,
            tol=self.tol,
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
        out = (
            f"depth={self.depth}, scheme={self.scheme.name!r}, backward={self.backward!r}, "
            f"step={self.step:.6g}, tied={self.tied}"
        )
        if self.refine:
            out += f", refine={self.refine}"
        if self.backward == _auto.MODE:
            out += f", tol={self.tol:g}"
        return out


def stages(model: nn.Module) -> list[Stage]:
    """Every :class:`Stage` inside ``model`` (``model`` itself included)."""
    return [m for m in model.modules() if isinstance(m, Stage)]


def backward_reports(model: nn.Module) -> dict[str, BackwardReport]:
    """``{qualified name: stage.last_backward}`` for every stage of ``model`` that has run a
    backward (the model itself is named ``""`` when it is a stage)."""
    return {
        name: m.last_backward
        for name, m in model.named_modules()
        if isinstance(m, Stage) and m.last_backward is not None
    }


def set_backward(
    model: nn.Module, mode: str, *, refine: int | None = None, tol: float | None = None
) -> dict[Stage, tuple[str, int, float]]:
    """Set the backward mode (and, when given, ``refine`` and ``tol``) of every stage in
    ``model``; returns each stage's previous ``(backward, refine, tol)``.

    Every stage is checked before any is changed (``"adjoint_paper_code"`` needs Euler; an
    engine without ``refine`` refuses ``refine > 0``).
    """
    found = stages(model)
    _check_backward(mode)
    if refine is not None:
        _check_refine(refine)
    if tol is not None:
        _check_tol(tol)
    for s in found:
        _check_backward(mode, s.scheme)
        if refine and not s.supports_refine:
            s.refine = refine  # raises the engine's error before anything changed
    previous = {}
    for s in found:
        previous[s] = (s.backward, s.refine, s.tol)
        s.backward = mode
        if refine is not None:
            s.refine = refine
        if tol is not None:
            s.tol = tol
    return previous


@contextlib.contextmanager
def backward_mode(
    model: nn.Module, mode: str, *, refine: int | None = None, tol: float | None = None
) -> Iterator[nn.Module]:
    """Context manager: run every stage of ``model`` with backward ``mode`` (and ``refine``,
    ``tol`` when given), then restore. ``mode`` is any backward mode, ``"auto"`` included::

        with resode.backward_mode(model, "auto", refine=1):
            loss_fn(model(x), y).backward()
    """
    previous = set_backward(model, mode, refine=refine, tol=tol)
    try:
        yield model
    finally:
        for s, (m, k, t) in previous.items():
            s.backward, s.refine, s.tol = m, k, t


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
            ``"adjoint"`` stores only the stage input and output and, in the backward, rebuilds
            each ``x_n`` with the scheme's reverse step (plus ``refine`` fixed-point
            iterations), recomputes the step with autograd and takes its vector-Jacobian
            product. Activation memory is then constant in depth, but the gradients are
            **approximate**: the relative error is ``O(1/N^{refine+1})`` for Euler and
            ``O(1/N^2)`` or better for Heun when the weights are smooth in depth (Sander et al.
            2022, Prop. 3-5). It is only small when the network behaves like an ODE.
            ``"auto"`` checks the adjoint's drift and falls back to exact gradients
            (:class:`Stage` lists every mode and its cost).
        step: step ``h`` (positive and finite), ``None`` for ``1/N`` or ``"unit"`` for
            ``1/num_steps`` (Heun: ``1/(N-1)``, so that the stage spans ``[0, 1]``).
        tied: one module shared by all ``N`` residual functions (its parameter gradients are
            accumulated over the steps).
        refine, tol: the adjoint's fixed-point iterations and ``"auto"``'s drift tolerance
            (see :class:`Stage`).
        preserve_rng: replay random numbers (dropout masks) in the adjoint's recomputations.
            ``None`` turns it on when a dropout module with ``p > 0`` is inside the blocks. When
            on, each block evaluation draws from its own RNG stream seeded from a per-forward
            seed, in both backward modes; the global RNG advances by one draw per forward.

    Training-mode BatchNorm inside the blocks is recomputed with batch statistics; its running
    statistics are updated once per block *evaluation* of the forward (so twice per forward for
    Heun's inner blocks, which two steps evaluate; as in autograd mode and in the paper's code),
    never by the backward (reverse steps, refinements, recomputations, ``"auto"``'s fallback).
    ``torch.no_grad()`` runs the plain loop. The output may be changed in place
    (``nn.ReLU(inplace=True)``) in every mode; a parameter, extra argument or input changed in
    place between forward and backward raises autograd's error in every mode. Adjoint gradients
    cannot be differentiated again: ``create_graph=True`` through an adjoint stage raises; use
    ``backward="autograd"`` there.
    """

    supports_refine = True

    def __init__(
        self,
        blocks: Sequence[nn.Module] | nn.Module,
        depth: int | None = None,
        *,
        scheme: str | Scheme = "euler",
        backward: str = "autograd",
        step: float | str | None = None,
        tied: bool = False,
        refine: int = 0,
        tol: float = DEFAULT_TOL,
        preserve_rng: bool | None = None,
    ) -> None:
        blocks, depth = _block_list(blocks, depth, tied)
        super().__init__(
            depth, scheme=scheme, backward=backward, step=step, tied=tied, refine=refine, tol=tol
        )
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
        self,
        n: int,
        x_next: Tensor,
        args: tuple[Tensor, ...] = (),
        seed: int | None = None,
        refine: int | None = None,
    ) -> Tensor:
        """Approximate ``x_n`` from ``x_{n+1}``: the scheme's reverse step and ``refine``
        fixed-point iterations (default: the stage's ``refine``)."""
        refine = self.refine if refine is None else _check_refine(refine)
        f = self._block_fn(n, args, seed)
        return self.scheme.reverse(f, n, x_next, self.step, refine)

    @torch.no_grad()
    def reverse(
        self, y: Tensor, *args: Tensor, seed: int | None = None, refine: int | None = None
    ) -> Tensor:
        """Run the reverse steps from the stage output ``y`` back to an estimate of the input
        (``refine`` fixed-point iterations per step; default: the stage's ``refine``).

        Training-mode BatchNorm uses batch statistics and its running statistics are left alone.
        """
        with frozen_batchnorm_stats([self]):
            x = y
            for n in reversed(range(self.num_steps)):
                x = self.reverse_step(n, x, args, seed, refine)
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
            refine=self.refine,
            tol=self.tol,
            on_report=self._set_report,
            modules=tuple(self.blocks),
        )

    def _set_report(self, report: BackwardReport) -> None:
        self.last_backward = report

    def _report_autograd(self, y: Tensor) -> Tensor:
        """In autograd mode, set an exact report when the backward reaches this stage."""
        node = y.grad_fn
        if node is not None:
            exact = BackwardReport(
                mode="autograd",
                exact=True,
                fell_back=False,
                refine=0,
                num_steps=self.num_steps,
                tol=None,
                drift_tensor=0.0,
                step_error_tensor=0.0,
            )
            node.register_prehook(lambda grad_outputs: self._set_report(exact))
        return y

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
        if not torch.is_grad_enabled():
            return self.integrate(x, args, seed)
        if self.backward == "autograd":
            return self._report_autograd(self.integrate(x, args, seed))
        params = self._grad_params()
        if not (x.requires_grad or params or any(a.requires_grad for a in args)):
            return self.integrate(x, args, seed)
        adjoint = _ADJOINTS[self.backward]
        return adjoint.apply(self.adjoint_problem(len(args), seed), x, *args, *params)
