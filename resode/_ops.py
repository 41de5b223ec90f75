"""The ops of ``resode._C``, one section per op: its Python wrapper, its fake (meta) kernel and
its autograd formula side by side (the layout of PyTorch's extension-cpp example, ``ops.py``).

The schemas are defined once in C++ (``csrc/ops.cpp``). The enum ids of the schemes, backward
modes and activations, the number of block evaluations per scheme and the layout of the stored
contexts come from the table the library exports (``resode::table()``, written from
``csrc/table.h``): nothing of it is repeated here. Loading the library (:mod:`resode._ext`)
and registering the fake kernels and autograd formulas happen on first use
(:func:`library`), never at import. docs/design.md, "The extension".

Gradients: the exact mode (``"autograd"``) returns exact gradients; ``"adjoint"`` returns the
reconstruction adjoint's approximate ones (relative error ``O(1/N)`` Euler, ``O(1/N^2)`` Heun
with depth-smooth weights; Sander, Ablin & Peyre, NeurIPS 2022). The ops are differentiable
once (``once_differentiable``): a double backward raises.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext

__all__ = [
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


def supports_mode(backward: str) -> bool:
    """Does the extension (when it loads) implement backward mode ``backward``?"""
    if not _ext.load():
        return False
    return any(e["name"] == backward for e in table().raw["modes"])


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _ids(scheme: str, backward: str) -> tuple[int, int]:
    return op_id("schemes", scheme), op_id("modes", backward)


def _none_grads(n: int) -> tuple:
    return (None,) * n


# ------------------------------------------------------------------ mlp_forward / mlp_backward
def mlp_stage(x, w1, b1, w2, b2, *, activation, scheme, step, depth, backward) -> Tensor:
    """The MLP stage ``x (B, D) -> y (B, D)``, differentiable with ``backward``'s gradients.

    Parameters are stacked over blocks (``w1 (P, H, D)``, ``b1 (P, H)`` or ``None``, ...).
    """
    scheme_id, mode = _ids(scheme, backward)
    act = op_id("activations", activation)
    save = _needs_grad(x, w1, b1, w2, b2)
    y, _ = _lib().mlp_forward(x, w1, b1, w2, b2, act, scheme_id, step, depth, mode, save)
    return y


def _mlp_forward_fake(x, w1, b1, w2, b2, act, scheme, h, depth, mode, save):
    t = table()
    if not (save and t.by_id("modes", mode)["stores_contexts"]):
        return torch.empty_like(x), []
    dims = {"input": x.shape, "hidden": (x.shape[0], w1.shape[1])}
    flags = t.by_id("activations", act)
    return torch.empty_like(x), t.fake_store("mlp", x, t.num_evals(scheme, depth), dims, flags)


def _mlp_backward_fake(grad, out, saved, w1, b1, w2, b2, act, scheme, h, depth, mode):
    none = grad.new_empty(0)
    gb1 = torch.empty_like(b1) if b1 is not None else none
    gb2 = torch.empty_like(b2) if b2 is not None else none
    return [torch.empty_like(grad), torch.empty_like(w1), gb1, torch.empty_like(w2), gb2]


def _mlp_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, act, scheme, h, depth, mode, save = inputs
    y, saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero gradients for the stored contexts
    ctx.cfg = (act, scheme, h, depth, mode)
    ctx.n_saved = len(saved)
    keep_output = table().by_id("modes", mode)["needs_output"]
    # the parameters too: changing one in place before the backward then raises
    ctx.save_for_backward(y if keep_output else None, *saved, w1, b1, w2, b2)


@once_differentiable
def _mlp_grads(ctx, gy):
    act, scheme, h, depth, mode = ctx.cfg
    y, *rest = ctx.saved_tensors
    saved, (w1, b1, w2, b2) = rest[: ctx.n_saved], rest[ctx.n_saved :]
    out = y if y is not None else gy  # (unused by the exact backward)
    grads = library().mlp_backward(gy, out, saved, w1, b1, w2, b2, act, scheme, h, depth, mode)
    return tuple(grads)


def _mlp_backward(ctx, gy, _saved_grads):
    if gy is None:
        return _none_grads(11)
    grads = _mlp_grads(ctx, gy)  # gx, gw1, gb1, gw2, gb2
    needed = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
    return (*needed, *_none_grads(6))


def mlp_reverse(y, w1, b1, w2, b2, *, activation, scheme, step, depth) -> Tensor:
    """The scheme's reverse steps from the MLP stage output ``y`` (no autograd)."""
    act = op_id("activations", activation)
    scheme_id = op_id("schemes", scheme)
    return _lib().mlp_reverse(y, w1, b1, w2, b2, act, scheme_id, step, depth)


def _mlp_reverse_fake(y, w1, b1, w2, b2, act, scheme, h, depth):
    return torch.empty_like(y)


# ---------------------------------------------------------------- conv_forward / conv_backward
def conv_stage(x, params, running, *, scheme, step, depth, backward, training, momentum, eps):
    """The conv stage ``x (B, C, H, W) -> y``, differentiable with ``backward``'s gradients.

    Returns ``y``, the updated running statistics (new tensors, in the order of ``running``;
    an empty list unless ``training``: the op does not modify ``running``, the caller stores
    them) and the number of running-statistic updates per parameter slot (to add to
    ``num_batches_tracked``).
    """
    scheme_id, mode = _ids(scheme, backward)
    save = _needs_grad(x, *params)
    y, _, new_running, counts = _lib().conv_forward(
        x, params, running, scheme_id, step, depth, training, training, momentum, eps, mode, save
    )
    return y, new_running, counts


def _conv_forward_fake(x, params, running, scheme, h, depth, train, update, mom, eps, mode, save):
    t = table()
    counts = x.new_empty(params[0].shape[0], dtype=torch.long)
    new_running = [torch.empty_like(r) for r in running] if train and update else []
    if not (save and t.by_id("modes", mode)["stores_contexts"]):
        return torch.empty_like(x), [], new_running, counts
    dims = {"input": x.shape, "channels": (x.shape[1],)}
    saved = t.fake_store("conv", x, t.num_evals(scheme, depth), dims, {})
    return torch.empty_like(x), saved, new_running, counts


def _conv_setup_context(ctx, inputs, output):
    x, params, running, scheme, h, depth, training, update, momentum, eps, mode, save = inputs
    y, saved, new_running, counts = output
    ctx.mark_non_differentiable(*saved, *new_running, counts)
    ctx.set_materialize_grads(False)
    ctx.cfg = (scheme, h, depth, training, eps, mode)
    ctx.n_saved = len(saved)
    # The running statistics are read by the backward in eval mode only, where nothing changes
    # them; they are buffers, not activations, and in training mode the caller overwrites them
    # with the new values: kept on ctx, not with save_for_backward.
    ctx.running = running
    keep_output = table().by_id("modes", mode)["needs_output"]
    ctx.save_for_backward(y if keep_output else None, *saved, *params)


@once_differentiable
def _conv_grads(ctx, gy):
    scheme, h, depth, training, eps, mode = ctx.cfg
    y, *rest = ctx.saved_tensors
    saved, params = rest[: ctx.n_saved], rest[ctx.n_saved :]
    out = y if y is not None else gy  # (unused by the exact backward)
    grads = library().conv_backward(
        gy, out, saved, params, ctx.running, scheme, h, depth, training, eps, mode
    )
    return tuple(grads)


def _conv_backward(ctx, gy, _saved_grads, _running_grads, _counts_grad):
    needs_x, needs_params, needs_running = ctx.needs_input_grad[:3]
    grads = _conv_grads(ctx, gy) if gy is not None else _none_grads(1 + len(needs_params))
    gx = grads[0] if needs_x else None
    gp = [g if need else None for g, need in zip(grads[1:], needs_params)]
    return (gx, gp, [None] * len(needs_running), *_none_grads(9))


def _conv_backward_fake(grad, out, saved, params, running, scheme, h, depth, training, eps, mode):
    return [torch.empty_like(grad)] + [torch.empty_like(p) for p in params]


def conv_reverse(y, params, running, *, scheme, step, depth, training, eps) -> Tensor:
    """The scheme's reverse steps from the conv stage output ``y`` (running stats untouched)."""
    scheme_id = op_id("schemes", scheme)
    return _lib().conv_reverse(y, params, running, scheme_id, step, depth, training, eps)


def _conv_reverse_fake(y, params, running, scheme, h, depth, training, eps):
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
    """Fake kernels and autograd formulas of the ops (called once, by :func:`library`)."""
    for name, fake in _FAKES.items():
        try:
            torch.library.register_fake(f"resode::{name}")(fake)
        except RuntimeError:  # already registered (e.g. this module reloaded)
            pass
    torch.library.register_autograd(
        "resode::mlp_forward", _mlp_backward, setup_context=_mlp_setup_context
    )
    torch.library.register_autograd(
        "resode::conv_forward", _conv_backward, setup_context=_conv_setup_context
    )
