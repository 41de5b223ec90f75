"""The generic engine: exactness of autograd mode, convergence of the adjoint, correctness rules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    BACKWARDS,
    DEVICES,
    SCHEMES,
    flat_rel,
    mlp_block,
    mlp_blocks,
    rel,
)
from torch import nn

import resode
from resode.diagnostics import saved_tensor_bytes
from resode.utils import loglog_slope

DEPTHS = (8, 16, 32, 64, 128, 256)


def _grads(stack, x, *args, w=None):
    """Gradients of a fixed quadratic+linear loss w.r.t. input, extra args and parameters."""
    y = stack(x, *args)
    w = torch.ones_like(y) if w is None else w
    loss = (y * w).sum() + 0.5 * (y**2).sum()
    inputs = [x, *args, *stack.parameters()]
    return y, torch.autograd.grad(loss, inputs)


def _adjoint_error(scheme, depth, smooth, seed=1):
    blocks = mlp_blocks(depth, smooth=smooth, seed=seed)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(16, 6, dtype=torch.float64, generator=gen)
    g = {}
    for mode in BACKWARDS:
        _, g[mode] = _grads(resode.ResidualStack(blocks, scheme=scheme, backward=mode), x, w=w)
    return flat_rel(g["adjoint"], g["autograd"])


@pytest.mark.parametrize(
    "scheme,smooth,max_slope",
    [("euler", False, -0.9), ("euler", True, -0.9), ("heun", True, -1.8)],
)
def test_adjoint_gradient_error_rate(scheme, smooth, max_slope):
    errs = [_adjoint_error(scheme, n, smooth) for n in DEPTHS]
    slope = loglog_slope(DEPTHS, errs)
    assert all(e > 0 for e in errs)
    assert slope <= max_slope, f"{scheme} smooth={smooth}: slope {slope:.2f}, errors {errs}"
    assert errs[-1] < 1e-2


def _hand_loop(blocks, scheme, x, h):
    if scheme == "euler":
        for f in blocks:
            x = x + h * f(x)
        return x
    for f, g in zip(blocks[:-1], blocks[1:]):
        k1 = f(x)
        k2 = g(x + h * k1)
        x = x + h / 2 * (k1 + k2)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_autograd_mode_equals_hand_written_loop(scheme, device):
    blocks = [b.to(device) for b in mlp_blocks(10, seed=2)]
    x = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    stack = resode.ResidualStack(blocks, scheme=scheme, backward="autograd")
    y, g = _grads(stack, x)
    y_ref = _hand_loop(blocks, scheme, x, 1 / 10)
    g_ref = torch.autograd.grad((y_ref + 0.5 * y_ref**2).sum(), [x, *stack.parameters()])
    assert rel(y, y_ref) < 1e-14
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-13


@pytest.mark.parametrize("scheme,order", [("euler", 1), ("heun", 2)])
def test_convergence_order_against_matrix_exponential(scheme, order):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64, generator=gen) / 2
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    exact = x @ torch.linalg.matrix_exp(a).T
    depths = (8, 16, 32, 64, 128)
    errs = []
    for n in depths:
        lin = nn.Linear(4, 4, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(a)
        steps = resode.get_scheme(scheme).num_steps(n)
        stack = resode.ResidualStack(lin, tied=True, depth=n, scheme=scheme, step=1.0 / steps)
        with torch.no_grad():
            errs.append(rel(stack(x), exact))
    slope = loglog_slope(depths, errs)
    assert abs(slope + order) < 0.15, f"{scheme}: slope {slope:.3f}, errors {errs}"
    assert resode.get_scheme(scheme).order == order


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adjoint_memory_is_constant_in_depth(scheme):
    def saved(mode, depth):
        stack = resode.ResidualStack(mlp_block(32, 16), tied=True, depth=depth, scheme=scheme)
        stack.backward = mode
        x = torch.randn(64, 32, requires_grad=True)
        return saved_tensor_bytes(stack, x, exclude=list(stack.parameters()))

    small, large = saved("adjoint", 8), saved("adjoint", 512)
    assert small > 0
    assert abs(large - small) <= 0.05 * small, (small, large)
    a8, a64, a512 = saved("autograd", 8), saved("autograd", 64), saved("autograd", 512)
    # linear growth: equal increments per added block
    per_block_small = (a64 - a8) / 56
    per_block_large = (a512 - a64) / 448
    assert per_block_small > 0
    assert abs(per_block_large - per_block_small) <= 0.05 * per_block_small
    assert a512 > 50 * large


def _bn_block(c=4):
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
    ).double()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_batchnorm_running_stats_and_modes(scheme):
    torch.manual_seed(0)
    blocks = [_bn_block() for _ in range(16)]
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    results = {}
    for mode in BACKWARDS:
        bl = copy.deepcopy(blocks)
        stack = resode.ResidualStack(bl, scheme=scheme, backward=mode).train()
        y, g = _grads(stack, x)
        results[mode] = (stack, g)
        assert all(m.training for m in stack.modules()), "backward changed a .training flag"
    ref, adj = results["autograd"][0], results["adjoint"][0]
    for (name, b_ref), (_, b_adj) in zip(ref.named_buffers(), adj.named_buffers()):
        assert torch.equal(b_ref, b_adj), name
    # one update per forward evaluation, none from the backward: Euler evaluates each block
    # once; Heun evaluates inner blocks twice and the two end blocks once.
    for n in range(16):
        expected = 1 if scheme == "euler" or n in (0, 15) else 2
        for bn in (adj.block(n)[1], adj.block(n)[4]):
            assert int(bn.num_batches_tracked) == expected
    # the recomputation really uses batch statistics: gradients close to exact ones
    assert flat_rel(results["adjoint"][1], results["autograd"][1]) < 0.05
    # eval mode (running statistics) works in adjoint mode too
    adj.eval()
    y, g = _grads(adj, x)
    assert torch.isfinite(y).all()
    assert not any(m.training for m in adj.modules())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dropout_masks_are_replayed(scheme):
    def block():
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 6))

    torch.manual_seed(0)
    blocks = [block().double() for _ in range(64)]
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)

    def grads(mode, preserve_rng=None):
        stack = resode.ResidualStack(
            blocks, scheme=scheme, backward=mode, preserve_rng=preserve_rng
        )
        torch.manual_seed(42)
        return _grads(stack, x)

    y_ref, g_ref = grads("autograd")
    y_adj, g_adj = grads("adjoint")
    assert torch.equal(y_ref, y_adj)  # same masks in the forward of both modes
    assert flat_rel(g_adj, g_ref) < 0.02
    # control: without replay the recomputation draws new masks and the gradients are wrong
    _, g_bad = grads("adjoint", preserve_rng=False)
    assert flat_rel(g_bad, g_ref) > 0.2
    # the global RNG stream advances identically in both modes
    torch.manual_seed(7)
    resode.ResidualStack(blocks, scheme=scheme, backward="adjoint")(x)
    a = torch.rand(3)
    torch.manual_seed(7)
    resode.ResidualStack(blocks, scheme=scheme, backward="autograd")(x)
    assert torch.equal(a, torch.rand(3))


class _Cond(nn.Module):
    """A block with an extra (conditioning) argument: f(x, c) = W2 tanh(W1 x + c)."""

    def __init__(self, dim=6, hidden=12):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, c):
        return self.l2(torch.tanh(self.l1(x) + c))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_extra_args_and_tied_weights_get_gradients(scheme):
    c = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    errs = []
    depths = (16, 32, 64, 128)
    for n in depths:
        block = _Cond().double()
        g = {}
        for mode in BACKWARDS:
            stack = resode.ResidualStack(block, tied=True, depth=n, scheme=scheme, backward=mode)
            _, g[mode] = _grads(stack, x, c)
            assert len(g[mode]) == 2 + 4
        errs.append(flat_rel(g["adjoint"], g["autograd"]))
        # each gradient (input, extra arg, each tied parameter) individually close
        for a, b in zip(g["adjoint"], g["autograd"]):
            assert rel(a, b) < 20 / n
    assert loglog_slope(depths, errs) <= -0.9


@pytest.mark.parametrize("backward", BACKWARDS)
def test_input_without_grad_frozen_params_and_constant_args(backward):
    blocks = mlp_blocks(8)
    blocks[0][0].weight.requires_grad_(False)
    stack = resode.ResidualStack(blocks, backward=backward)
    x = torch.randn(4, 6, dtype=torch.float64)  # no grad
    y = stack(x)
    trainable = [p for p in stack.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.sum(), trainable)
    ref = resode.ResidualStack(blocks, backward="autograd")
    grads_ref = torch.autograd.grad(ref(x).sum(), trainable)
    assert flat_rel(grads, grads_ref) < 0.05
    # extra arg that does not require grad
    c = torch.randn(4, 12, dtype=torch.float64)
    cstack = resode.ResidualStack(_Cond().double(), tied=True, depth=8, backward=backward)
    xg = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(cstack(xg, c).sum(), [xg])
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_and_device_preserved(dtype, backward, device):
    stack = resode.ResidualStack([mlp_block(6, 12) for _ in range(4)], scheme="heun")
    stack = stack.to(device=device, dtype=dtype)
    stack.backward = backward
    x = torch.randn(3, 6, device=device, dtype=dtype, requires_grad=True)
    y = stack(x)
    assert y.dtype == dtype and y.device.type == device
    (gx,) = torch.autograd.grad(y.float().sum(), [x])
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all()


def test_no_grad_runs_plain_loop():
    stack = resode.ResidualStack(mlp_blocks(8), backward="adjoint")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = stack(x)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, resode.ResidualStack(mlp_blocks(8), backward="autograd")(x).detach())


def test_backward_mode_context_manager():
    model = nn.Sequential(
        resode.ResidualStack(mlp_blocks(4)), resode.ResidualStack(mlp_blocks(4), backward="adjoint")
    )
    with resode.backward_mode(model, "adjoint"):
        assert [s.backward for s in resode.stages(model)] == ["adjoint", "adjoint"]
    assert [s.backward for s in resode.stages(model)] == ["autograd", "adjoint"]


class _Shrink(nn.Module):
    def forward(self, x):
        return x[..., :-1]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="empty"):
        resode.ResidualStack([])
    with pytest.raises(ValueError, match=r"unknown scheme 'rk4'.*euler.*heun"):
        resode.ResidualStack(mlp_blocks(2), scheme="rk4")
    with pytest.raises(ValueError, match=r"unknown backward mode 'exact'.*autograd.*adjoint"):
        resode.ResidualStack(mlp_blocks(2), backward="exact")
    stack = resode.ResidualStack(mlp_blocks(2))
    with pytest.raises(ValueError, match="unknown backward mode"):
        stack.backward = "checkpoint"
    with pytest.raises(ValueError, match="at least 2"):
        resode.ResidualStack(mlp_blocks(1), scheme="heun")
    with pytest.raises(ValueError, match="at least 2"):
        resode.ResidualStack(mlp_block(6, 12), tied=True, depth=1, scheme="heun")
    with pytest.raises(TypeError, match="nn.Module"):
        resode.ResidualStack([mlp_block(6, 12), "relu"])
    with pytest.raises(TypeError, match="tied"):
        resode.ResidualStack(mlp_block(6, 12).double()[0])
    blocks = mlp_blocks(3)
    blocks[1] = _Shrink()
    with pytest.raises(ValueError, match=r"residual function 1 \(_Shrink\).*\(2, 6\).*\(2, 5\)"):
        resode.ResidualStack(blocks)(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="extra argument 0 is a float"):
        resode.ResidualStack(_Cond(), tied=True, depth=2)(torch.randn(2, 6), 1.0)
    with pytest.raises(ValueError, match="step must be"):
        resode.ResidualStack(mlp_blocks(2), step=-1.0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adjoint_stored_variant_is_closer_than_chained(scheme):
    """The paper's public-code variant (reconstruct from stored outputs) hides accumulated error."""
    blocks = mlp_blocks(16, seed=4, scale=2.0)
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    g = {}
    for mode in ("autograd", "adjoint", "adjoint_stored"):
        _, g[mode] = _grads(resode.ResidualStack(blocks, scheme=scheme, backward=mode), x)
    e_chained = flat_rel(g["adjoint"], g["autograd"])
    e_stored = flat_rel(g["adjoint_stored"], g["autograd"])
    assert 0 < e_stored < e_chained


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stage_api(scheme):
    blocks = mlp_blocks(6, seed=5)
    stack = resode.ResidualStack(blocks, scheme=scheme, step=0.01)
    assert (stack.depth, stack.step, stack.tied) == (6, 0.01, False)
    assert stack.num_steps == (6 if scheme == "euler" else 5)
    assert all(stack.block(n) is blocks[n] for n in range(6))
    assert stack.stage_kwargs() == dict(
        scheme=scheme, backward="autograd", step=0.01, tied=False, refine=0, tol=1e-2
    )
    with pytest.raises(AttributeError):
        stack.tied = True  # fixed at construction (the blocks depend on it)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        y = stack(x)
    assert torch.equal(stack.integrate(x), y)
    # the reverse steps undo the forward up to a local error O(h^2) per step (at least)
    small = resode.ResidualStack(blocks, scheme=scheme, step=0.001)
    with torch.no_grad():
        errs = [rel(s.reverse(s.integrate(x)), x) for s in (stack, small)]
    assert 0 < errs[1] < errs[0] / 50, errs
    tied = resode.ResidualStack(blocks[0], depth=4, tied=True, scheme=scheme, backward="adjoint")
    assert tied.block(3) is blocks[0] and tied.stage_kwargs()["step"] is None
    rebuilt = resode.ResidualStack(blocks[0], depth=4, **tied.stage_kwargs())
    assert rebuilt.tied and rebuilt.backward == "adjoint" and rebuilt.step == 0.25


@pytest.mark.parametrize("mode", ["adjoint", "adjoint_stored"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_adjoint_takes_an_explicit_problem(scheme, mode):
    """The adjoint needs no ResidualStack: scheme, step, block function and parameters suffice."""
    from resode._adjoint import AdjointProblem, ReconstructionAdjoint
    from resode._stored_adjoint import StoredReconstructionAdjoint

    function = {"adjoint": ReconstructionAdjoint, "adjoint_stored": StoredReconstructionAdjoint}
    blocks = mlp_blocks(8, seed=6)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    c = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [p for b in blocks for p in b.parameters()]

    def step_fn(n, args):
        return lambda i, z: blocks[i](z) * args[0]

    problem = AdjointProblem(
        scheme=resode.get_scheme(scheme),
        h=1 / 8,
        num_steps=resode.get_scheme(scheme).num_steps(8),
        step_fn=step_fn,
        block_params=lambda i: blocks[i].parameters(),
        n_args=1,
    )
    y = function[mode].apply(problem, x, c, *params)
    g = torch.autograd.grad(y.square().sum(), [x, c, *params])

    class Scaled(nn.Module):  # the same residual functions as a ResidualStack
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, z, s):
            return self.block(z) * s

    stack = resode.ResidualStack([Scaled(b) for b in blocks], scheme=scheme, backward=mode)
    y_ref = stack(x, c)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, c, *stack.parameters()])
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))
    stack.backward = "autograd"
    g_exact = torch.autograd.grad(stack(x, c).square().sum(), [x, c, *stack.parameters()])
    assert 0 < flat_rel(g, g_exact) < 0.5


def _module_imports(path, top_level_only):
    import ast

    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            out |= {f"{'.' * node.level}{node.module or ''}:{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_adjoint_modules_do_not_import_the_stack():
    """The stack imports the adjoints at the top; they never import it back (no cycle)."""
    import pathlib

    root = pathlib.Path(resode.__file__).parent
    for name in (
        "_adjoint.py",
        "_stored_adjoint.py",
        "_auto.py",
        "_paper_adjoint.py",
        "_recompute.py",
        "schemes.py",
    ):
        imports = _module_imports(root / name, top_level_only=False)
        assert not [i for i in imports if "stack" in i], (name, imports)
    stack_imports = _module_imports(root / "stack.py", top_level_only=True)
    assert {"._adjoint:ReconstructionAdjoint", ".:_stored_adjoint"} <= stack_imports
    # and nothing is imported lazily inside stack.py's functions
    assert _module_imports(root / "stack.py", top_level_only=False) == stack_imports


# ----------------------------------------------------------------------------- bad inputs
def test_blocks_as_list_tuple_or_modulelist_and_a_sequential_refused():
    blocks = mlp_blocks(4, seed=7)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = resode.ResidualStack(blocks)(x)
        for container in (tuple(blocks), nn.ModuleList(blocks)):
            assert torch.equal(resode.ResidualStack(container)(x), ref)
    # a Sequential is one residual function: its layers are not N residual functions
    msg = r"one module \(Sequential\).*depth=N, tied=True.*from_factory.*\[block1, block2, \.\.\.\]"
    with pytest.raises(TypeError, match=msg):
        resode.ResidualStack(nn.Sequential(*blocks))
    one = mlp_block(6, 12).double()
    with pytest.raises(TypeError, match=msg):
        resode.ResidualStack(one)
    # ... applied N times when tied: x <- x + f(x) / N
    hand = x
    for _ in range(3):
        hand = hand + one(hand) / 3
    with torch.no_grad():
        torch.testing.assert_close(
            resode.ResidualStack(one, depth=3, tied=True)(x), hand, rtol=0, atol=1e-15
        )


@pytest.mark.parametrize("step", [math.inf, -math.inf, math.nan, 0.0, -0.5, True, "0.1"])
def test_step_must_be_positive_and_finite(step):
    with pytest.raises(ValueError, match="step must be a positive finite number"):
        resode.ResidualStack(mlp_blocks(2), step=step)


@pytest.mark.parametrize("mode", ["adjoint", "adjoint_stored"])
def test_inplace_op_right_after_an_adjoint_stage(mode):
    blocks = mlp_blocks(8, seed=8)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def grads(backward, inplace):
        stack = resode.ResidualStack(blocks, backward=backward)
        y = nn.ReLU(inplace=inplace)(stack(x))
        return torch.autograd.grad(y.square().sum(), [x, *stack.parameters()])

    g_inplace, g_plain = grads(mode, True), grads(mode, False)
    assert all(torch.equal(a, b) for a, b in zip(g_inplace, g_plain))
    assert 0 < flat_rel(g_inplace, grads("autograd", True)) < 0.1


@pytest.mark.parametrize("mode", ["adjoint", "adjoint_stored"])
def test_double_backward_through_the_adjoint_raises(mode):
    stack = resode.ResidualStack(mlp_blocks(4, seed=9), backward=mode)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    inputs = [x, *stack.parameters()]
    msg = r"resode: .*differentiated twice \(create_graph=True.*backward='autograd'"
    with pytest.raises(RuntimeError, match=msg):
        torch.autograd.grad(stack(x).square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=msg):  # used to return None quietly at second order
        torch.autograd.grad(stack(x).square().sum(), inputs, create_graph=True, allow_unused=True)
    # the alternative the message names: autograd mode, a Hessian-vector product that matches
    # central finite differences of the gradient
    stack.backward = "autograd"
    v = torch.randn(3, 6, dtype=torch.float64)

    def grad_x(z, create_graph=False):
        return torch.autograd.grad(stack(z).square().sum(), z, create_graph=create_graph)[0]

    (hv,) = torch.autograd.grad((grad_x(x, True) * v).sum(), x)
    eps = 1e-5
    fd = (grad_x(x + eps * v) - grad_x(x - eps * v)) / (2 * eps)
    assert rel(hv, fd) < 1e-7
