"""Does a residual network behave like an ODE? Measurements on stages and models.

* :func:`reconstruction_error` -- how well the reverse steps rebuild a stage's input.
* :func:`gradient_error` -- adjoint gradients against exact ones, per parameter tensor, with the
  metric of Sander, Ablin & Peyre (NeurIPS 2022, Fig. 4).
* :func:`depth_smoothness` -- how smooth the weights are in depth (Fig. 2).
* :func:`saved_tensor_bytes` -- activation memory: the bytes autograd keeps for the backward.
* :func:`worst_drift` -- the largest drift reported by the stages' last backward
  (:class:`~resode.stack.BackwardReport`), for training logs.
* :func:`check` -- is the memory-free backward safe for *this* network? Stage by stage (the
  ``resode check`` command, :mod:`resode.check`).

The paper code's variant of the adjoint (``backward="adjoint_stored"``: each ``x_n`` rebuilt from
the stored ``x_{n+1}``), which :func:`gradient_error` compares with, is implemented next to this
module in ``resode/_stored_adjoint.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _auto, _paper_adjoint, _stored_adjoint
from ._recompute import frozen_batchnorm_stats
from .stack import ResidualStack, Stage, backward_reports, stages

#: the values of ``gradient_error``'s ``variant``
GRADIENT_ERROR_VARIANTS = ("adjoint", _stored_adjoint.MODE, _paper_adjoint.MODE, _auto.MODE)


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
def reconstruction_error(
    stack: Stage, x: Tensor, *args: Tensor, refine: int | None = None
) -> float:
    """``||x - reverse(forward(x))|| / ||x||`` for one stage.

    ``refine``: fixed-point iterations per reverse step (default: the stage's ``refine``). The
    forward and the reverse both run without changing BatchNorm running statistics
    (training-mode BatchNorm uses batch statistics). Random layers use the same numbers in both
    directions when the stage preserves its RNG streams.
    """
    g = _as_generic(stack)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if g.preserve_rng and g.training else None
    with frozen_batchnorm_stats([g]):
        y = g.integrate(x, tuple(args), seed)
    x_rec = g.reverse(y, *args, seed=seed, refine=refine)
    return float((x - x_rec).norm() / x.norm().clamp_min(torch.finfo(x.dtype).tiny))


# ----------------------------------------------------------------------------- gradients
def _is_bias(name: str) -> bool:
    """The paper's rule (``"bias" in name``, ``compare_gradients.py``) on the last component of
    a parameter name, plus the fused MLP stage's ``b1``/``b2``."""
    leaf = name.rsplit(".", 1)[-1]
    return "bias" in leaf or leaf in ("b1", "b2")


class _ModelState:
    """Everything a gradient measurement may change in a model, kept to be restored: buffers
    (BatchNorm statistics), training flags (``"adjoint_paper_code"`` flips them), the stages'
    backward mode, refine and last report, and the RNG streams (dropout replays the same masks in
    every pass)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.training = {m: m.training for m in model.modules()}
        self.stages = {s: (s.backward, s.refine, s.last_backward) for s in stages(model)}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self, stage_settings: bool = False) -> None:
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self.buffers[n])
        for m, t in self.training.items():
            m.training = t
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if stage_settings:
            for s, (mode, refine, report) in self.stages.items():
                s.backward, s.refine, s.last_backward = mode, refine, report


def _model_grads(
    state: _ModelState,
    inputs: tuple[Tensor, ...],
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: list[Tensor],
    setting: Callable[[Stage], tuple[str, int]],
) -> tuple[list[Tensor], float]:
    """Gradients of the loss w.r.t. ``params`` with each stage's ``(backward, refine)`` given by
    ``setting``, from the saved model state (restored before and after)."""
    state.restore()
    for s in state.stages:
        s.backward, s.refine = setting(s)
    loss = loss_fn(state.model(*inputs), targets)
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    state.restore()
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    return grads, float(loss.detach())


def _flat_rel(a: list[Tensor], b: list[Tensor]) -> float:
    """``||a - b|| / ||a||`` over lists of tensors, in float64."""
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((x.double() ** 2).sum()) for x in a)
    return math.sqrt(num / den) if den > 0 else math.nan


def _per_tensor(
    names: list[str],
    exact: list[Tensor],
    approx: list[Tensor],
    include_bias: bool,
    zero_tol: float | None,
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """The paper's per-tensor metric, the tensors with a zero exact gradient, the biases left
    out (see :func:`gradient_error`)."""
    if zero_tol is None:
        zero_tol = 1e3 * torch.finfo(exact[0].dtype).eps
    total = math.sqrt(sum(float((a.double() ** 2).sum()) for a in exact))
    per_tensor, zero, excluded = {}, {}, []
    for name, a, b in zip(names, exact, approx):
        if not include_bias and _is_bias(name):
            excluded.append(name)
            continue
        a64, b64 = a.double(), b.double()
        d2 = float(((a64 - b64) ** 2).mean())
        if float(a64.norm()) <= zero_tol * total:
            zero[name] = d2
        else:
            per_tensor[name] = d2 / float((a64**2).mean())
    return per_tensor, zero, excluded


def gradient_error(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    variant: str = "adjoint",
    *,
    include_bias: bool = False,
    zero_tol: float | None = None,
) -> dict[str, Any]:
    """Adjoint gradients against exact (autograd) gradients of ``loss_fn(model(inputs), targets)``.

    Args:
        model: any module holding :class:`~resode.stack.Stage` s.
        inputs: the batch (a tensor or a tuple of positional inputs).
        targets: targets for ``loss_fn``.
        loss_fn: loss ``(output, targets) -> scalar``.
        variant: the backward mode compared with autograd: ``"adjoint"`` (the true memory-free
            adjoint: reconstructions chained from the stage output, with each stage's
            ``refine``), ``"adjoint_stored"`` (each ``x_n`` rebuilt from the *stored*
            ``x_{n+1}``, as the paper's public code measured it; not memory-free, hides the
            accumulation of reconstruction error), ``"adjoint_paper_code"`` or ``"auto"``.
        include_bias: also give bias tensors a per-tensor error. By default they are left out
            of ``per_tensor``, as in the paper's ``compare_gradients.py`` (a parameter whose
            name's last component contains ``"bias"``, or the fused MLP stage's ``b1``/``b2``).
        zero_tol: a tensor whose exact gradient has norm ``<= zero_tol`` times the norm of all
            exact gradients counts as having a zero gradient (default ``1e3 * eps`` of the
            gradients' dtype). Such tensors (e.g. the bias of a convolution followed by a
            training-mode BatchNorm: its exact gradient is zero and its computed one is
            rounding noise) get no relative error, which would be a ratio of noises.

    Returns:
        ``{"per_tensor": {name: mean((g_bp - g_adj)^2) / mean(g_bp^2)}`` (the paper's squared
        relative error, Fig. 4; biases and zero-gradient tensors left out), ``"zero_grad":
        {name: mean((g_bp - g_adj)^2)}`` (the absolute error of the tensors whose exact gradient
        is zero), ``"excluded": [bias names left out]``, ``"global_rel": ||g_bp - g_adj|| /
        ||g_bp||`` over all parameters (biases included), ``"loss"``: the exact loss}. Model
        state (parameters' ``.grad``, BatchNorm buffers, training flags, backward modes, RNG) is
        left as it was.
    """
    if variant not in GRADIENT_ERROR_VARIANTS:
        raise ValueError(f"variant must be one of {list(GRADIENT_ERROR_VARIANTS)}, got {variant!r}")
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires grad")
    names, params = [n for n, _ in named], [p for _, p in named]
    state = _ModelState(model)
    try:
        g_bp, loss = _model_grads(
            state, inputs, targets, loss_fn, params, lambda s: ("autograd", s.refine)
        )
        g_adj, _ = _model_grads(
            state, inputs, targets, loss_fn, params, lambda s: (variant, s.refine)
        )
    finally:
        state.restore(stage_settings=True)
    per_tensor, zero, excluded = _per_tensor(names, g_bp, g_adj, include_bias, zero_tol)
    return {
        "per_tensor": per_tensor,
        "zero_grad": zero,
        "excluded": excluded,
        "global_rel": _flat_rel(g_bp, g_adj),
        "loss": loss,
    }


def worst_drift(model: nn.Module) -> float | None:
    """The largest ``drift`` among the last backward reports of ``model``'s stages
    (:func:`resode.backward_reports`), or ``None`` when no stage has run a backward yet.

    Reading it synchronises with the device once per stage; a training loop can call it after
    each backward and keep the maximum over an epoch. NaN (a reconstruction that diverged) wins.
    """
    drifts = [r.drift for r in backward_reports(model).values()]
    if not drifts:
        return None
    return math.nan if any(math.isnan(d) for d in drifts) else max(drifts)


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


# ----------------------------------------------------------------------------- check
#: refine values :func:`check` measures by default
CHECK_REFINES = (0, 1, 2)
#: :func:`check`'s default target for the adjoint's relative gradient error
CHECK_TARGET = 0.05


@dataclasses.dataclass
class StageCheck:
    """One stage's row of :func:`check` (values per ``refine`` are keyed by ``K``).

    Attributes:
        name, engine, depth, scheme, step, num_steps, tied: what the stage is (``engine`` is
            the stage's class; fused stages are measured through their generic twin).
        reconstruction_error: ``||x - reverse(forward(x))|| / ||x||`` at the stage's input.
        drift, max_step_error: the :class:`~resode.stack.BackwardReport` of an adjoint backward.
        gradient_error: ``||g_bp - g_adj|| / ||g_bp||`` over all the model's parameters when only
            this stage uses the adjoint (refine ``K``).
        saved_bytes_autograd, saved_bytes_adjoint: activation memory of the stage (bytes saved
            for its backward, parameters excluded).
        recommended_backward, recommended_refine, reason: :func:`recommend`'s answer.
    """

    name: str
    engine: str
    depth: int
    scheme: str
    step: float
    num_steps: int
    tied: bool
    reconstruction_error: dict[int, float]
    drift: dict[int, float]
    max_step_error: dict[int, float]
    gradient_error: dict[int, float]
    saved_bytes_autograd: int
    saved_bytes_adjoint: int
    recommended_backward: str = ""
    recommended_refine: int = 0
    reason: str = ""


@dataclasses.dataclass
class CheckReport:
    """What :func:`check` measured: one :class:`StageCheck` per stage, and the whole model.

    Attributes:
        stages: per stage, in forward order.
        gradient_error: relative gradient error with *every* stage on the adjoint, per refine.
        saved_bytes_autograd, saved_bytes_adjoint: the whole model's activation memory.
        loss, batch, dtype, training: the measurement's setting.
        target, tol: the recommendation rule's thresholds.
    """

    stages: list[StageCheck]
    gradient_error: dict[int, float]
    saved_bytes_autograd: int
    saved_bytes_adjoint: int
    loss: float
    batch: int
    dtype: str
    training: bool
    target: float
    tol: float

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready; refine keys become strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def table(self) -> str:
        """The report as a fixed-width text table."""
        return _format_check(self)


def recommend(
    errors: dict[int, float], drifts: dict[int, float], target: float, tol: float
) -> tuple[str, int, str]:
    """The rule of :func:`check`: ``(backward, refine, reason)`` for one stage.

    * ``("auto", K)`` with ``K`` the smallest measured refine whose gradient error is
      ``<= target`` and whose drift is ``<= tol``: accurate now, and the drift check will
      catch the network leaving that regime later in training;
    * else ``("adjoint", K)`` with ``K`` the smallest refine whose gradient error is
      ``<= target``: accurate, but ``"auto"`` would fall back (needlessly) at this ``tol``;
    * else ``("autograd", 0)``: no refine makes the memory-free backward accurate enough for
      this stage (``"auto"`` would fall back on every backward where the drift exceeds ``tol``).
    """
    accurate = [k for k in sorted(errors) if errors[k] <= target]
    guarded = [k for k in accurate if drifts[k] <= tol]
    if guarded:
        k = guarded[0]
        return "auto", k, f"gradient error {errors[k]:.2g} <= {target:g} and drift <= tol"
    if accurate:
        k = accurate[0]
        return (
            "adjoint",
            k,
            f"gradient error {errors[k]:.2g} <= {target:g} but drift {drifts[k]:.2g} > tol "
            f"{tol:g} ('auto' would fall back)",
        )
    best = min(errors, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
    return "autograd", 0, f"gradient error {errors[best]:.2g} > {target:g} even with refine={best}"


def _checkable(model: nn.Module, training: bool) -> tuple[nn.Module, dict[Stage, str]]:
    """A deep copy of ``model`` whose fused stages are replaced by their generic twins, and the
    engine (class name) each stage of the copy stands for."""
    model = copy.deepcopy(model)
    engines = {s: type(s).__name__ for s in stages(model)}
    for name, m in list(model.named_modules()):
        if isinstance(m, Stage) and not isinstance(m, ResidualStack) and name:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            twin = _as_generic(m)
            engines[twin] = engines.pop(m)
            setattr(parent, attr, twin)
    if isinstance(model, Stage) and not isinstance(model, ResidualStack):
        twin = _as_generic(model)
        engines[twin] = engines.pop(model)
        model = twin
    return model.train(training), engines


def _stage_inputs(
    state: _ModelState, inputs: tuple[Tensor, ...]
) -> dict[Stage, tuple[Tensor, ...]]:
    """The inputs ``(x, *args)`` each stage receives in a forward on ``inputs`` (last call)."""
    seen: dict[Stage, tuple[Tensor, ...]] = {}
    hooks = [
        s.register_forward_pre_hook(
            lambda mod, args: seen.__setitem__(mod, tuple(a.detach() for a in args))
        )
        for s in state.stages
    ]
    state.restore()
    try:
        with torch.no_grad():
            state.model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        state.restore()
    return seen


def _stage_memory(state: _ModelState, stage: Stage, xs: tuple[Tensor, ...], mode: str) -> int:
    x, args = xs[0].clone().requires_grad_(True), xs[1:]
    stage.backward = mode
    try:
        return saved_tensor_bytes(lambda z: stage(z, *args), x, exclude=list(stage.parameters()))
    finally:
        state.restore()


def _measure_stage(
    state: _ModelState,
    stage: Stage,
    xs: tuple[Tensor, ...],
    grads: Callable[[Callable[[Stage], tuple[str, int]]], list[Tensor]],
    exact: list[Tensor],
    refines: tuple[int, ...],
) -> dict[str, Any]:
    """A stage's measurements per refine: reconstruction, drift, isolated gradient error."""
    out: dict[str, Any] = {"reconstruction_error": {}, "drift": {}, "max_step_error": {}}
    out["gradient_error"] = {}
    for k in refines:
        state.restore()
        out["reconstruction_error"][k] = reconstruction_error(stage, *xs, refine=k)
        approx = grads(lambda s, k=k: ("adjoint", k) if s is stage else ("autograd", 0))
        out["gradient_error"][k] = _flat_rel(exact, approx)
        report = stage.last_backward
        out["drift"][k] = report.drift if report is not None else math.nan
        out["max_step_error"][k] = report.max_step_error if report is not None else math.nan
    state.restore()
    out["saved_bytes_autograd"] = _stage_memory(state, stage, xs, "autograd")
    out["saved_bytes_adjoint"] = _stage_memory(state, stage, xs, "adjoint")
    return out


def check(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    *,
    refines: tuple[int, ...] = CHECK_REFINES,
    target: float = CHECK_TARGET,
    training: bool = True,
) -> CheckReport:
    """Is the memory-free backward safe for this network? Stage by stage, on one batch.

    For every stage (fused stages through their generic twin, which computes the same thing):
    depth, scheme, step; the reconstruction error of the reverse steps at the stage's input; the
    drift and the relative gradient error of the model when only this stage uses the adjoint,
    for each ``refine`` in ``refines``; the activation memory (bytes saved for the backward)
    with autograd and with the adjoint; and a recommended ``backward``/``refine`` by the rule of
    :func:`recommend` (gradient error within ``target``; ``tol`` is the stage's). The relative
    gradient error with every stage on the adjoint is reported for the whole model.

    Args:
        model: any module holding :class:`~resode.stack.Stage` s; it is not modified (a deep
            copy is measured).
        inputs, targets, loss_fn: one batch and its loss (as for :func:`gradient_error`). Use
            float64 for gradient errors below about ``1e-6``.
        refines: the ``refine`` values to measure.
        target: the largest acceptable relative gradient error (default 5%).
        training: measure in training mode (BatchNorm on batch statistics, as in training).

    Returns:
        A :class:`CheckReport` (``.table()`` for text, ``.to_dict()`` for JSON).
    """
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    model, engines = _checkable(model, training)
    if not stages(model):
        raise ValueError(f"{type(model).__name__} has no residual stage (resode.Stage) to check")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    state = _ModelState(model)

    def grads(setting: Callable[[Stage], tuple[str, int]]) -> list[Tensor]:
        return _model_grads(state, inputs, targets, loss_fn, params, setting)[0]

    exact, loss = _model_grads(state, inputs, targets, loss_fn, params, lambda s: ("autograd", 0))
    xs = _stage_inputs(state, inputs)
    named = {s: n for n, s in model.named_modules() if isinstance(s, Stage)}
    rows = []
    for stage in state.stages:
        if stage not in xs:
            continue  # not called by this forward
        m = _measure_stage(state, stage, xs[stage], grads, exact, tuple(refines))
        row = StageCheck(
            name=named[stage] or type(stage).__name__,
            engine=engines[stage],
            depth=stage.depth,
            scheme=stage.scheme.name,
            step=stage.step,
            num_steps=stage.num_steps,
            tied=stage.tied,
            **m,
        )
        row.recommended_backward, row.recommended_refine, row.reason = recommend(
            row.gradient_error, row.drift, target, stage.tol
        )
        rows.append(row)
    return CheckReport(
        stages=rows,
        gradient_error={k: _flat_rel(exact, grads(lambda s, k=k: ("adjoint", k))) for k in refines},
        saved_bytes_autograd=_model_memory(state, inputs, "autograd"),
        saved_bytes_adjoint=_model_memory(state, inputs, "adjoint"),
        loss=loss,
        batch=int(inputs[0].shape[0]) if inputs[0].dim() else 1,
        dtype=str(params[0].dtype).replace("torch.", ""),
        training=training,
        target=target,
        tol=min(s.tol for s in state.stages),
    )


def _model_memory(state: _ModelState, inputs: tuple[Tensor, ...], mode: str) -> int:
    for s in state.stages:
        s.backward = mode
    try:
        params = list(state.model.parameters())
        return saved_tensor_bytes(lambda *z: state.model(*z), *inputs, exclude=params)
    finally:
        state.restore()


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _format_check(r: CheckReport) -> str:
    ks = sorted(r.gradient_error)
    kk = "/".join(str(k) for k in ks)
    head = ["stage", "depth", "scheme", "step", f"drift K={kk}", f"grad err K={kk}"]
    head += ["saved autograd/adjoint", "recommended"]
    lines = []
    for s in r.stages:
        rec = s.recommended_backward
        if rec != "autograd":
            rec += f" refine={s.recommended_refine}"
        lines.append(
            [
                s.name,
                str(s.depth),
                s.scheme,
                f"{s.step:.4g}",
                " ".join(f"{s.drift[k]:.1e}" for k in ks),
                " ".join(f"{s.gradient_error[k]:.1e}" for k in ks),
                f"{_fmt_bytes(s.saved_bytes_autograd)} / {_fmt_bytes(s.saved_bytes_adjoint)}",
                rec,
            ]
        )
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    text = [
        f"resode check: batch {r.batch}, {r.dtype}, "
        f"{'training' if r.training else 'eval'} mode, loss {r.loss:.4g}",
        "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
    ]
    text += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.append(
        "every stage on the adjoint: gradient error "
        + ", ".join(f"K={k}: {r.gradient_error[k]:.2e}" for k in ks)
        + f"; saved {_fmt_bytes(r.saved_bytes_autograd)} (autograd) vs "
        + f"{_fmt_bytes(r.saved_bytes_adjoint)} (adjoint)"
    )
    text.append(
        "drift: ||x^_0 - x_0|| / ||x_0|| (the reverse steps' reconstruction error); grad err: "
        "||g - g_exact|| / ||g_exact||, this stage alone on the adjoint"
    )
    text.append(
        f"rule: 'auto' with the smallest refine K whose grad err <= {r.target:g} and drift <= "
        f"tol ({r.tol:g}); else 'adjoint' with the smallest K whose grad err <= {r.target:g}; "
        "else 'autograd'"
    )
    text += [f"  {s.name}: {s.reason}" for s in r.stages]
    return "\n".join(text)
