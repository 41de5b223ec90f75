"""Fused residual stages: the whole depth loop in C++/CUDA (``resode._C``).

``MLPStack`` (blocks Linear-act-Linear) and ``ConvStack`` (blocks conv3x3-BN-ReLU-conv3x3-BN)
compute exactly what the generic :class:`resode.ResidualStack` computes with the equivalent
``nn.Module`` blocks (see :meth:`MLPStack.to_generic`), with the same schemes (Euler, Heun), the
same backward modes and the same BatchNorm rules, but run the forward loop, the reverse
reconstruction and the vector-Jacobian products in one C++ op per direction: no Python or
autograd overhead per layer. GEMMs and convolutions call ATen (cuBLAS / cuDNN on GPU); the
elementwise work around them runs in our own fused kernels.

Backward modes (as for the generic engine, with the same ``refine`` and ``tol`` and the same
``stage.last_backward`` report; float64 parity with it to 1e-10):

* ``"autograd"``: exact gradients; the op stores, per block evaluation, the block input and the
  intermediate activations it needs (MLP: input, pre-activation, activation; conv: input, both
  normalised BN inputs, the ReLU output and both inverse standard deviations).
* ``"adjoint"``: stores only the stage input and output; the backward rebuilds each ``x_n`` with
  the scheme's reverse step and ``refine`` fixed-point iterations, recomputes the step, measures
  ``||Phi_n(x^_n) - x^_{n+1}||`` (the report's ``max_step_error``), takes the step's
  vector-Jacobian product, and at the end compares the rebuilt input with the stored one (the
  report's ``drift``). Memory is constant in depth but gradients are **approximate**: error
  ``O(1/N^{refine+1})`` for Euler and ``O(1/N^2)`` or better for Heun when the weights are
  smooth in depth (Sander, Ablin & Peyre, NeurIPS 2022). Heun's reverse step reuses
  ``f_{n+1}(x_{n+1})`` computed at the previous step's recomputation. The check costs one
  elementwise pass and one reduction per step, plus (MLP) the second GEMM of the recomputed
  block, which the vector-Jacobian product alone does not need.
* ``"auto"``: the adjoint; when its drift exceeds ``tol`` (or is nan) the pass is discarded and
  exact gradients are computed in the same C++ op from the stored input: a forward keeps the
  state every ``L = ceil(sqrt(steps))`` steps, then each segment is run again storing its
  contexts and differentiated exactly (``last_backward.exact``). Cost without fallback: that of
  ``"adjoint"`` plus one device synchronisation; with it, about one more forward, one
  recompute-forward and one exact backward, and the contexts of ``O(sqrt(N))`` steps for that
  backward only.
* ``"adjoint_stored"`` (diagnostic, the paper's public code): each ``x_n`` is rebuilt from the
  *stored* ``x_{n+1}``.
* ``"adjoint_paper_code"`` (diagnostic, Euler): the paper code's adjoint, eval-mode switch
  included: the backward recomputes with BatchNorm's running statistics and leaves the stage in
  eval mode (:mod:`resode._paper_adjoint`; the generic engine switches its residual functions,
  a fused stage switches itself). For ``MLPStack`` it is ``"adjoint"`` plus the switch.

A fused stage can be differentiated once: ``create_graph=True`` raises an error that points to
the generic engine (``to_generic()`` with ``backward="autograd"``).

Memory accounting: everything the C++ op keeps between forward and backward is returned to
Python and saved with ``ctx.save_for_backward``, so
:func:`resode.diagnostics.saved_tensor_bytes` sees all of it; the C++ side holds nothing else
(``extra_saved_bytes`` is 0).

State dicts hold the stacked tensors (``w1`` ``(P, hidden, dim)``, ``conv1_weight``
``(P, C, C, 3, 3)``, ...); :meth:`MLPStack.to_generic` / :meth:`MLPStack.from_generic` (and
the ``ConvStack`` ones) map them exactly to and from the generic layout
(``blocks.{n}.0.weight``, ...).

Training-mode BatchNorm (``ConvStack``): batch statistics in the forward and in every
recomputation; the running statistics (unbiased variance, ``momentum``) and
``num_batches_tracked`` are updated once per block evaluation of the forward, in the order of
the generic engine, and never by the backward.

Stage interface, as for the generic :class:`resode.ResidualStack`: ``forward(x)``,
``integrate(x, args=(), seed=None)`` (the forward with exact gradients), ``reverse(y, *args,
seed=None)`` (the scheme's reverse steps from the output, run in C++; BatchNorm running
statistics untouched), ``block(n)`` (a copy of ``f_n`` as an ``nn.Module``: the
:func:`resode.models.blocks.mlp_block` / :func:`~resode.models.blocks.conv_block` of the generic
engine), ``to_generic()`` and ``from_generic()``. The blocks of a fused stage take no extra
arguments and draw no random numbers, so ``args`` must be empty and ``seed`` is ignored. The ops
themselves are in :mod:`resode._ops`; docs/design.md, "Engines" and "The extension".

``torch.compile`` works on both stages (forward and backward, ``fullgraph=True``, every backward
mode but ``"adjoint_paper_code"``, which runs eagerly behind a graph break; ``"auto"``'s
data-dependent fallback happens inside the backward op): the ops have functional schemas and
fake kernels. A compiled backward is a graph and cannot call back into Python, so under
``torch.compile`` ``stage.last_backward`` is ``None`` (reset by each compiled forward) and the
drift check's numbers are not reported; run a step eagerly (or ``resode check``) to see them.
Without the extension (not built, or ``RESODE_DISABLE_EXTENSION=1``) a fused stage can be built,
converted (:meth:`to_generic`) and loaded, but running it raises an error that says why and how
to build the extension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _ext, _ops
from ._adjoint import DEFAULT_TOL
from .models.blocks import activation_name, conv_block, make_activation, mlp_block
from .stack import ResidualStack, Stage, _check_refine

__all__ = [
    "ConvStack",
    "MLPStack",
    "available_for",
    "can_fuse",
    "extension_available",
    "fuse",
]

extension_available = _ext.extension_available


def available_for(device: torch.device | str | None = None) -> bool:
    """Can fused stages run on ``device`` (default CPU)? Loads the extension on first call."""
    status = _ext.load()
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":
        return status.cpu
    if dev.type == "cuda":
        return status.cuda
    return False


class _FusedStage(Stage):
    """What the fused stages share: input checks and the stage interface around the ops."""

    #: bytes held by the C++ side between forward and backward beyond ``save_for_backward``
    extra_saved_bytes: int = 0
    supports_refine = True

    def _check_params(self) -> None:
        """Parameter shapes are checked here, before any C++ op sees them."""
        for name, p in self.named_parameters():
            want = self._shapes.get(name)
            if want is not None and tuple(p.shape) != want:
                generic = name.replace("_", ".", 1) if "_" in name else name
                raise ValueError(
                    f"{type(self).__name__}: parameter {name} ({generic} of every block) has "
                    f"shape {tuple(p.shape)}, expected {want}; rebuild the stage or load a "
                    "state_dict of matching shapes"
                )

    def _check_input(self, x: Tensor, ndim: int | None, what: str) -> Tensor:
        self._check_params()
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor input, got {type(x).__name__}")
        ref = next(self.parameters())
        if ndim is not None and x.dim() != ndim:
            raise ValueError(
                f"{type(self).__name__} expects a {ndim}-D input {what}, got shape {tuple(x.shape)}"
            )
        if x.device != ref.device:
            raise ValueError(
                f"{type(self).__name__}: input is on {x.device} but the parameters are on "
                f"{ref.device}; move one of them (.to(device))"
            )
        if x.dtype != ref.dtype:
            raise TypeError(
                f"{type(self).__name__}: input dtype {x.dtype} differs from the parameters' "
                f"{ref.dtype}; cast one of them (.to(dtype))"
            )
        allowed = (torch.float32, torch.float64)
        if x.device.type == "cuda":
            allowed = allowed + (torch.bfloat16,)
        if x.dtype not in allowed:
            raise TypeError(
                f"{type(self).__name__} on {x.device.type} supports dtypes "
                f"{[str(d) for d in allowed]}, got {x.dtype}"
            )
        if not available_for(x.device):
            raise RuntimeError(
                f"{type(self).__name__}: the fused extension resode._C cannot run on "
                f"{x.device} ({_ext.load().reason}). {_ops.HOW_TO_FIX}"
            )
        return x.contiguous()

    def _check_args(self, args: tuple, method: str) -> None:
        if args:
            raise TypeError(
                f"{type(self).__name__}.{method}: the blocks of a fused stage take no extra "
                f"arguments, got {len(args)}; use a resode.ResidualStack for blocks with arguments"
            )

    def _slot(self, n: int) -> int:
        """Parameter slot of residual function ``n`` (0 for a tied stage)."""
        if not (isinstance(n, int) and 0 <= n < self.depth):
            raise IndexError(f"residual function index {n} out of range for depth {self.depth}")
        return 0 if self.tied else n

    def _stage_kwargs(self) -> dict:
        return dict(scheme=self.scheme.name, step=self.step, depth=self.depth)

    def _spec(self, backward: str, report: bool = True) -> _ops.BackwardSpec:
        """How the ops differentiate this stage with ``backward`` (reporting to
        ``last_backward`` unless ``report`` is false)."""
        return _ops.BackwardSpec(
            mode=backward,
            num_steps=self.num_steps,
            refine=self.refine,
            tol=self.tol,
            on_report=self._set_report if report else None,
            after_backward=self._paper_code_switch if backward == _ops.PAPER_CODE else None,
        )

    def _set_report(self, report) -> None:
        self.last_backward = report

    def _paper_code_switch(self) -> None:
        # the paper code's bug, reproduced on purpose (resode/_paper_adjoint.py)
        self.train(False)

    def block(self, n: int) -> nn.Module:
        """A copy of residual function ``f_n`` as the generic engine's ``nn.Sequential`` block
        (same values, device and dtype; a new module at every call, also for a tied stage)."""
        return self._make_block(self._slot(n))

    def to_generic(self) -> ResidualStack:
        """An equivalent :class:`resode.ResidualStack` of ``nn.Sequential`` blocks (copies of the
        values, BatchNorm running statistics included)."""
        blocks = [self.block(n) for n in range(1 if self.tied else self.depth)]
        stack = ResidualStack(blocks, self.depth, **self.stage_kwargs())
        return stack.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.backward == _ops.PAPER_CODE:
            return self._run_eagerly(x, self._spec(self.backward))
        if torch.compiler.is_compiling():
            self.last_backward = None  # a compiled backward cannot report (module docstring)
        return self._run(x, self._spec(self.backward))

    @torch.compiler.disable
    def _run_eagerly(self, x: Tensor, spec: _ops.BackwardSpec) -> Tensor:
        """The paper code's eval-mode switch is a side effect of the backward: never compiled
        (a graph break under ``torch.compile``)."""
        return self._run(x, spec)

    def integrate(
        self, x: Tensor, args: tuple[Tensor, ...] = (), seed: int | None = None
    ) -> Tensor:
        """The forward pass with exact gradients (``backward="autograd"``), whatever
        ``self.backward`` (``last_backward`` is left alone, as by the generic ``integrate``).
        ``args`` must be empty; ``seed`` is ignored (no random layers)."""
        self._check_args(tuple(args), "integrate")
        return self._run(x, self._spec("autograd", report=False))

    @torch.no_grad()
    def reverse(
        self, y: Tensor, *args: Tensor, seed: int | None = None, refine: int | None = None
    ) -> Tensor:
        """Run the scheme's reverse steps (``refine`` fixed-point iterations each; default: the
        stage's ``refine``) from the stage output ``y`` back to an estimate of the input (in
        C++). Training-mode BatchNorm uses batch statistics and its running statistics are left
        alone. ``args`` must be empty; ``seed`` is ignored."""
        self._check_args(args, "reverse")
        refine = self.refine if refine is None else _check_refine(refine)
        return self._reverse(y, refine)

    def _run(self, x: Tensor, spec: _ops.BackwardSpec) -> Tensor:
        raise NotImplementedError

    def _reverse(self, y: Tensor, refine: int) -> Tensor:
        raise NotImplementedError

    def _make_block(self, slot: int) -> nn.Module:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# MLP stage
class MLPStack(_FusedStage):
    """Fused residual stage of MLP blocks ``f_n(x) = W2_n act(W1_n x + b1_n) + b2_n``.

    Equivalent to ``ResidualStack.from_factory(lambda: mlp_block(dim, hidden, activation,
    bias), depth, tied=tied, scheme=..., backward=..., step=...)``
    (:func:`resode.models.blocks.mlp_block`), with the same initialisation law as ``nn.Linear``.

    Args:
        dim: feature size of the stage input ``(..., dim)``.
        hidden: hidden width of each block.
        depth: number of residual functions ``N``.
        activation: ``"tanh"``, ``"relu"`` or ``"gelu"`` (exact erf form).
        scheme, backward, step, refine, tol: as for :class:`resode.ResidualStack` (``"adjoint"``
            gradients are approximate: ``O(1/N^{refine+1})`` Euler, ``O(1/N^2)`` Heun with
            depth-smooth weights; ``"auto"`` falls back to exact ones when the drift exceeds
            ``tol``; see the module docstring for the costs).
        tied: one block used ``N`` times (gradients accumulated over the steps).
        bias: whether the linear layers have biases.

    Parameters (``P = 1`` if tied else ``N``): ``w1`` ``(P, hidden, dim)``, ``b1``
    ``(P, hidden)``, ``w2`` ``(P, dim, hidden)``, ``b2`` ``(P, dim)``; ``w1[n]`` is the weight of
    block ``n``'s first ``nn.Linear``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        depth: int,
        *,
        activation: str = "tanh",
        scheme: str = "euler",
        backward: str = "autograd",
        step: float | str | None = None,
        tied: bool = False,
        refine: int = 0,
        tol: float = DEFAULT_TOL,
        bias: bool = True,
    ) -> None:
        super().__init__(
            depth, scheme=scheme, backward=backward, step=step, tied=tied, refine=refine, tol=tol
        )
        make_activation(activation)  # validates the name
        for name, v in (("dim", dim), ("hidden", hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.dim, self.hidden, self.activation = dim, hidden, activation
        p = 1 if self.tied else depth
        self.w1 = nn.Parameter(torch.empty(p, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(p, dim, hidden))
        if bias:
            self.b1 = nn.Parameter(torch.empty(p, hidden))
            self.b2 = nn.Parameter(torch.empty(p, dim))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.reset_parameters()
        self._shapes = {n: tuple(q.shape) for n, q in self.named_parameters()}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        b_in, b_hid = 1 / math.sqrt(self.dim), 1 / math.sqrt(self.hidden)
        self.w1.uniform_(-b_in, b_in)
        self.w2.uniform_(-b_hid, b_hid)
        if self.b1 is not None:
            self.b1.uniform_(-b_in, b_in)
            self.b2.uniform_(-b_hid, b_hid)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, "
            f"tied={self.tied}, bias={self.b1 is not None}, " + super().extra_repr()
        )

    def _as_rows(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and (x.dim() < 1 or x.shape[-1] != self.dim):
            raise ValueError(
                f"MLPStack(dim={self.dim}) expects an input of shape (..., {self.dim}), got "
                f"{tuple(x.shape)}"
            )
        return self._check_input(x, None, f"(..., {self.dim})").reshape(-1, self.dim)

    def _params(self) -> tuple:
        return self.w1, self.b1, self.w2, self.b2

    def _run(self, x: Tensor, spec: _ops.BackwardSpec) -> Tensor:
        kw = dict(activation=self.activation, spec=spec, **self._stage_kwargs())
        return _ops.mlp_stage(self._as_rows(x), *self._params(), **kw).reshape(x.shape)

    def _reverse(self, y: Tensor, refine: int) -> Tensor:
        kw = dict(activation=self.activation, refine=refine, **self._stage_kwargs())
        return _ops.mlp_reverse(self._as_rows(y), *self._params(), **kw).reshape(y.shape)

    def _make_block(self, slot: int) -> nn.Sequential:
        bias = self.b1 is not None
        blk = mlp_block(self.dim, self.hidden, self.activation, bias=bias)
        with torch.no_grad():
            blk[0].weight.copy_(self.w1[slot])
            blk[2].weight.copy_(self.w2[slot])
            if bias:
                blk[0].bias.copy_(self.b1[slot])
                blk[2].bias.copy_(self.b2[slot])
        return blk.to(device=self.w1.device, dtype=self.w1.dtype)

    @classmethod
    def from_generic(cls, stack: ResidualStack) -> MLPStack:
        """Build the fused stage of a ``ResidualStack`` of Linear-act-Linear blocks (copies)."""
        info = _mlp_signature(stack)
        if info is None:
            raise TypeError(
                "from_generic needs a ResidualStack whose blocks are all "
                "nn.Sequential(nn.Linear(dim, hidden), Tanh|ReLU|GELU, nn.Linear(hidden, dim)) "
                "with the same shapes and bias setting"
            )
        dim, hidden, act, bias = info
        first = stack.blocks[0][0].weight
        kw = stack.stage_kwargs()
        out = cls(dim, hidden, stack.depth, activation=act, bias=bias, **kw)
        out = out.to(device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for i, blk in enumerate(stack.blocks):
                out.w1[i].copy_(blk[0].weight)
                out.w2[i].copy_(blk[2].weight)
                if bias:
                    out.b1[i].copy_(blk[0].bias)
                    out.b2[i].copy_(blk[2].bias)
        return out.train(stack.training)


def _mlp_signature(stack: nn.Module):
    if not isinstance(stack, ResidualStack):
        return None
    sig = None
    for blk in stack.blocks:
        if not (isinstance(blk, nn.Sequential) and len(blk) == 3):
            return None
        l1, act, l2 = blk
        if type(l1) is not nn.Linear or type(l2) is not nn.Linear:
            return None
        name = activation_name(act)
        bias = l1.bias is not None
        if name is None or (l2.bias is not None) != bias:
            return None
        if l2.in_features != l1.out_features or l2.out_features != l1.in_features:
            return None
        s = (l1.in_features, l1.out_features, name, bias)
        if sig is not None and s != sig:
            return None
        sig = s
    return sig


# ---------------------------------------------------------------------------------------------
# Conv stage
_CONV_PARAMS = (
    "conv1_weight", "conv1_bias", "bn1_weight", "bn1_bias",
    "conv2_weight", "conv2_bias", "bn2_weight", "bn2_bias",
)  # fmt: skip
_CONV_BUFFERS = ("bn1_running_mean", "bn1_running_var", "bn2_running_mean", "bn2_running_var")


class ConvStack(_FusedStage):
    """Fused residual stage of the tiny-ResNet block conv3x3-BN-ReLU-conv3x3-BN (paper, Figs 3c, 4).

    Equivalent to a :class:`resode.ResidualStack` of
    :func:`resode.models.blocks.conv_block` ``(channels, eps, momentum)`` blocks
    (:meth:`to_generic`); the last BN weight is zero at initialisation unless
    ``zero_init_last_bn=False``. ``scheme``, ``backward``, ``step``, ``tied``, ``refine`` and
    ``tol`` are those of :class:`resode.ResidualStack` (see the module docstring for what each
    backward mode costs here); training-mode BatchNorm recomputes with batch statistics in every
    backward (reverse steps, refinements, ``"auto"``'s fallback) and its running statistics are
    updated by the forward only.

    Parameters and buffers are stacked over blocks (``P = 1`` if tied else ``N``):
    ``conv{1,2}_weight`` ``(P, C, C, 3, 3)``, ``conv{1,2}_bias``, ``bn{1,2}_weight``,
    ``bn{1,2}_bias``, ``bn{1,2}_running_mean``, ``bn{1,2}_running_var`` ``(P, C)`` and
    ``bn{1,2}_num_batches_tracked`` ``(P,)``.
    """

    def __init__(
        self,
        channels: int,
        depth: int,
        *,
        scheme: str = "euler",
        backward: str = "autograd",
        step: float | str | None = None,
        tied: bool = False,
        refine: int = 0,
        tol: float = DEFAULT_TOL,
        eps: float = 1e-5,
        momentum: float = 0.1,
        zero_init_last_bn: bool = True,
    ) -> None:
        super().__init__(
            depth, scheme=scheme, backward=backward, step=step, tied=tied, refine=refine, tol=tol
        )
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.channels = channels
        self.eps, self.momentum = float(eps), float(momentum)
        self.zero_init_last_bn = zero_init_last_bn
        p, c = (1 if self.tied else depth), channels
        for name in _CONV_PARAMS:
            shape = (p, c, c, 3, 3) if name in ("conv1_weight", "conv2_weight") else (p, c)
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        for i in (1, 2):
            self.register_buffer(f"bn{i}_running_mean", torch.zeros(p, c))
            self.register_buffer(f"bn{i}_running_var", torch.ones(p, c))
            self.register_buffer(f"bn{i}_num_batches_tracked", torch.zeros(p, dtype=torch.long))
        self.reset_parameters()
        self._shapes = {n: tuple(q.shape) for n, q in self.named_parameters()}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Conv2d``, ``nn.BatchNorm2d`` defaults; last BN weight 0 if ``zero_init_last_bn``."""
        bound = 1 / math.sqrt(self.channels * 9)
        for name in ("conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias"):
            getattr(self, name).uniform_(-bound, bound)
        self.bn1_weight.fill_(1.0)
        self.bn1_bias.zero_()
        self.bn2_weight.fill_(0.0 if self.zero_init_last_bn else 1.0)
        self.bn2_bias.zero_()
        for i in (1, 2):
            getattr(self, f"bn{i}_running_mean").zero_()
            getattr(self, f"bn{i}_running_var").fill_(1.0)
            getattr(self, f"bn{i}_num_batches_tracked").zero_()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, tied={self.tied}, " + super().extra_repr()

    def _check_conv_input(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != self.channels:
            raise ValueError(
                f"ConvStack(channels={self.channels}) got an input with {x.shape[1]} channels "
                f"(shape {tuple(x.shape)})"
            )
        x = self._check_input(x, 4, f"(batch, {self.channels}, H, W)")
        params = [getattr(self, n) for n in _CONV_PARAMS]
        running = [getattr(self, n) for n in _CONV_BUFFERS]
        if running[0].dtype != x.dtype:
            raise TypeError(
                f"ConvStack: running statistics are {running[0].dtype}, input {x.dtype}"
            )
        return x, params, running

    def _run(self, x: Tensor, spec: _ops.BackwardSpec) -> Tensor:
        x, params, running = self._check_conv_input(x)
        y, new_running, counts = _ops.conv_stage(
            x,
            params,
            running,
            spec=spec,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            **self._stage_kwargs(),
        )
        if self.training:  # the op returns the updated statistics, stored here
            with torch.no_grad():
                for buffer, new in zip(running, new_running):
                    buffer.copy_(new)
                self.bn1_num_batches_tracked.add_(counts)
                self.bn2_num_batches_tracked.add_(counts)
        return y

    def _reverse(self, y: Tensor, refine: int) -> Tensor:
        y, params, running = self._check_conv_input(y)
        kw = dict(training=self.training, eps=self.eps, refine=refine, **self._stage_kwargs())
        return _ops.conv_reverse(y, params, running, **kw)

    def _make_block(self, slot: int) -> nn.Sequential:
        ref = self.conv1_weight
        blk = conv_block(self.channels, eps=self.eps, momentum=self.momentum)
        blk = blk.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for k, (conv, bn) in enumerate(((blk[0], blk[1]), (blk[3], blk[4])), start=1):
                conv.weight.copy_(getattr(self, f"conv{k}_weight")[slot])
                conv.bias.copy_(getattr(self, f"conv{k}_bias")[slot])
                bn.weight.copy_(getattr(self, f"bn{k}_weight")[slot])
                bn.bias.copy_(getattr(self, f"bn{k}_bias")[slot])
                bn.running_mean.copy_(getattr(self, f"bn{k}_running_mean")[slot])
                bn.running_var.copy_(getattr(self, f"bn{k}_running_var")[slot])
                bn.num_batches_tracked.copy_(getattr(self, f"bn{k}_num_batches_tracked")[slot])
        return blk

    @classmethod
    def from_generic(cls, stack: ResidualStack) -> ConvStack:
        """Build the fused stage of a ``ResidualStack`` of conv-BN-ReLU-conv-BN blocks (copies)."""
        info = _conv_signature(stack)
        if info is None:
            raise TypeError(
                "from_generic needs a ResidualStack whose blocks are all nn.Sequential(Conv2d(C, "
                "C, 3, padding=1), BatchNorm2d(C), ReLU(), Conv2d(C, C, 3, padding=1), "
                "BatchNorm2d(C)) with the same C, eps and momentum"
            )
        c, eps, momentum = info
        ref = stack.blocks[0][0].weight
        out = cls(c, stack.depth, eps=eps, momentum=momentum, **stack.stage_kwargs())
        out = out.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for i, blk in enumerate(stack.blocks):
                for k, (conv, bn) in enumerate(((blk[0], blk[1]), (blk[3], blk[4])), start=1):
                    getattr(out, f"conv{k}_weight")[i].copy_(conv.weight)
                    getattr(out, f"conv{k}_bias")[i].copy_(conv.bias)
                    getattr(out, f"bn{k}_weight")[i].copy_(bn.weight)
                    getattr(out, f"bn{k}_bias")[i].copy_(bn.bias)
                    getattr(out, f"bn{k}_running_mean")[i].copy_(bn.running_mean)
                    getattr(out, f"bn{k}_running_var")[i].copy_(bn.running_var)
                    getattr(out, f"bn{k}_num_batches_tracked")[i].copy_(bn.num_batches_tracked)
        return out.train(stack.training)


def _conv_ok(conv: nn.Module, c: int | None) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.in_channels == conv.out_channels
        and (c is None or conv.in_channels == c)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is not None
        and conv.padding_mode == "zeros"
    )


def _bn_ok(bn: nn.Module, c: int) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and bn.num_features == c
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
    )


def _conv_signature(stack: nn.Module):
    if not isinstance(stack, ResidualStack):
        return None
    sig = None
    for blk in stack.blocks:
        if not (isinstance(blk, nn.Sequential) and len(blk) == 5):
            return None
        c1, b1, r, c2, b2 = blk
        if not _conv_ok(c1, None):
            return None
        c = c1.in_channels
        if not (_conv_ok(c2, c) and _bn_ok(b1, c) and _bn_ok(b2, c) and type(r) is nn.ReLU):
            return None
        if (b1.eps, b1.momentum) != (b2.eps, b2.momentum):
            return None
        s = (c, b1.eps, b1.momentum)
        if sig is not None and s != sig:
            return None
        sig = s
    return sig


def can_fuse(stack: nn.Module) -> bool:
    """Does ``stack`` (a generic ``ResidualStack``) have a fused equivalent that the extension
    implements (its blocks, its backward mode)?"""
    if not isinstance(stack, ResidualStack) or stack.preserve_rng:
        return False
    if _mlp_signature(stack) is None and _conv_signature(stack) is None:
        return False
    return _ops.supports_mode(stack.backward)


def fuse(stack: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The fused equivalent of ``stack`` when one exists and the extension runs on ``device``
    (default: the stack's device); otherwise ``stack`` itself. Values are copied."""
    if not can_fuse(stack):
        return stack
    if device is None:
        device = next(stack.parameters()).device
    if not available_for(device):
        return stack
    if _mlp_signature(stack) is not None:
        return MLPStack.from_generic(stack)
    return ConvStack.from_generic(stack)
