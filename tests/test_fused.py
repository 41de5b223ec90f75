"""Fused stages (resode._C) against the generic engine: parity, adjoint error rates, bad input.

These tests skip when the extension is unavailable, unless RESODE_REQUIRE_EXTENSION=1 (CI sets
it for the run against the built ``_C``), in which case they fail.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import resode
from resode import _ext, _ops, fused
from resode.models.blocks import ACTIVATIONS
from resode.stack import BACKWARD_MODES

SCHEMES = ("euler", "heun")
MODES = ("autograd", "adjoint")
TIED = (False, True)


@pytest.fixture(autouse=True)
def _need_extension():
    status = _ext.extension_available()
    if not status:
        if os.environ.get("RESODE_REQUIRE_EXTENSION", "") == "1":
            pytest.fail(
                f"RESODE_REQUIRE_EXTENSION=1 but the extension is unavailable: {status.reason}"
            )
        pytest.skip(f"resode._C unavailable: {status.reason}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _assert_close(a, b, name, rtol=1e-10, atol=0.0):
    a, b = a.detach(), b.detach()
    err = float((a - b).norm())
    bound = rtol * float(b.norm()) + atol
    assert err <= bound, f"{name}: |a-b| = {err:.3e} > {bound:.3e} (|b| = {float(b.norm()):.3e})"


def _mlp_pairs(f: fused.MLPStack, g: resode.ResidualStack):
    """(name, fused slice, generic tensor) for every parameter of every block."""
    out = []
    for i, blk in enumerate(g.blocks):
        out += [(f"w1[{i}]", f.w1, i, blk[0].weight), (f"w2[{i}]", f.w2, i, blk[2].weight)]
        if f.b1 is not None:
            out += [(f"b1[{i}]", f.b1, i, blk[0].bias), (f"b2[{i}]", f.b2, i, blk[2].bias)]
    return out


def _conv_pairs(f: fused.ConvStack, g: resode.ResidualStack):
    out = []
    for i, blk in enumerate(g.blocks):
        for k, (conv, bn) in enumerate(((blk[0], blk[1]), (blk[3], blk[4])), start=1):
            out += [
                (f"conv{k}_weight[{i}]", getattr(f, f"conv{k}_weight"), i, conv.weight),
                (f"conv{k}_bias[{i}]", getattr(f, f"conv{k}_bias"), i, conv.bias),
                (f"bn{k}_weight[{i}]", getattr(f, f"bn{k}_weight"), i, bn.weight),
                (f"bn{k}_bias[{i}]", getattr(f, f"bn{k}_bias"), i, bn.bias),
            ]
    return out


def _buffer_pairs(f: fused.ConvStack, g: resode.ResidualStack):
    out = []
    for i, blk in enumerate(g.blocks):
        for k, bn in ((1, blk[1]), (2, blk[4])):
            out += [
                (f"bn{k}_running_mean[{i}]", getattr(f, f"bn{k}_running_mean")[i], bn.running_mean),
                (f"bn{k}_running_var[{i}]", getattr(f, f"bn{k}_running_var")[i], bn.running_var),
                (
                    f"bn{k}_num_batches_tracked[{i}]",
                    getattr(f, f"bn{k}_num_batches_tracked")[i],
                    bn.num_batches_tracked,
                ),
            ]
    return out


def _assert_same_report(rf, rg, it=0):
    """The fused stage's ``last_backward`` equals the generic one's (drift and max_step_error to
    1e-10 relative, plus 1e-14 absolute: both are differences of O(1) tensors)."""
    if rg is None:
        assert rf is None, f"pass {it}: the fused stage reported, the generic one did not"
        return
    assert rf is not None, f"pass {it}: no report from the fused stage"
    fields = ("mode", "exact", "fell_back", "refine", "num_steps", "tol")
    assert [getattr(rf, k) for k in fields] == [getattr(rg, k) for k in fields], (rf, rg)
    for k in ("drift", "max_step_error"):
        a, b = getattr(rf, k), getattr(rg, k)
        assert abs(a - b) <= 1e-10 * abs(b) + 1e-14, f"pass {it}: {k} {a!r} != {b!r}"
    for t in (rf.drift_tensor, rf.step_error_tensor):
        assert not isinstance(t, torch.Tensor) or (t.dim() == 0 and not t.requires_grad)


def _run_parity(f, x_shape, pairs_fn, buffers=False, steps=2, call=None):
    """Run fused and generic stages side by side (``steps`` forward/backward passes of
    ``call(stage, x)``, default ``stage(x)``) and compare outputs, input gradients, every
    parameter gradient, the BN buffers and the backward reports."""
    g = f.to_generic()
    call = call or (lambda stage, x: stage(x))
    for it in range(steps):
        x = torch.randn(*x_shape, dtype=torch.float64)
        w = torch.randn(*x_shape, dtype=torch.float64)
        xf = x.clone().requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        yf, yg = call(f, xf), call(g, xg)
        _assert_close(yf, yg, f"output (pass {it})")
        (yf * w).sum().backward()
        (yg * w).sum().backward()
        _assert_same_report(f.last_backward, g.last_backward, it)
        pairs = pairs_fn(f, g)
        scale = max(float(t.grad.norm()) for _, _, _, t in pairs)
        _assert_close(xf.grad, xg.grad, f"input grad (pass {it})")
        for name, fp, i, gp in pairs:
            # tied: the generic stack has one block; the fused slot 0 holds the summed grad
            _assert_close(fp.grad[i], gp.grad, name, atol=1e-12 * scale)
        if buffers:
            for name, a, b in _buffer_pairs(f, g):
                if a.dtype == torch.long:
                    assert torch.equal(a, b), name
                else:
                    _assert_close(a, b, name)
        f.zero_grad()
        g.zero_grad()
    return f, g


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("tied", TIED)
def test_mlp_parity_float64(scheme, backward, tied):
    f = fused.MLPStack(
        4, 7, 6, activation="tanh", scheme=scheme, backward=backward, tied=tied
    ).double()
    _run_parity(f, (5, 4), _mlp_pairs)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("backward", MODES)
def test_mlp_parity_activations_nobias(activation, backward):
    f = fused.MLPStack(
        3, 5, 5, activation=activation, scheme="heun", backward=backward, bias=False, step=0.3
    ).double()
    _run_parity(f, (2, 6, 3), _mlp_pairs)  # leading dims are flattened


def _randomise_bn(f: fused.ConvStack):
    with torch.no_grad():
        for k in (1, 2):
            getattr(f, f"bn{k}_weight").uniform_(0.5, 1.5)
            getattr(f, f"bn{k}_bias").uniform_(-0.5, 0.5)
            getattr(f, f"bn{k}_running_mean").uniform_(-0.2, 0.2)
            getattr(f, f"bn{k}_running_var").uniform_(0.5, 2.0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("tied", TIED)
def test_conv_parity_float64(scheme, backward, tied):
    f = fused.ConvStack(3, 4, scheme=scheme, backward=backward, tied=tied).double()
    _randomise_bn(f)  # the default zero-initialised last BN would hide most of the gradient
    f, _ = _run_parity(f, (4, 3, 5, 5), _conv_pairs, buffers=True)
    # two forward passes: one running-stat update per block evaluation each
    evals = 4 if scheme == "euler" else 2 * 3
    if tied:
        assert f.bn2_num_batches_tracked.tolist() == [2 * evals]
    elif scheme == "euler":
        assert f.bn1_num_batches_tracked.tolist() == [2, 2, 2, 2]
    else:
        assert f.bn1_num_batches_tracked.tolist() == [2, 4, 4, 2]


@pytest.mark.parametrize("backward", MODES)
def test_conv_parity_eval_mode(backward):
    f = fused.ConvStack(3, 3, scheme="heun", backward=backward).double()
    _randomise_bn(f)
    f.eval()
    _run_parity(f, (2, 3, 4, 4), _conv_pairs, buffers=True, steps=1)


def test_conv_no_grad_updates_running_stats_once():
    f = fused.ConvStack(2, 3, scheme="euler").double()
    g = f.to_generic()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        _assert_close(f(x), g(x), "output")
    for name, a, b in _buffer_pairs(f, g):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            _assert_close(a, b, name)
    assert f.bn1_num_batches_tracked.tolist() == [1, 1, 1]


def test_adjoint_stored_variant_matches_generic():
    f = fused.MLPStack(
        3, 6, 5, activation="tanh", scheme="heun", backward="adjoint_stored"
    ).double()
    _run_parity(f, (4, 3), _mlp_pairs, steps=1)
    c = fused.ConvStack(2, 3, scheme="euler", backward="adjoint_stored").double()
    _randomise_bn(c)
    _run_parity(c, (2, 2, 3, 3), _conv_pairs, buffers=True, steps=1)


# ---------------------------------------------- refine, drift report, auto (issue 10 item 7)
# (backward, tol): the adjoint; auto keeping its pass; auto falling back (every drift > 1e-300)
TRUST = [("adjoint", 1e-2), ("auto", 1e300), ("auto", 1e-300)]
TRUST_IDS = ["adjoint", "auto-kept", "auto-fallback"]


@pytest.mark.parametrize("mode,tol", TRUST, ids=TRUST_IDS)
@pytest.mark.parametrize("refine", [0, 1, 2])
@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_mlp_refine_drift_auto_parity_float64(scheme, tied, refine, mode, tol):
    """Outputs, every gradient, drift and max_step_error equal the generic engine's to 1e-10."""
    f = fused.MLPStack(
        4, 7, 5, scheme=scheme, backward=mode, tied=tied, refine=refine, tol=tol
    ).double()
    f, _ = _run_parity(f, (6, 4), _mlp_pairs)
    r = f.last_backward
    assert (r.refine, r.fell_back, r.exact) == (refine, tol == 1e-300, tol == 1e-300)
    assert r.drift > 0 and r.max_step_error > 0


@pytest.mark.parametrize("mode,tol", TRUST, ids=TRUST_IDS)
@pytest.mark.parametrize("refine", [0, 1, 2])
@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_conv_refine_drift_auto_parity_float64(scheme, tied, refine, mode, tol):
    """As for the MLP stage, plus the BN running statistics (training mode: batch statistics
    in every recomputation, running statistics updated by the forward only)."""
    f = fused.ConvStack(3, 3, scheme=scheme, backward=mode, tied=tied, refine=refine, tol=tol)
    f = f.double()
    _randomise_bn(f)
    f, _ = _run_parity(f, (4, 3, 4, 4), _conv_pairs, buffers=True)
    assert f.last_backward.fell_back == (tol == 1e-300)
    assert int(f.bn1_num_batches_tracked.sum()) == 2 * (3 if scheme == "euler" else 4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adjoint_stored_and_eval_mode_with_refine(scheme):
    f = fused.MLPStack(3, 6, 5, scheme=scheme, backward="adjoint_stored", refine=2).double()
    _run_parity(f, (4, 3), _mlp_pairs, steps=1)
    c = fused.ConvStack(2, 3, scheme=scheme, backward="auto", refine=1, tol=1e-300).double()
    _randomise_bn(c)
    _run_parity(c.eval(), (2, 2, 3, 3), _conv_pairs, buffers=True, steps=1)


@pytest.mark.parametrize("make", ["mlp", "conv"])
def test_auto_on_a_non_ode_stage_returns_exact_gradients(make):
    """Step 1, iid weights: the adjoint is badly wrong; auto falls back (default tol) and returns
    the exact gradients of backward="autograd"."""
    torch.manual_seed(4)
    if make == "mlp":
        f, shape = fused.MLPStack(6, 12, 4, step=1.0).double(), (16, 6)
        with torch.no_grad():
            for p in f.parameters():
                p.mul_(4.0)
    else:
        f, shape = fused.ConvStack(3, 4, step=1.0).double(), (6, 3, 5, 5)
        with torch.no_grad():
            f.bn2_weight.normal_(0.0, 3.0)
    x = torch.randn(*shape, dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "adjoint", "auto"):
        f.backward = mode
        f.zero_grad()
        xi = x.clone().requires_grad_(True)
        f(xi).square().sum().backward()
        grads[mode] = torch.cat([xi.grad.flatten()] + [p.grad.flatten() for p in f.parameters()])
    assert _rel(grads["adjoint"], grads["autograd"]) > 0.1
    assert _rel(grads["auto"], grads["autograd"]) < 1e-10
    r = f.last_backward
    assert r.mode == "auto" and r.exact and r.fell_back and r.drift > r.tol == 1e-2


def test_sqdist_max_kernel():
    """The drift check's reduction: acc = max(acc, sum((a - b)^2)) (summed in float64 on the
    CPU), nan kept."""
    lib = _ops.library()
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(100_003, dtype=dtype), torch.randn(100_003, dtype=dtype)
        acc = torch.zeros(1, dtype=dtype)
        lib._sqdist_max(a, b, acc)
        ref = (a.double() - b.double()).square().sum()
        assert abs(float(acc) - float(ref)) <= 1e-6 * float(ref)
        first = acc.clone()
        lib._sqdist_max(a[:10], b[:10], acc)
        assert torch.equal(acc, first)
        lib._sqdist_max(torch.full_like(a, float("nan")), b, acc)
        assert torch.isnan(acc).all()
        lib._sqdist_max(a, b, acc)
        assert torch.isnan(acc).all()


def test_refine_shrinks_the_fused_adjoint_error():
    """Euler, depth-smooth weights: refine=2 is >= 10x more accurate than refine=0 (the
    generic engine's slopes are tested in test_adjoint_trust.py; the parity tests above tie the
    fused numbers to them)."""
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=torch.float64)
    w = torch.randn(16, 8, dtype=torch.float64)
    f = _smooth_mlp(64, "euler")
    e0 = _grad_error(f, x, w)
    f.refine = 2
    e2 = _grad_error(f, x, w)
    assert e2 * 10 <= e0, (e0, e2)


def test_fused_auto_memory_is_flat_when_it_does_not_fall_back():
    from resode.diagnostics import saved_tensor_bytes

    def mem(depth):
        f = fused.MLPStack(8, 8, depth, backward="auto", tied=True)
        x = torch.randn(4, 8, requires_grad=True)
        return saved_tensor_bytes(f, x, exclude=list(f.parameters()))

    assert mem(16) == mem(128) > 0


@pytest.mark.parametrize("make", ["mlp", "conv"])
def test_paper_code_mode_matches_generic_and_leaves_eval_mode(make):
    """backward="adjoint_paper_code": the generic engine's numbers (the backward recomputes with
    BN's running statistics), and the stage is in eval mode afterwards, like the generic
    residual functions; the next pass (eval mode) matches too."""
    if make == "mlp":
        f, shape, pairs = fused.MLPStack(3, 5, 4, refine=1).double(), (4, 3), _mlp_pairs
    else:
        f, shape, pairs = fused.ConvStack(3, 4).double(), (4, 3, 4, 4), _conv_pairs
        _randomise_bn(f)
    f.backward = "adjoint_paper_code"
    f, g = _run_parity(f.train(), shape, pairs, buffers=make == "conv", steps=2)
    assert not f.training and not any(b.training for b in g.blocks)
    assert f.last_backward.mode == "adjoint_paper_code"
    with pytest.raises(ValueError, match="heun"):
        fused.MLPStack(3, 5, 4, scheme="heun", backward="adjoint_paper_code")


@pytest.mark.parametrize("mode", ["autograd", "adjoint", "auto", "adjoint_stored"])
@pytest.mark.parametrize("what", ["input", "parameter"])
def test_in_place_change_before_backward_raises(mode, what):
    msg = "one of the variables needed for gradient computation has been modified by an inplace"
    for f, shape in (
        (fused.MLPStack(4, 5, 3, backward=mode).double(), (3, 4)),
        (fused.ConvStack(2, 3, backward=mode).double(), (2, 2, 3, 3)),
    ):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        x_in = x * 1.0
        y = f(x_in)
        with torch.no_grad():
            (x_in if what == "input" else next(f.parameters())).mul_(2.0)
        with pytest.raises(RuntimeError, match=msg):
            y.square().sum().backward()


@pytest.mark.parametrize("mode", ["autograd", "adjoint", "auto"])
def test_double_backward_raises_a_clear_error(mode):
    f = fused.MLPStack(4, 5, 3, backward=mode).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x).square().sum(), x)  # a single backward works
    with pytest.raises(RuntimeError, match=r"resode: a fused stage.*twice.*to_generic.*autograd"):
        torch.autograd.grad(f(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("refine", [1, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_reverse_with_refine_matches_generic(scheme, refine):
    for f, shape in ((_mlp_stage(scheme), (5, 4)), (_conv_stage(scheme), (4, 3, 5, 5))):
        f.refine = refine
        g = f.to_generic()
        y = torch.randn(*shape, dtype=torch.float64)
        _assert_close(f.reverse(y), g.reverse(y), f"reverse refine={refine}")
        _assert_close(f.reverse(y, refine=0), g.reverse(y, refine=0), "reverse refine=0")
        assert (f.reverse(y) - f.reverse(y, refine=0)).norm() > 1e-8 * y.norm()


def test_constructors_and_conversions_carry_refine_tol_and_unit_step():
    f = fused.MLPStack(3, 4, 5, scheme="heun", backward="auto", refine=2, tol=0.25, step="unit")
    assert (f.refine, f.tol, f.step) == (2, 0.25, 0.25) and f.supports_refine
    g = f.to_generic()
    assert g.stage_kwargs() == f.stage_kwargs()
    assert fused.MLPStack.from_generic(g).stage_kwargs() == f.stage_kwargs()
    c = fused.ConvStack(2, 3, backward="auto", refine=1, tol=0.5)
    assert fused.ConvStack.from_generic(c.to_generic()).stage_kwargs() == c.stage_kwargs()
    assert fused.can_fuse(g) and isinstance(fused.fuse(g), fused.MLPStack)
    gc = c.to_generic()
    gc.backward = "adjoint_paper_code"
    assert fused.can_fuse(gc) and fused.fuse(gc).backward == "adjoint_paper_code"
    with pytest.raises(ValueError, match="refine must be"):
        fused.MLPStack(3, 4, 5, refine=-1)
    with pytest.raises(ValueError, match="tol must be"):
        fused.ConvStack(2, 3, tol=0.0)
    assert "refine=2" in repr(f) and "tol=0.25" in repr(f)


def test_tiny_resnet_auto_engine_is_fused_and_takes_every_backward_mode():
    model = resode.models.create("tiny_resnet", depth=4, channels=4, num_classes=3).double()
    assert isinstance(model.layer1, fused.ConvStack)
    _randomise_bn(model.layer1)  # the zero-initialised last BN makes every f_n zero: no drift
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    ref = model.layer1.to_generic()
    with resode.backward_mode(model, "auto"):
        nn.functional.cross_entropy(model(x), target).backward()
    assert model.layer1.last_backward.mode == "auto" and model.layer1.backward == "autograd"
    resode.set_backward(model, "auto", refine=1, tol=1e-300)
    assert (model.layer1.backward, model.layer1.refine, model.layer1.tol) == ("auto", 1, 1e-300)
    nn.functional.cross_entropy(model(x), target).backward()
    r = model.layer1.last_backward
    assert r.fell_back and r.exact and r.refine == 1
    assert resode.backward_reports(model)["layer1"] is r
    assert ref.depth == model.layer1.depth


# ---------------------------------------------------------------------------------- error rates
def _grad_error(f: fused.MLPStack, x: torch.Tensor, w: torch.Tensor) -> float:
    grads = {}
    for mode in ("autograd", "adjoint"):
        f.backward = mode
        f.zero_grad()
        (f(x) * w).sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in f.parameters()])
    return _rel(grads["adjoint"], grads["autograd"])


def _slope(depths, errors) -> float:
    return float(np.polyfit(np.log(depths), np.log(errors), 1)[0])


def test_adjoint_error_rate_euler_iid():
    depths = [8, 16, 32, 64, 128, 256]
    errs = []
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=torch.float64)
    w = torch.randn(16, 8, dtype=torch.float64)
    for n in depths:
        torch.manual_seed(2)
        f = fused.MLPStack(8, 16, n, activation="tanh", scheme="euler").double()
        errs.append(_grad_error(f, x, w))
    slope = _slope(depths, errs)
    assert slope <= -0.9, f"Euler adjoint error slope {slope:.2f} (errors {errs})"


def _smooth_mlp(n: int, scheme: str) -> fused.MLPStack:
    """Weights that are smooth functions of depth t = i/N (fixed random coefficients)."""
    f = fused.MLPStack(8, 16, n, activation="tanh", scheme=scheme).double()
    gen = torch.Generator().manual_seed(3)
    t = torch.arange(n, dtype=torch.float64) / n
    with torch.no_grad():
        for p in f.parameters():
            shape = p.shape[1:]
            a, b, c = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))
            s = 1 / math.sqrt(shape[-1])
            tt = t.reshape(-1, *([1] * len(shape)))
            p.copy_(s * (a + b * torch.sin(2 * math.pi * tt) + c * torch.cos(math.pi * tt)))
    return f


def test_adjoint_error_rate_heun_smooth():
    depths = [8, 16, 32, 64, 128, 256]
    errs = []
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=torch.float64)
    w = torch.randn(16, 8, dtype=torch.float64)
    for n in depths:
        errs.append(_grad_error(_smooth_mlp(n, "heun"), x, w))
    slope = _slope(depths, errs)
    assert slope <= -1.8, f"Heun adjoint error slope {slope:.2f} (errors {errs})"


# ----------------------------------------------------------------------------------- bad input
def test_bad_inputs_mlp():
    f = fused.MLPStack(4, 6, 3).double()
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        f(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        f(torch.randn(2, 4, dtype=torch.float32))
    with pytest.raises(TypeError):
        f(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="meta"):
        f(torch.randn(2, 4, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="tensor"):
        f([1.0, 2.0])
    with pytest.raises(ValueError, match="activation"):
        fused.MLPStack(4, 6, 3, activation="sigmoid")
    with pytest.raises(ValueError, match="scheme"):
        fused.MLPStack(4, 6, 3, scheme="rk4")
    with pytest.raises(ValueError, match="backward"):
        fused.MLPStack(4, 6, 3, backward="checkpoint")
    with pytest.raises(ValueError):
        fused.MLPStack(4, 6, 1, scheme="heun")


def test_non_contiguous_input_is_handled():
    f = fused.MLPStack(4, 6, 3).double()
    x = torch.randn(4, 7, dtype=torch.float64).t()  # (7, 4), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(f(x), f(x.contiguous()), rtol=0, atol=0)
    c = fused.ConvStack(2, 2).double()
    xc = torch.randn(2, 3, 3, 2, dtype=torch.float64).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(c.eval()(xc), c(xc.contiguous()), rtol=0, atol=0)


def test_mismatched_parameter_shapes():
    ops = _ops.library()
    x = torch.randn(3, 4, dtype=torch.float64)
    w1 = torch.randn(2, 5, 4, dtype=torch.float64)
    w2 = torch.randn(2, 4, 6, dtype=torch.float64)  # hidden 6 != 5
    with pytest.raises((ValueError, RuntimeError), match="w2"):
        ops.mlp_forward(x, w1, None, w2, None, 0, 0, 0.5, 2, 0, False)
    w2 = torch.randn(3, 4, 5, dtype=torch.float64)  # 3 blocks for depth 2
    with pytest.raises((ValueError, RuntimeError), match="leading size"):
        ops.mlp_forward(x, w1, None, w2, None, 0, 0, 0.5, 2, 0, False)
    f = fused.MLPStack(4, 6, 3).double()
    f.w2 = nn.Parameter(torch.randn(3, 4, 7, dtype=torch.float64))
    with pytest.raises((ValueError, RuntimeError), match="w2"):
        f(torch.randn(2, 4, dtype=torch.float64))
    c = fused.ConvStack(2, 2).double()
    with pytest.raises(ValueError, match="channels"):
        c(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D"):
        c(torch.randn(2, 4, 4, dtype=torch.float64))
    c.conv2_weight = nn.Parameter(torch.randn(2, 2, 2, 5, 5, dtype=torch.float64))
    with pytest.raises((ValueError, RuntimeError), match="conv2.weight"):
        c(torch.randn(1, 2, 4, 4, dtype=torch.float64))


def test_from_generic_rejects_other_blocks():
    stack = resode.ResidualStack([nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 3))])
    assert not fused.can_fuse(stack)
    assert fused.fuse(stack) is stack
    with pytest.raises(TypeError, match="from_generic"):
        fused.MLPStack.from_generic(stack)
    with pytest.raises(TypeError, match="from_generic"):
        fused.ConvStack.from_generic(stack)


# -------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("tied", TIED)
def test_round_trip_mlp(tied):
    f = fused.MLPStack(3, 5, 4, activation="gelu", scheme="heun", backward="adjoint", tied=tied)
    g = f.to_generic()
    assert isinstance(g, resode.ResidualStack) and g.tied == tied and g.backward == "adjoint"
    f2 = fused.MLPStack.from_generic(g)
    assert f2.state_dict().keys() == f.state_dict().keys()
    for k, v in f.state_dict().items():
        assert torch.equal(v, f2.state_dict()[k]), k
    g2 = f2.to_generic()
    for k, v in g.state_dict().items():
        assert torch.equal(v, g2.state_dict()[k]), k
    assert fused.can_fuse(g)
    assert isinstance(fused.fuse(g), fused.MLPStack)


@pytest.mark.parametrize("tied", TIED)
def test_round_trip_conv(tied):
    f = fused.ConvStack(2, 3, scheme="euler", tied=tied)
    _randomise_bn(f)
    f.bn1_num_batches_tracked.fill_(7)
    g = f.to_generic()
    f2 = fused.ConvStack.from_generic(g)
    for k, v in f.state_dict().items():
        assert torch.equal(v, f2.state_dict()[k]), k
    assert torch.all(f.bn2_weight == f2.bn2_weight)
    assert isinstance(fused.fuse(g), fused.ConvStack)
    assert fused.ConvStack(2, 3).bn2_weight.abs().sum() == 0  # zero-initialised last BN


def test_stage_api_and_backward_switch():
    f = fused.MLPStack(3, 4, 5, scheme="heun")
    assert isinstance(f, resode.Stage) and f.num_steps == 4 and f.step == pytest.approx(0.2)
    with resode.backward_mode(f, "adjoint"):
        assert f.backward == "adjoint"
    assert f.backward == "autograd"
    assert fused.available_for("cpu")
    assert fused.available_for("cpu") == bool(_ext.extension_available())


# ------------------------------------------------------------------------ the Stage interface
def _mlp_stage(scheme, tied=False, backward="adjoint"):
    return fused.MLPStack(
        4, 6, 5, activation="gelu", scheme=scheme, tied=tied, backward=backward
    ).double()


def _conv_stage(scheme, tied=False, backward="adjoint"):
    c = fused.ConvStack(3, 4, scheme=scheme, tied=tied, backward=backward).double()
    _randomise_bn(c)
    return c


@pytest.mark.parametrize("tied", TIED)
def test_block_is_a_copy_of_the_generic_block(tied):
    for f in (_mlp_stage("heun", tied), _conv_stage("euler", tied)):
        g = f.to_generic()
        for n in (0, f.depth - 1):
            b, ref = f.block(n), g.block(n)
            assert type(b) is type(ref) and len(b) == len(ref)
            assert b.state_dict().keys() == ref.state_dict().keys()
            for k, v in ref.state_dict().items():
                assert torch.equal(b.state_dict()[k], v), k
        assert f.block(0) is not f.block(0)  # a copy, even when tied
        with pytest.raises(IndexError):
            f.block(f.depth)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_integrate_is_the_exact_forward(scheme):
    """integrate() = the generic integrate (values, exact gradients, BN buffers), also for a
    stage whose backward is the adjoint."""
    integrate = lambda stage, x: stage.integrate(x)  # noqa: E731
    _run_parity(_mlp_stage(scheme), (5, 4), _mlp_pairs, steps=1, call=integrate)
    f = _conv_stage(scheme)
    _run_parity(f, (4, 3, 5, 5), _conv_pairs, buffers=True, steps=1, call=integrate)
    with pytest.raises(TypeError, match="extra arguments"):
        f.integrate(torch.randn(4, 3, 5, 5, dtype=torch.float64), (torch.ones(1),))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make", [_mlp_stage, _conv_stage], ids=["mlp", "conv"])
def test_reverse_matches_generic(scheme, tied, training, make):
    """reverse() = the generic reverse to 1e-10 (float64); BN running statistics untouched."""
    f = make(scheme, tied).train(training)
    g = f.to_generic()
    shape = (5, 4) if isinstance(f, fused.MLPStack) else (4, 3, 5, 5)
    y = torch.randn(*shape, dtype=torch.float64)
    buffers = {k: v.clone() for k, v in f.state_dict().items()}
    xf, xg = f.reverse(y), g.reverse(y)
    assert not xf.requires_grad
    _assert_close(xf, xg, "reverse")
    assert (xf - y).norm() > 1e-3 * y.norm()  # the reverse steps did something
    for k, v in f.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    with pytest.raises(TypeError, match="extra arguments"):
        f.reverse(y, y)


def test_activation_memory_adjoint_is_flat_and_autograd_grows():
    from resode.diagnostics import saved_tensor_bytes

    def mem(depth, mode):
        f = fused.MLPStack(8, 8, depth, backward=mode)
        x = torch.randn(4, 8, requires_grad=True)
        return saved_tensor_bytes(f, x, exclude=list(f.parameters()))

    assert mem(4, "adjoint") == mem(64, "adjoint") > 0
    assert mem(64, "autograd") > 10 * mem(4, "adjoint")


def _fake_and_real(op, *args):
    """The op's outputs on real tensors and under FakeTensorMode (same inputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [
            [mode.from_tensor(t) for t in a]
            if isinstance(a, list)
            else (mode.from_tensor(a) if isinstance(a, torch.Tensor) else a)
            for a in args
        ]
        fake = op(*fake_args)
    return real, fake


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["autograd", "adjoint", "adjoint_stored", "auto"])
def test_fake_kernels_match_the_real_ops(activation, scheme, mode):
    """Every fake kernel gives the shapes, dtypes and devices of the real op's outputs."""
    lib, t = _ops.library(), _ops.table()
    ids = (t.id("schemes", scheme), 0.25, 4, t.id("modes", mode))
    f = fused.MLPStack(3, 5, 4, activation=activation, tied=True).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    p = (f.w1, f.b1, f.w2, None)
    act = t.id("activations", activation)
    c = fused.ConvStack(2, 4).double()
    xc = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    params = [getattr(c, n) for n in fused._CONV_PARAMS]
    running = [getattr(c, n).clone() for n in fused._CONV_BUFFERS]
    conv_fwd = (xc, params, running, *ids[:3], True, True, 0.1, 1e-5, ids[3], True)
    calls = [
        (lib.mlp_forward, (x, *p, act, *ids, True)),
        (lib.mlp_reverse, (x, *p, act, *ids[:3], 1)),
        (lib.conv_forward, conv_fwd),
        (lib.conv_reverse, (xc, params, running, *ids[:3], True, 1e-5, 1)),
    ]
    with torch.no_grad():
        for op, args in calls:
            real, fake = _fake_and_real(op, *args)
            real, fake = _flat(real), _flat(fake)
            assert len(real) == len(fake), op
            for r, k in zip(real, fake):
                assert (r.shape, r.dtype, r.device) == (k.shape, k.dtype, k.device), op
        y, saved = lib.mlp_forward(x, *p, act, *ids, True)
        g = torch.randn_like(y)
        real, fake = _fake_and_real(lib.mlp_backward, g, y, x, saved, *p, act, *ids, 1, 0.01)
        real, fake = _flat(real), _flat(fake)
        assert [(r.shape, r.dtype) for r in real] == [(k.shape, k.dtype) for k in fake]
        y, saved, _, _ = lib.conv_forward(*conv_fwd)
        args = (torch.randn_like(y), y, xc, saved, params, running, *ids[:3], True, 1e-5)
        real, fake = _fake_and_real(lib.conv_backward, *args, ids[3], 2, 0.01)
        real, fake = _flat(real), _flat(fake)
        assert [(r.shape, r.dtype) for r in real] == [(k.shape, k.dtype) for k in fake]


def test_op_table_agrees_with_the_python_side():
    """The extension's table (csrc/table.h) and the Python definitions name the same things."""
    t = _ops.table()
    for s in t.raw["schemes"]:
        scheme = resode.get_scheme(s["name"])
        assert s["min_depth"] == scheme.min_depth
        for depth in (2, 5):
            assert depth - s["steps_offset"] == scheme.num_steps(depth)
            assert s["evals_per_step"] == len(scheme.blocks_of_step(0))
    modes = {m["name"] for m in t.raw["modes"]}
    assert set(BACKWARD_MODES) <= modes and modes <= set(BACKWARD_MODES) | {"adjoint_stored"}
    assert [a["name"] for a in t.raw["activations"]] == list(ACTIVATIONS)
    conv = t.raw["conv"]
    assert [p["name"].replace(".", "_") for p in conv["params"]] == list(fused._CONV_PARAMS)
    assert [p["name"].replace(".", "_") for p in conv["running"]] == list(fused._CONV_BUFFERS)
    assert [p["name"] for p in t.raw["mlp"]["params"]] == ["w1", "b1", "w2", "b2"]
    with pytest.raises(ValueError, match="no mode 'checkpoint'"):
        t.id("modes", "checkpoint")


# ------------------------------------------------------------------------------ torch.compile
def _train_step(stage, call, x, w):
    xi = x.clone().requires_grad_(True)
    y = call(xi)
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
    return y.detach(), xi.grad, grads, {n: b.clone() for n, b in stage.named_buffers()}


@pytest.mark.parametrize("backward", [*MODES, "auto"])
def test_torch_compile_matches_eager(backward):
    """torch.compile(fullgraph=True, inductor) of both fused stages: the outputs, the input and
    parameter gradients and the BatchNorm buffers equal eager mode's (float64); "auto" (refine=1)
    falls back inside the compiled backward as in eager mode. Once failed on the conv stage's
    mutable schema (functionalization, issue 12). A compiled stage has no backward report
    (last_backward is None). ~75 s for the three modes on 2 busy cores with an empty inductor
    cache, ~30 s with a warm one."""
    import copy

    kw = dict(refine=1, tol=1e-300) if backward == "auto" else {}
    stages = (
        (fused.MLPStack(3, 5, 4, scheme="heun", backward=backward, **kw), (4, 3)),
        (fused.ConvStack(2, 3, backward=backward, zero_init_last_bn=False, **kw), (3, 2, 4, 4)),
    )
    for eager, shape in stages:
        eager = eager.double()
        compiled = copy.deepcopy(eager)
        fn = torch.compile(compiled, backend="inductor", fullgraph=True)
        for _ in range(2):  # the second pass reuses the compiled graphs
            x = torch.randn(*shape, dtype=torch.float64)
            w = torch.randn(*shape, dtype=torch.float64)
            ref = _train_step(eager, eager, x, w)
            got = _train_step(compiled, fn, x, w)
            _assert_close(got[0], ref[0], "compiled output")
            _assert_close(got[1], ref[1], "compiled input grad")
            for k in ref[2]:
                _assert_close(got[2][k], ref[2][k], f"compiled grad {k}", atol=1e-13)
            for k in ref[3]:
                assert torch.equal(got[3][k], ref[3][k]), k
            eager.zero_grad(), compiled.zero_grad()
        assert compiled.last_backward is None and eager.last_backward.mode == backward
        assert eager.last_backward.fell_back == (backward == "auto")
        assert eager.training and (shape[1] == 3 or eager.bn1_num_batches_tracked.sum() > 0)


# ----------------------------------------------------------------------- errors, no extension
def _run_child(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (with extra environment variables); it must exit 0
    (a crash, e.g. a segfault, fails here) and print "ok". Returns its output."""
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "ok" in r.stdout, r.stdout
    return r.stdout


# Each op of resode._C called with a bad argument, in a fresh process: every call must raise a
# Python exception whose message names the problem (not crash: issue 11, TORCH_CHECK failures
# once segfaulted under torch 2.11). Prints "ok <op>" per op.
_BAD_CALLS = r"""
import torch
from resode import _ops
lib = _ops.library()
d = dict(dtype=torch.float64)
x, w1, w2 = torch.randn(2, 3, **d), torch.randn(1, 4, 3, **d), torch.randn(1, 3, 4, **d)
xc = torch.randn(2, 2, 3, 3, **d)
params = [torch.randn(1, 2, 2, 3, 3, **d), *[torch.randn(1, 2, **d) for _ in range(3)]] * 2
running = [torch.zeros(1, 2, **d), torch.ones(1, 2, **d)] * 2
v, c2, s = torch.randn(6, **d), torch.randn(2, **d), (0, 0.5, 1)  # scheme, h, depth
bn = (True, True, 0.1, 1e-5)  # training, update_stats, momentum, eps
cases = [  # (op, words the message must contain, arguments)
    ("mlp_forward", "dtype", (x, w1, None, w2.float(), None, 0, *s, 0, False)),
    ("mlp_backward", "stored tensors", (x, x, x, [], w1, None, w2, None, 0, *s, 0, 0, 0.1)),
    ("mlp_reverse", "refine", (x, w1, None, w2, None, 0, *s, -1)),
    ("conv_forward", "parameter tensors", (xc, params[:7], running, *s, *bn, 0, False)),
    ("conv_backward", "mode", (xc, xc, xc, [], params, running, *s, True, 1e-5, 7, 0, 0.1)),
    ("conv_reverse", "4-D", (x, params, running, *s, True, 1e-5, 0)),
    ("_act_forward", "elements", (v, v[:5], 0)),
    ("_act_backward", "activation", (v, v, v, 5, 1.0)),
    ("_axpby", "dtype", (v, v, 1.0, v.float(), 1.0)),
    ("_heun_combine", "elements", (v, v, v, v[::2], 1.0)),
    ("_add_row_bias", "bias", (x, x, v, 1.0)),
    ("_batch_stats", "per-channel", (xc, None, None, 0.1, v, v)),
    ("_bn_apply", "per-channel", (xc, c2, c2, c2, v, True, None, xc, None, 1.0)),
    ("_bn_backward_reduce", "elements", (xc, x, xc, c2, c2)),
    ("_bn_backward_apply", "dtype", (xc, None, xc, c2, c2, c2, c2, 1.0, True, xc.int())),
    ("_sqdist_max", "accumulator", (v, v, torch.zeros(2, **d))),
    ("mlp_backward", "tol", (x, x, x, [], w1, None, w2, None, 0, *s, 1, 0, 0.0)),
    ("conv_backward", "stage input", (xc, xc, xc[:1], [], params, running, *s, True, 1e-5, 3, 1,
                                      0.1)),
]
ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n[:8] == "resode::"}
no_args = {"table", "has_cuda", "clear_graph_cache", "graph_cache_stats"}
missing = ops - {c[0] for c in cases} - no_args
assert not missing, f"no bad-argument case for {sorted(missing)}"
for name, words, args in cases:
    try:
        getattr(lib, name)(*args)
    except Exception as e:
        assert words in str(e), f"{name}: {type(e).__name__} does not mention {words!r}: {e}"
        print("ok", name, flush=True)
    else:
        raise SystemExit(f"{name}: a bad call raised nothing")
"""


def test_every_op_raises_on_a_bad_argument():
    """Each op called through torch.ops.resode with a bad argument raises a Python exception
    naming the problem, in a child process (a crash would be a segfault there: issue 11)."""
    out = _run_child(_BAD_CALLS)
    assert out.count("ok ") == 18, out


def test_fused_stage_without_the_extension_says_what_to_do():
    """RESODE_DISABLE_EXTENSION=1: fused stages build, convert and load state dicts, and running
    one raises one clear error naming the cause and the ways out (no warning)."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"
        "from resode import fused\n"
        "f = fused.MLPStack(4, 5, 3)\n"
        "g = f.to_generic()\n"
        "x = torch.randn(2, 4)\n"
        "assert g(x).shape == x.shape and g.depth == 3\n"
        "c = fused.ConvStack(2, 2)\n"
        "c.load_state_dict(fused.ConvStack.from_generic(c.to_generic()).state_dict())\n"
        "for call in (lambda: f(x), lambda: f.reverse(x), lambda: c(torch.randn(1, 2, 3, 3))):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        m = str(e)\n"
        "        assert 'RESODE_DISABLE_EXTENSION' in m and 'to_generic()' in m, m\n"
        "        assert 'pip install' in m, m\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    _run_child(code, RESODE_DISABLE_EXTENSION="1")


def test_cpu_calls_never_enter_the_cuda_graph_cache():
    """The graph cache (csrc/graphs.h) serves CUDA tensors only: CPU train steps and reverse
    passes of fused stages leave it empty, and clearing it is a no-op that works on any build."""
    lib = _ops.library()
    lib.clear_graph_cache()
    for backward in ("adjoint", "auto"):
        for stage, x in (
            (fused.MLPStack(4, 5, 3, backward=backward), torch.randn(6, 4)),
            (fused.ConvStack(2, 3, backward=backward), torch.randn(2, 2, 4, 4)),
        ):
            for _ in range(3):  # a CUDA call would warm up, capture, then replay
                stage(x.clone().requires_grad_(True)).sum().backward()
                stage.reverse(x)
    assert list(lib.graph_cache_stats()) == [0, 0, 0, 0]
    lib.clear_graph_cache()
    assert list(lib.graph_cache_stats()) == [0, 0, 0, 0]


def test_disabled_extension_reports_why():
    code = (
        "import warnings, resode._ext as e\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    s = e.extension_available()\n"
        "assert not s and not s.cuda and 'RESODE_DISABLE_EXTENSION' in s.reason, s\n"
        "import resode.fused as f\n"
        "assert not f.available_for('cpu')\n"
        "print('ok')\n"
    )
    _run_child(code, RESODE_DISABLE_EXTENSION="1")


def test_direct_op_call_with_parameters_that_require_grad():
    """The ops run below autograd: calling them directly with trainable parameters works."""
    ops = _ops.library()
    f = fused.MLPStack(4, 5, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    out, _ = ops.mlp_forward(x, f.w1, f.b1, f.w2, f.b2, 0, 0, 1 / 3, 3, 0, False)
    with torch.no_grad():
        torch.testing.assert_close(out, f(x), rtol=1e-12, atol=1e-12)
    g = torch.ones_like(out)
    grads, report = ops.mlp_backward(
        g, out, x, [], f.w1, f.b1, f.w2, f.b2, 0, 0, 1 / 3, 3, 3, 1, 1.0
    )
    assert report.shape == (3,) and report[2] == 0 and 0 < report[0] < 1.0


# -------------------------------------------------------- engine="auto" without the extension
_AUTO_ENGINE = r"""
import sys, warnings
{setup}
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("{filter}")
    import resode
    from resode.stack import ResidualStack
    {patch}
    for _ in range(3):
        model = resode.models.create("tiny_resnet", depth=2, channels=2, engine="auto")
        assert type(model.layer1) is ResidualStack, type(model.layer1)
mine = [w for w in caught if issubclass(w.category, RuntimeWarning) and "resode" in str(w.message)]
print("warnings", len(mine), [str(w.message)[:600] for w in mine])
print("ok")
"""


@pytest.mark.parametrize(
    "case,expected",
    [("disabled", 0), ("load fails", 1), ("no CUDA kernels", 1)],
)
def test_auto_engine_warns_once_when_the_extension_cannot_run(case, expected):
    """engine="auto" falls back to the generic engine with exactly one warning (three models
    built), and silently when RESODE_DISABLE_EXTENSION=1 turned the extension off."""
    setup, patch, env, filt = "", "", {}, "always"
    if case == "disabled":
        env = dict(RESODE_DISABLE_EXTENSION="1")
    elif case == "load fails":
        setup = "sys.modules['resode._C'] = None  # the prebuilt library cannot be imported"
        env = dict(RESODE_NO_JIT="1")
    else:  # a GPU is visible, the extension has no kernels for it
        patch = (
            "torch.cuda.is_available = lambda: True\n"
            "    resode.fused.available_for = lambda d='cpu': torch.device(d).type == 'cpu'"
        )
        filt = "default"  # Python's default filter: a repeated warning is shown once
    code = _AUTO_ENGINE.format(setup=setup, patch=patch, filter=filt)
    out = _run_child(code, **env)
    assert f"warnings {expected} " in out, out
    if case == "no CUDA kernels":
        assert "engine='generic'" in out and "CUDA" in out, out


def test_auto_engine_does_not_hide_errors(monkeypatch):
    """An error while building the fused stage is a bug: it propagates (no blanket except)."""

    def broken(stack):
        raise ValueError("broken from_generic")

    monkeypatch.setattr(fused.ConvStack, "from_generic", broken)
    with pytest.raises(ValueError, match="broken from_generic"):
        resode.models.create("tiny_resnet", depth=2, channels=2, engine="auto")


def test_paper_code_mode_runs_eagerly_under_torch_compile():
    """adjoint_paper_code's eval-mode switch is a side effect: the stage runs eagerly behind a
    graph break (no fullgraph), and the switch still happens."""
    f = fused.MLPStack(3, 5, 4, backward="adjoint_paper_code").double()
    g = f.to_generic()
    fn = torch.compile(nn.Sequential(nn.Identity(), f), backend="eager")
    x = torch.randn(4, 3, dtype=torch.float64)
    for stage, call in ((f, fn), (g, g)):
        xi = x.clone().requires_grad_(True)
        call(xi).square().sum().backward()
        stage.grad_x = xi.grad
    assert not f.training and f.last_backward.mode == "adjoint_paper_code"
    _assert_close(f.grad_x, g.grad_x, "input grad")
