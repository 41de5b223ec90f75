"""Does a residual network behave like an ODE? Measurements on stages and models.

* :func:`reconstruction_error` -- how well the reverse steps rebuild a stage's input.
* :func:`gradient_error` -- adjoint gradients against exact ones, per parameter tensor, with the
  metric of Sander, Ablin & Peyre (NeurIPS 2022, Fig. 4).
* :func:`depth_smoothness` -- how smooth the weights are in depth (Fig. 2).
* :func:`saved_tensor_bytes` -- activation memory: the bytes autograd keeps for the backward.

The paper code's variant of the adjoint (``backward="adjoint_stored"``: each ``x_n`` rebuilt from
the stored ``x_{n+1}``), which :func:`gradient_error` compares with, is implemented next to this
module in ``resode/_stored_adjoint.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _stored_adjoint
from ._recompute import frozen_batchnorm_stats
from .stack import ResidualStack, Stage, backward_mode

#: the values of ``gradient_error``'s ``variant``
GRADIENT_ERROR_VARIANTS = ("adjoint", _stored_adjoint.MODE)


def _as_generic(stack: Stage) -> ResidualStack:
    if isinstance(stack, ResidualStack):
        return stack
    to_generic = getattr(stack, "to_generic", None)
    if to_generic is None:
        raise TypeError(f"{type(stack).__name__} is not a ResidualStack and has no to_generic()")
    return to_generic()


def saved_tensor_bytes(fn: Callable[..., Any], *inputs: Any, exclude: Iterable[Tensor] = ()) -> int:
    """Bytes that autograd saves for the backward while ``fn(*inputs)`` runs.

    Counted with :func:`torch.autograd.graph.saved_tensors_hooks` over unique storages, so a
    tensor saved by several nodes counts once. Storages of the tensors in ``exclude`` (typically
    the model's parameters, which exist whatever the backward) are not counted. Custom autograd
    Functions of resode save everything through ``ctx.save_for_backward``, so they are counted.
    The output of ``fn`` is kept alive until the count is taken.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    keep = []

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in excluded and ptr != 0:
                storages[ptr] = max(storages.get(ptr, 0), s.nbytes())
                keep.append(s)  # no reuse of the address while we count
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    total = sum(storages.values())
    keep.clear()
    del out
    return total


@torch.no_grad()
def reconstruction_error(stack: Stage, x: Tensor, *args: Tensor) -> float:
    """``||x - reverse(forward(x))|| / ||x||`` for one stage.

    The forward and the reverse both run without changing BatchNorm running statistics
    (training-mode BatchNorm uses batch statistics). Random layers use the same numbers in both
    directions when the stage preserves its RNG streams.
    """
    g = _as_generic(stack)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if g.preserve_rng and g.training else None
    with frozen_batchnorm_stats([g]):
        y = g.integrate(x, tuple(args), seed)
    x_rec = g.reverse(y, *args, seed=seed)
    return float((x - x_rec).norm() / x.norm().clamp_min(torch.finfo(x.dtype).tiny))


def gradient_error(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    variant: str = "adjoint",
) -> dict[str, Any]:
    """Adjoint gradients against exact (autograd) gradients of ``loss_fn(model(inputs), targets)``.

    Args:
        model: any module holding :class:`~resode.stack.Stage` s.
        inputs: the batch (a tensor or a tuple of positional inputs).
        targets: targets for ``loss_fn``.
        loss_fn: loss ``(output, targets) -> scalar``.
        variant: ``"adjoint"`` (the true memory-free adjoint: reconstructions chained from the
            stage output) or ``"adjoint_stored"`` (each ``x_n`` rebuilt from the *stored*
            ``x_{n+1}``, as the paper's public code did; not memory-free, hides the accumulation
            of reconstruction error).

    Returns:
        ``{"per_tensor": {name: mean((g_bp - g_adj)^2) / mean(g_bp^2)}, "global_rel":
        ||g_bp - g_adj|| / ||g_bp|| over all parameters, "loss": exact loss}``. Model state
        (parameters' ``.grad``, BatchNorm buffers, RNG) is left as it was.
    """
    if variant not in GRADIENT_ERROR_VARIANTS:
        raise ValueError(f"variant must be 'adjoint' or 'adjoint_stored', got {variant!r}")
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires grad")
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def grads(mode: str) -> tuple[list[Tensor], float]:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with backward_mode(model, mode):
            loss = loss_fn(model(*inputs), targets)
            gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        zeros = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, gs)]
        return zeros, float(loss.detach())

    try:
        g_bp, loss = grads("autograd")
        g_adj, _ = grads(variant)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    per_tensor = {}
    num = den = 0.0
    for (name, _), a, b in zip(named, g_bp, g_adj):
        a64, b64 = a.double(), b.double()
        d2 = float(((a64 - b64) ** 2).sum())
        n2 = float((a64**2).sum())
        num += d2
        den += n2
        per_tensor[name] = d2 / n2 if n2 > 0 else (0.0 if d2 == 0 else math.inf)
    return {
        "per_tensor": per_tensor,
        "global_rel": math.sqrt(num / den) if den > 0 else math.nan,
        "loss": loss,
    }


def depth_smoothness(stack: Stage) -> dict[str, float]:
    """How much the weights move from one residual function to the next.

    With ``theta_n`` the flattened parameters of ``f_n``: ``d_n = ||theta_{n+1} - theta_n||``
    for ``n = 0..N-2``. Returns ``max`` and ``mean`` of ``d_n`` and the same times ``N``
    (``max_scaled``, ``mean_scaled``): weights that follow a smooth curve ``theta(t)`` in depth
    have ``d_n ~ 1/N``, so the scaled values stay bounded as ``N`` grows (paper, Fig. 2).
    Tied stages give zeros.
    """
    g = _as_generic(stack)
    n = g.depth
    if g.tied or n < 2:
        return {"max": 0.0, "mean": 0.0, "max_scaled": 0.0, "mean_scaled": 0.0, "depth": n}
    with torch.no_grad():
        thetas = [
            torch.cat([p.detach().reshape(-1).double() for p in g.block(i).parameters()])
            for i in range(n)
        ]
        diffs = torch.stack([(thetas[i + 1] - thetas[i]).norm() for i in range(n - 1)])
    mx, mean = float(diffs.max()), float(diffs.mean())
    return {"max": mx, "mean": mean, "max_scaled": mx * n, "mean_scaled": mean * n, "depth": n}
