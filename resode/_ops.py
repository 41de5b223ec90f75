"""The ops of ``resode._C``, one section per op: its Python wrapper, its fake (meta) kernel and
its autograd formula side by side (the layout of PyTorch's extension-cpp example, ``ops.py``).

The schemas are defined once in C++ (``csrc/ops.cpp``). The enum ids of the schemes, backward
modes and activations, the number of block evaluations per scheme and the layout of the stored
contexts come from the table the library exports (``resode::table()``, written from
``csrc/table.h``): nothing of it is repeated here. Loading the library (:mod:`resode._ext`)
and registering the fake kernels happen on first use (:func:`library`), never at import. The
autograd formulas are ``torch.autograd.Function`` s next to their ops (see the comment above
``_MLPStage`` for why not ``torch.library.register_autograd``). All schemas are functional, so
``torch.compile`` traces the stages (fake kernels for the shapes). docs/design.md, "The
extension".

Gradients: the exact mode (``"autograd"``) returns exact gradients; ``"adjoint"`` returns the
reconstruction adjoint's approximate ones (relative error ``O(1/N^{K+1})`` Euler with ``K =
refine``, ``O(1/N^2)`` or better Heun, with depth-smooth weights; Sander, Ablin & Peyre, NeurIPS
2022); ``"auto"`` returns the adjoint's when its drift is at most ``tol`` and exact ones
otherwise (recomputed in C++ from the stored input over ``ceil(sqrt(steps))`` segments). Every
backward hands a :class:`~resode._adjoint.BackwardReport` to the stage (``stage.last_backward``).
The stage input and the parameters are kept with ``save_for_backward``: changing one in place
before the backward raises autograd's error. The ops are differentiable once: a double backward
(``create_graph=True``) raises an error that names the way out (the generic engine).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import torch
from torch import Tensor

from . import _ext
from ._adjoint import DEFAULT_TOL, BackwardReport

__all__ = [
    "BackwardSpec",
    "OpTable",
    "conv_reverse",
    "conv_stage",
    "library",
    "ready",
    "mlp_reverse",
    "mlp_stage",
    "op_id",
    "supports_mode",
    "table",
]


# --------------------------------------------------------------------------------- the library
#: what to do when the extension is unavailable (every error message about it ends with this)
HOW_TO_FIX = (
    "Build it with `pip install --no-build-isolation -e .` (with a CUDA toolkit for the GPU "
    "kernels) and unset RESODE_DISABLE_EXTENSION if it is set, or run the generic engine: "
    "stage.to_generic() (a resode.ResidualStack, same numbers)."
)


@functools.cache
def library():
    """``torch.ops.resode`` with its fake kernels and autograd formulas registered (once).

    Raises a clear error when the extension is unavailable.
    """
    status = _ext.load()
    if not status.cpu:
        raise RuntimeError(
            f"resode fused stages need the compiled extension resode._C, which is unavailable "
            f"here ({status.reason}). {HOW_TO_FIX}"
        )
    _register()
    return torch.ops.resode


# torch.compile: dynamo calls these at trace time and takes their results as constants (it
# would otherwise trace into the loading and registration code).
@torch.compiler.assume_constant_result
def ready() -> bool:
    """Is the library loaded with its fake kernels and autograd formulas registered?"""
    try:
        library()
    except RuntimeError:
        return False
    return True


def _lib():
    """``torch.ops.resode`` (traceable by torch.compile); the clear error when unavailable."""
    if not ready():
        library()  # raises
    return torch.ops.resode


@dataclasses.dataclass(frozen=True)
class OpTable:
    """The op interface table of the loaded library (``resode::table()``, ``csrc/table.h``)."""

    raw: dict

    def entry(self, kind: str, name: str) -> dict:
        """The entry ``name`` of ``kind`` (``"schemes"``, ``"modes"``, ``"activations"``)."""
        for e in self.raw[kind]:
            if e["name"] == name:
                return e
        names = [e["name"] for e in self.raw[kind]]
        raise ValueError(f"the fused extension has no {kind[:-1]} {name!r}; it has {names}")

    def id(self, kind: str, name: str) -> int:
        return self.entry(kind, name)["id"]

    def by_id(self, kind: str, id_: int) -> dict:
        return next(e for e in self.raw[kind] if e["id"] == id_)

    def num_evals(self, scheme_id: int, depth: int) -> int:
        """Block evaluations of one forward pass."""
        s = self.by_id("schemes", scheme_id)
        return (depth - s["steps_offset"]) * s["evals_per_step"]

    def acc_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype of the per-channel statistics (store dtype ``"acc"``) for inputs of ``dtype``."""
        for name, acc in self.raw["acc_dtype"].items():
            if getattr(torch, name.lower()) == dtype:
                return getattr(torch, acc.lower())
        return torch.float32

    def fake_store(self, block: str, x: Tensor, evals: int, dims: dict, flags: dict) -> list:
        """Empty tensors shaped like the stored contexts of ``block`` (fake kernels)."""
        out = []
        for g in self.raw[block]["store"]:
            if g["only_if"] != "always" and not flags.get(g["only_if"], False):
                continue
            dtype = self.acc_dtype(x.dtype) if g["dtype"] == "acc" else x.dtype
            shape = tuple(dims[g["shape"]])
            if g["stacked"]:
                out.append(x.new_empty((evals, *shape), dtype=dtype))
            else:
                out += [x.new_empty(shape, dtype=dtype) for _ in range(evals)]
        return out


@functools.cache
def _table() -> OpTable:
    return OpTable(json.loads(library().table()))


def table() -> OpTable:
    """The op table of the loaded library (loads it on first use)."""
    return _table()


@torch.compiler.assume_constant_result  # (a constant for torch.compile, see ready())
def op_id(kind: str, name: str) -> int:
    """The id of ``name`` in the table's ``kind`` (``"schemes"``, ``"modes"``, ...)."""
    return _table().id(kind, name)


@torch.compiler.assume_constant_result
def mode_flag(mode_id: int, flag: str) -> bool:
    """A flag of backward mode ``mode_id`` (``"stores_contexts"``, ``"needs_output"``)."""
    return bool(_table().by_id("modes", mode_id)[flag])


#: the paper code's Euler adjoint (resode/_paper_adjoint.py): the op mode "adjoint" with
#: running statistics in the backward, then the stage is left in eval mode
PAPER_CODE = "adjoint_paper_code"


def op_mode(backward: str) -> str:
    """The op-level backward mode that runs the stage-level mode ``backward``."""
    return "adjoint" if backward == PAPER_CODE else backward


def supports_mode(backward: str) -> bool:
    """Does the extension (when it loads) implement backward mode ``backward``?"""
    if not _ext.load():
        return False
    return any(e["name"] == op_mode(backward) for e in table().raw["modes"])


@dataclasses.dataclass(frozen=True)
class BackwardSpec:
    """How a fused stage is differentiated and whom its backward reports to.

    Attributes:
        mode: the stage's backward mode (``"autograd"``, ``"adjoint"``, ``"auto"``,
            ``"adjoint_stored"``, ``"adjoint_paper_code"``).
        num_steps: steps of the stage (for the report).
        refine: fixed-point iterations per reverse step of the adjoint.
        tol: ``"auto"``'s drift tolerance.
        on_report: called with the :class:`~resode._adjoint.BackwardReport` of each backward.
        after_backward: called after each backward (the paper code's eval-mode switch).
    """

    mode: str = "autograd"
    num_steps: int = 0
    refine: int = 0
    tol: float = DEFAULT_TOL
    on_report: Callable[[BackwardReport], None] | None = None
    after_backward: Callable[[], None] | None = None

    def op_args(self) -> tuple[int, int, float]:
        """``(mode id, refine, tol)`` as the backward ops take them."""
        return op_id("modes", op_mode(self.mode)), self.refine, self.tol

    def finish(self, report: Tensor) -> None:
        """Publish the report of one backward (``report``: the op's ``[drift, max_step_error,
        fell_back]``) and run ``after_backward``. Not under ``torch.compile``: a compiled
        backward is a graph, which cannot call back into Python (the stage forgets its report
        instead, see ``resode.fused``)."""
        if torch.compiler.is_compiling():
            return
        if self.on_report is not None:
            self.on_report(self._report(report))
        if self.after_backward is not None:
            self.after_backward()

    def _report(self, report: Tensor) -> BackwardReport:
        if self.mode == "autograd":
            return BackwardReport("autograd", True, False, 0, self.num_steps, None, 0.0, 0.0)
        # "auto" synchronised with the device already (to read the drift): reading the flag
        # costs nothing more; the other modes never fall back
        fell_back = self.mode == "auto" and bool(report[2])
        return BackwardReport(
            mode=self.mode,
            exact=fell_back,
            fell_back=fell_back,
            refine=self.refine,
            num_steps=self.num_steps,
            tol=self.tol if self.mode == "auto" else None,
            drift_tensor=report[0],
            step_error_tensor=report[1],
        )


def refuse_double_backward() -> None:
    """Raise when a fused stage's backward is asked to build a graph (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "resode: a fused stage (resode.fused.MLPStack / ConvStack) cannot be differentiated "
            "twice (create_graph=True, double backward, Hessian-vector products): its backward "
            "is one C++ op, whatever its backward mode. Use the generic engine with "
            "backward='autograd' for this stage: stage.to_generic() (same numbers; "
            "engine='generic' in resode.models) and stage.backward = 'autograd'"
        )


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _none_grads(n: int) -> tuple:
    return (None,) * n


# ------------------------------------------------------------------ mlp_forward / mlp_backward
# The autograd formulas are autograd.Functions next to their ops, not
# torch.library.register_autograd: that one makes every stored context an output of the autograd
# node and flattens the list with pytree at every call (512 tensors for an Euler stage of depth
# 256), which cost 5-10 % of a narrow-MLP train step on CPU. Functions return only the stage
# output and keep the contexts with save_for_backward (diagnostics.saved_tensor_bytes sees them).
class _MLPStage(torch.autograd.Function):
    """``resode::mlp_forward`` differentiated by ``resode::mlp_backward`` (once)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, cfg, spec):  # cfg: act, scheme, h, depth
        mode, refine, tol = spec.op_args()
        y, saved = _lib().mlp_forward(x, w1, b1, w2, b2, *cfg, mode, True)
        ctx.cfg, ctx.spec, ctx.n_saved = cfg, spec, len(saved)
        keep_output = mode_flag(mode, "needs_output")
        # the input and the parameters too: changing one in place before the backward raises
        ctx.save_for_backward(y if keep_output else None, x, *saved, w1, b1, w2, b2)
        return y

    @staticmethod
    def backward(ctx, gy):
        refuse_double_backward()
        y, x, *rest = ctx.saved_tensors
        saved, (w1, b1, w2, b2) = rest[: ctx.n_saved], rest[ctx.n_saved :]
        out = y if y is not None else gy  # (unused by the exact backward)
        grads, report = _lib().mlp_backward(
            gy, out, x, saved, w1, b1, w2, b2, *ctx.cfg, *ctx.spec.op_args()
        )
        ctx.spec.finish(report)
        needed = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
        return (*needed, None, None)


def mlp_stage(x, w1, b1, w2, b2, *, activation, scheme, step, depth, spec) -> Tensor:
    """The MLP stage ``x (B, D) -> y (B, D)``, differentiable as ``spec`` (a
    :class:`BackwardSpec`) says.

    Parameters are stacked over blocks (``w1 (P, H, D)``, ``b1 (P, H)`` or ``None``, ...).
    """
    cfg = (op_id("activations", activation), op_id("schemes", scheme), float(step), depth)
    if _needs_grad(x, w1, b1, w2, b2):
        return _MLPStage.apply(x, w1, b1, w2, b2, cfg, spec)
    y, _ = _lib().mlp_forward(x, w1, b1, w2, b2, *cfg, spec.op_args()[0], False)
    return y


def _mlp_forward_fake(x, w1, b1, w2, b2, act, scheme, h, depth, mode, save):
    t = table()
    if not (save and mode_flag(mode, "stores_contexts")):
        return torch.empty_like(x), []
    dims = {"input": x.shape, "hidden": (x.shape[0], w1.shape[1])}
    flags = t.by_id("activations", act)
    return torch.empty_like(x), t.fake_store("mlp", x, t.num_evals(scheme, depth), dims, flags)


def _report_fake(grad: Tensor) -> Tensor:
    """The backward ops' report ``[drift, max_step_error, fell_back]`` (acc dtype)."""
    return grad.new_empty(3, dtype=table().acc_dtype(grad.dtype))


def _mlp_backward_fake(grad, out, x0, saved, w1, b1, w2, b2, act, scheme, h, depth, *mode_args):
    none = grad.new_empty(0)
    gb1 = torch.empty_like(b1) if b1 is not None else none
    gb2 = torch.empty_like(b2) if b2 is not None else none
    grads = [torch.empty_like(grad), torch.empty_like(w1), gb1, torch.empty_like(w2), gb2]
    return grads, _report_fake(grad)


def mlp_reverse(y, w1, b1, w2, b2, *, activation, scheme, step, depth, refine=0) -> Tensor:
    """The scheme's reverse steps (``refine`` fixed-point iterations each) from the MLP stage
    output ``y`` (no autograd)."""
    act = op_id("activations", activation)
    scheme_id = op_id("schemes", scheme)
    return _lib().mlp_reverse(y, w1, b1, w2, b2, act, scheme_id, step, depth, refine)


def _mlp_reverse_fake(y, w1, b1, w2, b2, act, scheme, h, depth, refine):
    return torch.empty_like(y)


# ---------------------------------------------------------------- conv_forward / conv_backward
class _ConvStage(torch.autograd.Function):
    """``resode::conv_forward`` differentiated by ``resode::conv_backward`` (once). Returns the
    output, the running-statistic update counts and the updated running statistics."""

    @staticmethod
    def forward(ctx, x, cfg, spec, n_params, *tensors):  # cfg: scheme, h, depth, train, mom, eps
        params, running = list(tensors[:n_params]), list(tensors[n_params:])
        scheme, h, depth, training, momentum, eps = cfg
        mode = spec.op_args()[0]
        y, saved, new_running, counts = _lib().conv_forward(
            x, params, running, scheme, h, depth, training, training, momentum, eps, mode, True
        )
        ctx.mark_non_differentiable(counts, *new_running)
        # the paper code's adjoint recomputes with the running statistics (eval mode)
        ctx.cfg = (scheme, h, depth, training and spec.mode != PAPER_CODE, eps)
        ctx.spec, ctx.n_saved = spec, len(saved)
        # The running statistics are read by the backward in eval mode only, where nothing
        # changes them; they are buffers, not activations, and in training mode the caller
        # overwrites them with the new values: kept on ctx, not with save_for_backward.
        ctx.running = running
        keep_output = mode_flag(mode, "needs_output")
        # the input and the parameters too: changing one in place before the backward raises
        ctx.save_for_backward(y if keep_output else None, x, *saved, *params)
        return (y, counts, *new_running)

    @staticmethod
    def backward(ctx, gy, *_):
        refuse_double_backward()
        y, x, *rest = ctx.saved_tensors
        saved, params = rest[: ctx.n_saved], rest[ctx.n_saved :]
        out = y if y is not None else gy  # (unused by the exact backward)
        grads, report = _lib().conv_backward(
            gy, out, x, saved, params, ctx.running, *ctx.cfg, *ctx.spec.op_args()
        )
        ctx.spec.finish(report)
        gx = grads[0] if ctx.needs_input_grad[0] else None
        needs = ctx.needs_input_grad[4 : 4 + len(params)]
        gp = [g if need else None for g, need in zip(grads[1:], needs)]
        return (gx, None, None, None, *gp, *_none_grads(len(ctx.running)))


def conv_stage(x, params, running, *, scheme, step, depth, spec, training, momentum, eps):
    """The conv stage ``x (B, C, H, W) -> y``, differentiable as ``spec`` (a
    :class:`BackwardSpec`) says.

    Returns ``y``, the updated running statistics (new tensors, in the order of ``running``;
    an empty list unless ``training``: the op does not modify ``running``, the caller stores
    them) and the number of running-statistic updates per parameter slot (to add to
    ``num_batches_tracked``).
    """
    cfg = (op_id("schemes", scheme), float(step), depth, training, momentum, eps)
    if _needs_grad(x, *params):
        y, counts, *new_running = _ConvStage.apply(x, cfg, spec, len(params), *params, *running)
        return y, new_running, counts
    y, _, new_running, counts = _lib().conv_forward(
        x, params, running, *cfg[:4], training, *cfg[4:], spec.op_args()[0], False
    )
    return y, new_running, counts


def _conv_forward_fake(x, params, running, scheme, h, depth, train, update, mom, eps, mode, save):
    t = table()
    counts = x.new_empty(params[0].shape[0], dtype=torch.long)
    new_running = [torch.empty_like(r) for r in running] if train and update else []
    if not (save and mode_flag(mode, "stores_contexts")):
        return torch.empty_like(x), [], new_running, counts
    dims = {"input": x.shape, "channels": (x.shape[1],)}
    saved = t.fake_store("conv", x, t.num_evals(scheme, depth), dims, {})
    return torch.empty_like(x), saved, new_running, counts


def _conv_backward_fake(grad, out, x0, saved, params, running, scheme, h, depth, *rest):
    grads = [torch.empty_like(grad)] + [torch.empty_like(p) for p in params]
    return grads, _report_fake(grad)


def conv_reverse(y, params, running, *, scheme, step, depth, training, eps, refine=0) -> Tensor:
    """The scheme's reverse steps (``refine`` fixed-point iterations each) from the conv stage
    output ``y`` (running stats untouched)."""
    scheme_id = op_id("schemes", scheme)
    return _lib().conv_reverse(y, params, running, scheme_id, step, depth, training, eps, refine)


def _conv_reverse_fake(y, params, running, scheme, h, depth, training, eps, refine):
    return torch.empty_like(y)


# -------------------------------------------------------------------------------- registration
_FAKES = {
    "mlp_forward": _mlp_forward_fake,
    "mlp_backward": _mlp_backward_fake,
    "mlp_reverse": _mlp_reverse_fake,
    "conv_forward": _conv_forward_fake,
    "conv_backward": _conv_backward_fake,
    "conv_reverse": _conv_reverse_fake,
}


def _register() -> None:
    """Fake kernels of the ops (called once, by :func:`library`)."""
    for name, fake in _FAKES.items():
        try:
            torch.library.register_fake(f"resode::{name}")(fake)
        except RuntimeError:  # already registered (e.g. this module reloaded)
            pass
