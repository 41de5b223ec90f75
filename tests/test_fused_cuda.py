"""CUDA tests of the fused stages (run by benchmarks/gpu_check.sh; skipped without a GPU).

float32 parity with the generic engine on the same GPU: TF32 is turned off for both engines;
tolerance 1e-4 relative (outputs) and 2e-3 relative (input and parameter gradients, plus an
absolute floor of 1e-5 x the largest gradient norm for the conv biases in front of a
training-mode BatchNorm, whose exact gradient is zero). The two engines differ only in
summation order (our fused kernels vs cuDNN / PyTorch's BN), so the observed errors are ~1e-6.
bfloat16: forward and backward run, are finite, and agree with float32 to 5e-2 relative
(outputs) and 1e-1 relative (gradients; plus 2e-2 x the largest gradient norm as a floor).
refine / drift report / backward="auto" (issue 10 item 7): the same float32 tolerances for the
outputs and gradients; the reports agree in every field, and in drift and max_step_error to
1e-3 relative plus 1e-5 absolute (both are norms of differences of O(1) float32 tensors, so
their rounding error is ~1e-7 absolute, amplified by the reconstruction).
"""

from __future__ import annotations

import os

import pytest
import torch

from resode import _ext, _ops, fused

pytestmark = pytest.mark.cuda

SCHEMES = ("euler", "heun")
MODES = ("autograd", "adjoint")


@pytest.fixture(autouse=True)
def _need_cuda_extension():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    status = _ext.extension_available()
    if not status.cuda:
        if os.environ.get("RESODE_REQUIRE_EXTENSION", "") == "1":
            pytest.fail(
                f"RESODE_REQUIRE_EXTENSION=1 but the CUDA extension is unavailable: {status}"
            )
        pytest.skip(f"resode._C CUDA kernels unavailable: {status.reason}")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _grads(stage):
    return [p.grad.clone() for p in stage.parameters()]


def _step(stage, x, w):
    stage.zero_grad()
    xi = x.clone().requires_grad_(True)
    y = stage(xi)
    (y.float() * w).sum().backward()
    return y.detach(), xi.grad


def _compare(f, x_shape, pairs_fn, buffers=False):
    """Fused vs generic on the same GPU (one forward and backward); returns the generic stage."""
    g = f.to_generic()
    x = torch.randn(*x_shape, device="cuda")
    w = torch.randn(*x_shape, device="cuda")
    yf, gxf = _step(f, x, w)
    yg, gxg = _step(g, x, w)
    assert _rel(yf, yg) < 1e-4
    assert _rel(gxf, gxg) < 2e-3
    pairs = pairs_fn(f, g)
    scale = max(float(t.grad.norm()) for _, _, _, t in pairs)
    for name, fp, i, gp in pairs:
        err = float((fp.grad[i] - gp.grad).norm())
        assert err <= 2e-3 * float(gp.grad.norm()) + 1e-5 * scale, name
    if buffers:
        for i, blk in enumerate(g.blocks):
            assert _rel(f.bn1_running_mean[i], blk[1].running_mean) < 1e-4
            assert _rel(f.bn2_running_var[i], blk[4].running_var) < 1e-4
            assert int(f.bn1_num_batches_tracked[i]) == int(blk[1].num_batches_tracked)
    return g


def _mlp_pairs(f, g):
    out = []
    for i, blk in enumerate(g.blocks):
        out += [("w1", f.w1, i, blk[0].weight), ("w2", f.w2, i, blk[2].weight)]
        out += [("b1", f.b1, i, blk[0].bias), ("b2", f.b2, i, blk[2].bias)]
    return out


def _conv_pairs(f, g):
    out = []
    for i, blk in enumerate(g.blocks):
        for k, (conv, bn) in enumerate(((blk[0], blk[1]), (blk[3], blk[4])), start=1):
            out += [
                (f"conv{k}_weight", getattr(f, f"conv{k}_weight"), i, conv.weight),
                (f"conv{k}_bias", getattr(f, f"conv{k}_bias"), i, conv.bias),
                (f"bn{k}_weight", getattr(f, f"bn{k}_weight"), i, bn.weight),
                (f"bn{k}_bias", getattr(f, f"bn{k}_bias"), i, bn.bias),
            ]
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("tied", (False, True))
def test_mlp_parity_float32_cuda(scheme, backward, tied):
    f = fused.MLPStack(
        16, 32, 8, activation="tanh", scheme=scheme, backward=backward, tied=tied
    ).cuda()
    _compare(f, (64, 16), _mlp_pairs)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_activations_cuda(activation):
    f = fused.MLPStack(16, 32, 6, activation=activation, scheme="heun", backward="adjoint").cuda()
    _compare(f, (32, 16), _mlp_pairs)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("tied", (False, True))
def test_conv_parity_float32_cuda(scheme, backward, tied):
    f = fused.ConvStack(8, 4, scheme=scheme, backward=backward, tied=tied).cuda()
    with torch.no_grad():
        f.bn2_weight.uniform_(0.5, 1.5)
        f.bn1_bias.uniform_(-0.5, 0.5)
    _compare(f, (16, 8, 10, 10), _conv_pairs, buffers=True)


def test_conv_eval_mode_cuda():
    f = fused.ConvStack(8, 4, scheme="heun", backward="adjoint").cuda()
    with torch.no_grad():
        f.bn2_weight.uniform_(0.5, 1.5)
        f.bn1_running_var.uniform_(0.5, 2.0)
    f.eval()
    _compare(f, (8, 8, 6, 6), _conv_pairs)


@pytest.mark.parametrize("backward", MODES)
def test_bfloat16_sane(backward):
    for make, shape in (
        (
            lambda: fused.MLPStack(32, 64, 8, activation="tanh", scheme="heun", backward=backward),
            (64, 32),
        ),
        (lambda: fused.ConvStack(8, 4, scheme="euler", backward=backward), (16, 8, 8, 8)),
    ):
        torch.manual_seed(0)
        f32 = make().cuda()
        if isinstance(f32, fused.ConvStack):
            with torch.no_grad():
                f32.bn2_weight.fill_(1.0)
        fb = make().cuda()
        fb.load_state_dict(f32.state_dict())
        fb = fb.to(torch.bfloat16)
        x = torch.randn(*shape, device="cuda")
        w = torch.randn(*shape, device="cuda")
        y32, gx32 = _step(f32, x, w)
        yb, gxb = _step(fb, x.to(torch.bfloat16), w)
        assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
        assert _rel(yb, y32) < 5e-2
        assert torch.isfinite(gxb).all() and _rel(gxb, gx32) < 1e-1
        # conv biases in front of a training-mode BN have an exact gradient of zero: compare
        # with an absolute floor relative to the largest gradient
        scale = max(float(p.grad.double().norm()) for p in f32.parameters())
        for pb, p32 in zip(fb.parameters(), f32.parameters()):
            assert torch.isfinite(pb.grad).all()
            err = float((pb.grad.double() - p32.grad.double()).norm())
            assert err <= 1e-1 * float(p32.grad.double().norm()) + 2e-2 * scale


def test_cuda_bad_device_mix():
    f = fused.MLPStack(4, 4, 3).cuda()
    with pytest.raises(ValueError, match="cuda"):
        f(torch.randn(2, 4))
    ops = _ops.library()
    out, _ = ops.mlp_forward(
        torch.randn(2, 4, device="cuda"), f.w1, f.b1, f.w2, f.b2, 0, 0, 0.3, 3, 0, False
    )
    assert out.is_cuda
    with pytest.raises((TypeError, RuntimeError), match="device|cuda|cpu"):
        ops.mlp_forward(
            torch.randn(2, 4, device="cuda"), f.w1.cpu(), None, f.w2, None, 0, 0, 0.3, 3, 0, False
        )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reverse_cuda(scheme):
    """reverse() on the GPU = the generic reverse (float32, 1e-4 relative); BN stats untouched."""
    for f, shape in (
        (fused.MLPStack(16, 32, 8, activation="gelu", scheme=scheme).cuda(), (32, 16)),
        (fused.ConvStack(8, 4, scheme=scheme).cuda(), (8, 8, 6, 6)),
    ):
        if isinstance(f, fused.ConvStack):
            with torch.no_grad():
                f.bn2_weight.uniform_(0.5, 1.5)
        buffers = {k: v.clone() for k, v in f.state_dict().items()}
        y = torch.randn(*shape, device="cuda")
        xf, xg = f.reverse(y), f.to_generic().reverse(y)
        assert _rel(xf, xg) < 1e-4
        assert all(torch.equal(v, buffers[k]) for k, v in f.state_dict().items())


@pytest.mark.parametrize("mode,tol", [("adjoint", 1e-2), ("auto", 1e30), ("auto", 1e-30)])
@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_refine_drift_auto_parity_cuda(scheme, refine, mode, tol):
    """refine, the drift report and auto (kept / falling back) on the GPU = the generic engine
    on the same GPU (float32; tolerances in the module docstring)."""
    kw = dict(scheme=scheme, backward=mode, refine=refine, tol=tol)
    conv = fused.ConvStack(8, 4, **kw).cuda()
    with torch.no_grad():
        conv.bn2_weight.uniform_(0.5, 1.5)
    for f, shape, pairs in (
        (fused.MLPStack(16, 32, 8, activation="tanh", **kw).cuda(), (64, 16), _mlp_pairs),
        (conv, (16, 8, 10, 10), _conv_pairs),
    ):
        g = _compare(f, shape, pairs, buffers=isinstance(f, fused.ConvStack))
        rf, rg = f.last_backward, g.last_backward
        fields = ("mode", "exact", "fell_back", "refine", "num_steps", "tol")
        assert [getattr(rf, k) for k in fields] == [getattr(rg, k) for k in fields]
        assert rf.fell_back == (tol == 1e-30)
        for k in ("drift", "max_step_error"):
            a, b = getattr(rf, k), getattr(rg, k)
            assert abs(a - b) <= 1e-3 * abs(b) + 1e-5, (k, a, b)
        assert rf.drift_tensor.is_cuda and rf.drift_tensor.dtype == torch.float32


def test_auto_fallback_is_exact_cuda():
    """Step 1, strong residuals: auto falls back and returns the exact mode's gradients."""
    torch.manual_seed(0)
    f = fused.ConvStack(8, 4, step=1.0).cuda()
    with torch.no_grad():
        f.bn2_weight.normal_(0.0, 3.0)
    x = torch.randn(16, 8, 8, 8, device="cuda")
    w = torch.randn_like(x)
    grads = {}
    for mode in ("autograd", "auto"):
        f.backward = mode
        _, gx = _step(f, x, w)
        grads[mode] = torch.cat([gx.flatten()] + [p.grad.flatten() for p in f.parameters()])
    assert f.last_backward.fell_back and f.last_backward.exact
    assert _rel(grads["auto"], grads["autograd"]) < 1e-5


def test_sqdist_max_kernel_cuda():
    """The drift check's reduction: acc = max(acc, sum((a - b)^2)), deterministic, nan kept."""
    lib = _ops.library()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        a = torch.randn(3_000_001, device="cuda").to(dtype)  # more blocks than partial sums
        b = torch.randn(3_000_001, device="cuda").to(dtype)
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        acc = torch.zeros(1, device="cuda", dtype=acc_dtype)
        lib._sqdist_max(a, b, acc)
        ref = (a.double() - b.double()).square().sum()
        assert abs(float(acc) - float(ref)) <= 1e-5 * float(ref)
        first = acc.clone()
        lib._sqdist_max(a[:10], b[:10], acc)  # smaller: the max keeps the first value
        assert torch.equal(acc, first)
        lib._sqdist_max(a, b, acc)
        assert torch.equal(acc, first)  # same order of summation: the same bits
        lib._sqdist_max(a.clone().fill_(float("nan")), b, acc)
        assert torch.isnan(acc).all()


def test_bfloat16_auto_and_refine_run_cuda():
    f = fused.MLPStack(32, 64, 8, scheme="heun", backward="auto", refine=1).cuda()
    f = f.to(torch.bfloat16)
    x = torch.randn(64, 32, device="cuda")
    y, gx = _step(f, x.to(torch.bfloat16), torch.randn(64, 32, device="cuda"))
    assert torch.isfinite(gx).all() and all(torch.isfinite(p.grad).all() for p in f.parameters())
    r = f.last_backward
    assert r.drift_tensor.dtype == torch.float32 and r.drift >= 0 and r.max_step_error >= 0


@pytest.mark.parametrize("backward", [*MODES, "auto"])
def test_torch_compile_cuda(backward):
    """torch.compile (inductor, fullgraph) of both fused stages on the GPU: outputs, input and
    parameter gradients and BN buffers match eager mode (float32, 1e-5 relative); auto falls
    back inside the compiled backward."""
    import copy

    kw = dict(refine=1, tol=1e-30) if backward == "auto" else {}  # auto falls back
    for eager, shape in (
        (fused.MLPStack(16, 32, 6, scheme="heun", backward=backward, **kw).cuda(), (32, 16)),
        (
            fused.ConvStack(8, 3, backward=backward, zero_init_last_bn=False, **kw).cuda(),
            (8, 8, 6, 6),
        ),
    ):
        compiled = copy.deepcopy(eager)
        fn = torch.compile(compiled, fullgraph=True)
        x = torch.randn(*shape, device="cuda")
        w = torch.randn(*shape, device="cuda")
        y_ref, gx_ref = _step(eager, x, w)
        y, gx = _step(fn, x, w)  # the compiled module (parameters shared with `compiled`)
        assert _rel(y, y_ref) < 1e-5 and _rel(gx, gx_ref) < 1e-5
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            err = float((p.grad - q.grad).norm())
            assert err <= 1e-5 * float(q.grad.norm()) + 1e-7, name
        for (name, b), c in zip(compiled.named_buffers(), eager.buffers()):
            same = _rel(b, c) < 1e-5 if b.is_floating_point() else torch.equal(b, c)
            assert same, name


# ---------------------------------------------------------------------------------------------
# CUDA graphs (csrc/graphs.h): the graphable calls (forward without stored contexts, the adjoint
# part of backward "adjoint" / "auto", reverse) are run eagerly for a new key, then captured and
# replayed. Graphs on and off (RESODE_CUDA_GRAPHS=0) run the same kernels, so they agree to
# 1e-5 relative (float32; plus 1e-6 x the largest gradient norm for the conv biases in front of
# a training-mode BatchNorm, whose exact gradient is zero, and for cuDNN's weight-gradient
# algorithms, which may sum in a different order from run to run).

GRAPH_BATCHES = (0, 0, 0, 1, 0)  # eager, capture + replay, replay, a new key (eager), replay


def _graph_stats():
    return list(_ops.library().graph_cache_stats())


def _graph_run(kind, scheme, backward, graphs, monkeypatch):
    """Five train steps (batches GRAPH_BATCHES) with an in-place SGD update after each, then a
    reverse pass; returns every output, input gradient, parameter gradient and BN buffer."""
    monkeypatch.setenv("RESODE_CUDA_GRAPHS", "1" if graphs else "0")
    lib = _ops.library()
    lib.clear_graph_cache()
    torch.manual_seed(0)
    if kind == "mlp":
        f = fused.MLPStack(256, 32, 8, activation="tanh", scheme=scheme, backward=backward)
        shapes = ((64, 256), (48, 256))
    else:
        f = fused.ConvStack(4, 4, scheme=scheme, backward=backward, zero_init_last_bn=False)
        shapes = ((8, 4, 8, 8), (6, 4, 8, 8))
    f = f.cuda()
    record = []
    for b in GRAPH_BATCHES:
        x = torch.randn(*shapes[b], device="cuda")
        w = torch.randn(*shapes[b], device="cuda")
        y, gx = _step(f, x, w)
        record += [("y", y), ("gx", gx)]
        record += [(f"grad {n}", p.grad.clone()) for n, p in f.named_parameters()]
        record += [(f"buffer {n}", t.clone()) for n, t in f.named_buffers()]
        record.append(("drift", f.last_backward.drift_tensor.clone()))
        with torch.no_grad():  # in place: the replay must read the new weights
            for p in f.parameters():
                p.sub_(0.1 * p.grad)
    for _ in range(3):
        record.append(("reverse", f.reverse(torch.randn(*shapes[0], device="cuda"))))
    return record, _graph_stats()


@pytest.mark.parametrize("kind", ("mlp", "conv"))
@pytest.mark.parametrize("backward", ("adjoint", "auto"))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_graphs_match_eager(kind, scheme, backward, monkeypatch):
    """Graph replay = eager: outputs, input and parameter gradients, BN running statistics and
    num_batches_tracked, drift, reverse; across in-place parameter updates and a batch-size
    change (a new key), with the cache's counts checked (so the replay really ran)."""
    eager, off_stats = _graph_run(kind, scheme, backward, False, monkeypatch)
    graphed, on_stats = _graph_run(kind, scheme, backward, True, monkeypatch)
    assert off_stats == [0, 0, 0, 0]
    # keys: forward and backward at two batch sizes, reverse; captures: forward, backward (at
    # the first batch size) and reverse; replays: forward and backward at steps 2, 3, 5, and
    # reverse twice
    assert on_stats == [5, 3, 8, 0]
    scale = max(float(t.norm()) for name, t in eager if name.startswith("grad"))
    assert [n for n, _ in graphed] == [n for n, _ in eager]
    for (name, a), (_, b) in zip(graphed, eager):
        if not b.is_floating_point():
            assert torch.equal(a, b), name
            continue
        err = float((a.double() - b.double()).norm())
        floor = 1e-6 * scale if name.startswith("grad") else 1e-7
        assert err <= 1e-5 * float(b.double().norm()) + floor, (name, err)


def test_cuda_graphs_key_tracks_parameters(monkeypatch):
    """A parameter replaced by a new tensor (a new data pointer) is a new key: the stale graph
    is not replayed."""
    monkeypatch.setenv("RESODE_CUDA_GRAPHS", "1")
    lib = _ops.library()
    lib.clear_graph_cache()
    f = fused.MLPStack(256, 32, 4, scheme="euler", backward="adjoint").cuda()
    x = torch.randn(16, 256, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            f(x)
        old = f(x)
        f.w2 = torch.nn.Parameter(f.w2.detach() * 2.0)  # not in place
        new = f(x)
        ref = f.to_generic()(x)
    assert _rel(new, ref) < 1e-4 and _rel(new, old) > 1e-3
    assert _graph_stats()[0] == 2


# The persistent kernel of narrow MLP stages (csrc/mlp_persistent.cu): one launch per depth loop
# for float32 / bfloat16 stages with dim, hidden <= 128. Compared with the generic engine and
# with the fused cuBLAS path (RESODE_PERSISTENT_MLP=0) on the same GPU, float32 without TF32,
# with the tolerances of the module docstring.

# (dim, hidden, batch, depth, tied, bias, activation); batch 37 is not a multiple of the tile
PERSISTENT_CASES = [
    (128, 128, 64, 3, False, True, "tanh"),
    (64, 32, 37, 64, True, False, "relu"),
    (64, 32, 37, 64, False, True, "gelu"),
    (128, 128, 37, 3, True, False, "gelu"),
    (32, 64, 128, 16, False, False, "relu"),
]
# (backward, tol): the adjoint; auto keeping its adjoint pass; auto falling back
PERSISTENT_MODES = [("adjoint", 1.0), ("auto", 1e30), ("auto", 1e-30)]


def _persistent_run(stage, x, w):
    """Output, input gradient, parameter gradients and report of one forward and backward."""
    y, gx = _step(stage, x, w)
    grads = [p.grad.clone() for p in stage.parameters()]
    return y, gx, grads, stage.last_backward


def _both_paths(monkeypatch, fn):
    """fn() with the persistent kernel (the default) and with RESODE_PERSISTENT_MLP=0."""
    monkeypatch.delenv("RESODE_PERSISTENT_MLP", raising=False)
    fast = fn()
    monkeypatch.setenv("RESODE_PERSISTENT_MLP", "0")
    try:
        slow = fn()
    finally:
        monkeypatch.delenv("RESODE_PERSISTENT_MLP", raising=False)
    return fast, slow


def _generic_mlp_grads(f, g):
    """The generic stage's parameter gradients in the fused stage's layout (P, ...) and order."""
    where = {"w1": (0, "weight"), "b1": (0, "bias"), "w2": (2, "weight"), "b2": (2, "bias")}
    out = []
    for name, _ in f.named_parameters():
        layer, attr = where[name]
        out.append(torch.stack([getattr(blk[layer], attr).grad for blk in g.blocks]))
    return out


def _assert_same_step(a, b):
    (ya, gxa, ga, ra), (yb, gxb, gb, rb) = a, b
    assert _rel(ya, yb) < 1e-4
    assert _rel(gxa, gxb) < 2e-3
    scale = max(float(t.norm()) for t in gb)
    assert len(ga) == len(gb)
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert p.shape == q.shape and p.dtype == q.dtype, i
        assert float((p - q).norm()) <= 2e-3 * float(q.norm()) + 1e-5 * scale, i
    assert ra.fell_back == rb.fell_back
    for k in ("drift", "max_step_error"):
        va, vb = getattr(ra, k), getattr(rb, k)
        assert abs(va - vb) <= 1e-3 * abs(vb) + 1e-5, (k, va, vb)


@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("mode,tol", PERSISTENT_MODES)
@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_persistent_mlp_parity_cuda(monkeypatch, scheme, refine, mode, tol, case):
    """Forward, reconstruction adjoint (input and parameter gradients) and drift report of the
    persistent kernel = the cuBLAS path and the generic engine on the same GPU."""
    dim, hidden, batch, depth, tied, bias, act = case
    torch.manual_seed(0)
    f = fused.MLPStack(
        dim,
        hidden,
        depth,
        activation=act,
        scheme=scheme,
        backward=mode,
        tied=tied,
        refine=refine,
        tol=tol,
        bias=bias,
    ).cuda()
    x = torch.randn(batch, dim, device="cuda")
    w = torch.randn(batch, dim, device="cuda")
    fast, slow = _both_paths(monkeypatch, lambda: _persistent_run(f, x, w))
    assert fast[3].fell_back == (tol == 1e-30)
    _assert_same_step(fast, slow)
    g = f.to_generic()
    yg, gxg = _step(g, x, w)
    _assert_same_step(fast, (yg, gxg, _generic_mlp_grads(f, g), g.last_backward))


@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_persistent_mlp_reverse_cuda(monkeypatch, scheme, refine):
    """The reverse op: the persistent kernel = the cuBLAS path = the generic reverse."""
    torch.manual_seed(0)
    for case in PERSISTENT_CASES[:3]:
        dim, hidden, batch, depth, tied, bias, act = case
        f = fused.MLPStack(
            dim, hidden, depth, activation=act, scheme=scheme, tied=tied, bias=bias
        ).cuda()
        y = torch.randn(batch, dim, device="cuda")
        fast, slow = _both_paths(monkeypatch, lambda f=f, y=y: f.reverse(y, refine=refine))
        assert _rel(fast, slow) < 1e-4, case
        assert _rel(fast, f.to_generic().reverse(y, refine=refine)) < 1e-4, case


@pytest.mark.parametrize("scheme", SCHEMES)
def test_persistent_mlp_forward_op_cuda(monkeypatch, scheme):
    """The forward op without stored contexts (any mode) = the forward that stores them."""
    torch.manual_seed(0)
    ops = _ops.library()
    sid = 0 if scheme == "euler" else 1
    for case in PERSISTENT_CASES:
        dim, hidden, batch, depth, tied, bias, act = case
        f = fused.MLPStack(dim, hidden, depth, activation=act, tied=tied, bias=bias).cuda()
        x = torch.randn(batch, dim, device="cuda")
        aid = ("tanh", "relu", "gelu").index(act)

        def run(save, f=f, x=x, aid=aid, depth=depth):
            with torch.no_grad():
                y, stored = ops.mlp_forward(
                    x, f.w1, f.b1, f.w2, f.b2, aid, sid, 1.0 / depth, depth, 0, save
                )
            assert bool(stored) == save
            return y

        fast, slow = _both_paths(monkeypatch, lambda run=run: run(False))
        assert _rel(fast, slow) < 1e-4 and _rel(fast, run(True)) < 1e-4, case


def test_persistent_mlp_dispatch_cuda(monkeypatch):
    """The persistent kernels run by default and not with RESODE_PERSISTENT_MLP=0 (read at call
    time), nor for a stage too wide for them."""
    from torch.profiler import ProfilerActivity, profile

    names = ("persistent_forward_kernel", "persistent_adjoint_kernel", "persistent_reverse_kernel")

    def kernels(f, x):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _step(f, x, torch.ones_like(x))
            f.reverse(x)
            torch.cuda.synchronize()
        return {e.name for e in prof.events() if any(k in e.name for k in names)}

    f = fused.MLPStack(64, 64, 8, scheme="heun", backward="adjoint").cuda()
    x = torch.randn(32, 64, device="cuda")
    fast, slow = _both_paths(monkeypatch, lambda: kernels(f, x))
    for name in names:
        assert any(name in k for k in fast), (name, fast)
    assert not slow
    wide = fused.MLPStack(512, 64, 4, scheme="heun", backward="adjoint").cuda()
    assert not kernels(wide, torch.randn(16, 512, device="cuda"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_persistent_mlp_too_wide_falls_back_cuda(scheme):
    """dim 512 (no fit in shared memory): the cuBLAS path, still equal to the generic engine."""
    torch.manual_seed(0)
    f = fused.MLPStack(512, 64, 4, scheme=scheme, backward="adjoint").cuda()
    _compare(f, (16, 512), _mlp_pairs)


@pytest.mark.parametrize("mode", ["adjoint", "auto"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_persistent_mlp_bfloat16_cuda(scheme, mode):
    """bfloat16 stages through the persistent kernel (float32 arithmetic) agree with float32
    (the bfloat16 tolerances of the module docstring)."""
    torch.manual_seed(0)
    f32 = fused.MLPStack(64, 64, 16, scheme=scheme, backward=mode, tol=1e30).cuda()
    fb = fused.MLPStack(64, 64, 16, scheme=scheme, backward=mode, tol=1e30).cuda()
    fb.load_state_dict(f32.state_dict())
    fb = fb.to(torch.bfloat16)
    x = torch.randn(37, 64, device="cuda")
    w = torch.randn(37, 64, device="cuda")
    y32, gx32 = _step(f32, x, w)
    yb, gxb = _step(fb, x.to(torch.bfloat16), w)
    assert yb.dtype == torch.bfloat16 and _rel(yb, y32) < 5e-2
    assert gxb.dtype == torch.bfloat16 and _rel(gxb, gx32) < 1e-1
    scale = max(float(p.grad.double().norm()) for p in f32.parameters())
    for pb, p32 in zip(fb.parameters(), f32.parameters()):
        assert pb.grad.dtype == torch.bfloat16 and torch.isfinite(pb.grad).all()
        err = float((pb.grad.double() - p32.grad.double()).norm())
        assert err <= 1e-1 * float(p32.grad.double().norm()) + 2e-2 * scale
    r = fb.last_backward
    assert r.drift_tensor.dtype == torch.float32 and r.drift >= 0 and r.max_step_error >= 0
    xr = fb.reverse(yb)
    assert xr.dtype == torch.bfloat16 and _rel(xr, f32.reverse(y32)) < 5e-2
