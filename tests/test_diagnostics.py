"""resode.diagnostics: values, not shapes."""

from __future__ import annotations

import pytest
import torch
from helpers import SCHEMES, mlp_block, mlp_blocks
from torch import nn

import resode
from resode import diagnostics
from resode.utils import loglog_slope


@pytest.mark.parametrize("scheme,max_slope", [("euler", -0.9), ("heun", -1.8)])
def test_reconstruction_error_shrinks_with_depth(scheme, max_slope):
    depths = (8, 16, 32, 64, 128)
    x = torch.randn(8, 6, dtype=torch.float64)
    errs = [
        diagnostics.reconstruction_error(
            resode.ResidualStack(mlp_blocks(n, smooth=True), scheme=scheme), x
        )
        for n in depths
    ]
    assert loglog_slope(depths, errs) <= max_slope, errs


def test_reconstruction_error_is_exact_for_a_zero_stack_and_keeps_bn_stats():
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double() for _ in range(4)]
    for b in blocks:
        nn.init.zeros_(b[0].weight), nn.init.zeros_(b[0].bias)
        nn.init.zeros_(b[1].weight)
    stack = resode.ResidualStack(blocks).train()
    x = torch.randn(8, 4, dtype=torch.float64)
    assert diagnostics.reconstruction_error(stack, x) == 0.0
    assert all(int(b[1].num_batches_tracked) == 0 for b in blocks)


def test_gradient_error_matches_manual_computation():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6).double(),
        resode.ResidualStack(mlp_blocks(16, seed=3)),
        nn.Linear(6, 3).double(),
    )
    x = torch.randn(10, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (10,))
    out = diagnostics.gradient_error(model, x, t)
    with_bias = diagnostics.gradient_error(model, x, t, include_bias=True)
    params = list(model.parameters())
    g = {}
    for mode in ("autograd", "adjoint"):
        model[1].backward = mode
        loss = nn.functional.cross_entropy(model(x), t)
        g[mode] = torch.autograd.grad(loss, params)
    model[1].backward = "autograd"
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g["autograd"], g["adjoint"]):
        expected = float(((a - b) ** 2).mean() / (a**2).mean())
        assert with_bias["per_tensor"][name] == pytest.approx(expected, rel=1e-9)
        if name.endswith("bias"):  # left out by default, as in the paper's compare_gradients.py
            assert name not in out["per_tensor"] and name in out["excluded"]
        else:
            assert out["per_tensor"][name] == with_bias["per_tensor"][name]
    assert out["zero_grad"] == {} and with_bias["excluded"] == []
    # the head sees the exact forward output: its gradient is exact
    assert out["per_tensor"]["2.weight"] == 0.0
    assert out["per_tensor"]["1.blocks.0.0.weight"] > 0
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(g["autograd"], g["adjoint"]))
    den = sum(float((a**2).sum()) for a in g["autograd"])
    assert out["global_rel"] == pytest.approx((num / den) ** 0.5, rel=1e-9)
    assert with_bias["global_rel"] == out["global_rel"]  # unchanged by the per-tensor rules
    assert model[1].backward == "autograd"  # mode restored
    assert all(p.grad is None for p in params)  # .grad untouched


def _trained_tiny_resnet(depth=8, steps=30):
    """A tiny ResNet (generic, float64) trained a few SGD steps from a non-zero residual."""
    torch.manual_seed(0)
    model = resode.models.create("tiny_resnet", depth=depth, engine="generic", num_classes=4)
    model = model.double().train()
    for b in model.layer1.blocks:
        nn.init.normal_(b[4].weight, 0.0, 0.5)
    data = resode.data.get_dataset("synthetic", num_train=64, num_classes=4, image_size=16)
    x, y = data.train.images.double(), data.train.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_gradient_error_gives_no_relative_error_for_zero_exact_gradients():
    """Conv biases before a training-mode BatchNorm have a zero exact gradient: their relative
    error would be a ratio of rounding noises (the quick preset showed 3 to 21)."""
    model, x, y = _trained_tiny_resnet()
    with_bias = diagnostics.gradient_error(model, x, y, include_bias=True)
    conv_biases = {f"layer1.blocks.{i}.{j}.bias" for i in range(model.layer1.depth) for j in (0, 3)}
    assert conv_biases <= set(with_bias["zero_grad"])
    assert not conv_biases & set(with_bias["per_tensor"])
    # their exact gradients are indeed zero (rounding noise)
    named = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    total = torch.cat([g.reshape(-1) for g in grads.values()]).norm()
    assert all(grads[n].norm() < 1e-12 * total for n in conv_biases)
    assert all(grads[n].norm() > 1e-6 * total for n in with_bias["per_tensor"])
    # the model left its initialisation: real errors, none above 1
    assert max(with_bias["per_tensor"].values()) < 1
    assert with_bias["global_rel"] > 1e-6
    default = diagnostics.gradient_error(model, x, y)
    assert not any("bias" in n for n in default["per_tensor"]) and default["zero_grad"] == {}


def test_gradient_error_restores_bn_buffers():
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double() for _ in range(4)]
    model = nn.Sequential(resode.ResidualStack(blocks), nn.Linear(4, 2).double())
    before = {n: b.clone() for n, b in model.named_buffers()}
    diagnostics.gradient_error(model, torch.randn(8, 4, dtype=torch.float64), torch.zeros(8).long())
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stored_variant_error_is_smaller(scheme):
    model = nn.Sequential(resode.ResidualStack(mlp_blocks(16, seed=4, scale=2.0), scheme=scheme))
    x = torch.randn(10, 6, dtype=torch.float64)

    def loss_fn(y, t):
        return ((y - t) ** 2).sum()

    chained = diagnostics.gradient_error(model, x, torch.zeros(10, 6), loss_fn)
    stored = diagnostics.gradient_error(model, x, torch.zeros(10, 6), loss_fn, "adjoint_stored")
    assert 0 < stored["global_rel"] < chained["global_rel"]


def test_depth_smoothness_scales_like_one_over_depth_for_smooth_weights():
    smooth = [
        diagnostics.depth_smoothness(resode.ResidualStack(mlp_blocks(n, smooth=True)))
        for n in (16, 64)
    ]
    iid = [diagnostics.depth_smoothness(resode.ResidualStack(mlp_blocks(n))) for n in (16, 64)]
    # smooth: increments ~ 1/N, so N * increment stays put; iid: increments do not shrink
    assert smooth[1]["mean"] < smooth[0]["mean"] / 3
    assert smooth[1]["mean_scaled"] == pytest.approx(smooth[0]["mean_scaled"], rel=0.1)
    assert iid[1]["mean"] == pytest.approx(iid[0]["mean"], rel=0.3)
    tied = resode.ResidualStack(mlp_block(6, 12), tied=True, depth=8)
    assert diagnostics.depth_smoothness(tied)["max"] == 0.0


def test_saved_tensor_bytes_counts_unique_storages_and_excludes_parameters():
    lin = nn.Linear(100, 100)
    x = torch.randn(50, 100, requires_grad=True)

    def f(x):
        y = torch.tanh(lin(x))  # saves x (and the weight) and tanh's output
        return y * y  # saves y once for both operands

    counted = diagnostics.saved_tensor_bytes(f, x, exclude=list(lin.parameters()))
    assert counted == 2 * 50 * 100 * 4
    with_params = diagnostics.saved_tensor_bytes(f, x)
    assert with_params == counted + 100 * 100 * 4
