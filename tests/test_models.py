"""Models: registry smoke tests, surgery (untie / resample_depth), checkpoints across depths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import resode
from resode import models as M

BACKWARDS = ("autograd", "adjoint")

# small sizes for every registered entry: (kwargs, input shape)
SMALL = {
    "tiny_resnet": (dict(depth=3, engine="generic", num_classes=5), (2, 3, 16, 16)),
    "mlp_resnet": (dict(depth=3, dim=8, hidden=12, image_size=6, num_classes=5), (2, 1, 6, 6)),
    "resnet": (dict(layers=[2, 3, 1, 2], width=4, small_input=True, num_classes=5), (2, 3, 8, 8)),
}
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    SMALL[_name] = (dict(width=2, small_input=True, num_classes=5), (2, 3, 4, 4))


def _small(name: str, **kw) -> tuple[nn.Module, torch.Tensor]:
    base, shape = SMALL[name]
    return M.create(name, **{**base, **kw}), torch.randn(*shape)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: zero-initialised last BNs would hide most gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def test_every_entry_has_small_sizes():
    assert set(M.list()) == set(SMALL), "add new registry entries to SMALL"
    assert M.list() == M.list_models()
    assert {"tiny_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(
        M.list()
    )


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_registry_smoke(name, backward):
    torch.manual_seed(0)
    model, x = _small(name, backward=backward)
    _randomize(model)
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], 5)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {n} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {n} has an all-zero gradient"
    assert all(s.backward == backward for s in resode.stages(model))
    # forward = head(features), and the stage accessor finds the residual stacks
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
    assert model.residual_stacks() and all(isinstance(s, resode.Stage) for s in model.stages())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", ["tiny_resnet", "mlp_resnet", "resnet"])
def test_heun_and_tied_variants(name, tied):
    kw = dict(scheme="heun", tied=tied, backward="adjoint")
    if name == "resnet":
        kw["layers"] = [3, 3, 3, 3]
    torch.manual_seed(0)
    model, x = _small(name, **kw)
    _randomize(model)
    model(x).sum().backward()
    for s in model.residual_stacks():
        assert s.scheme.name == "heun" and s.tied == tied
        if tied:
            assert len(s.blocks) == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_heun_needs_two_functions_per_stage():
    with pytest.raises(ValueError, match="stage 1"):
        M.create("resnet18", width=2, small_input=True, scheme="heun")


def test_tied_resnet_parameters_do_not_depend_on_depth():
    a = M.create("resnet", layers=[2, 2, 2, 2], width=4, small_input=True, tied=True)
    b = M.create("resnet", layers=[5, 9, 3, 17], width=4, small_input=True, tied=True)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    assert [s.depth for s in b.residual_stacks()] == [4, 8, 2, 16]


def test_resnet_widths_and_stem():
    m = M.create("resnet50", width=8, num_classes=7)
    assert m.num_features == 8 * 8 * 4
    assert isinstance(m.stem[-1], nn.MaxPool2d)  # ImageNet stem
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    small = M.create("resnet50", width=8, small_input=True)
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in small.stem)
    # stage = ordinary block + stack with layers[i] - 1 residual functions, step 1/(layers[i]-1)
    assert [s.depth for s in small.residual_stacks()] == [2, 3, 5, 2]
    assert small.layer3.stack.step == pytest.approx(1 / 5)


def test_tiny_resnet_structure():
    m = M.create("tiny_resnet", depth=6, in_channels=1, engine="generic")
    conv = m.stem[0]
    assert (conv.kernel_size, conv.stride, conv.in_channels, conv.out_channels) == (
        (5, 5),
        (3, 3),
        1,
        16,
    )
    stack = m.layer1
    assert isinstance(stack, resode.ResidualStack) and stack.depth == 6
    assert stack.step == pytest.approx(1 / 6)
    for n in range(6):
        block = stack.block(n)
        assert [type(b) for b in block] == [
            nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d
        ]  # fmt: skip
        assert block[0].bias is not None and block[3].bias is not None
        assert torch.all(block[4].weight == 0)  # last BN zero-initialised
    # 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs both work
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # on 28x28 the adaptive pool is exactly the paper's AvgPool2d(4)
    feats = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(m.pool(feats), nn.AvgPool2d(4)(feats))


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ValueError, match="tiny_resnet"):
        M.create("no_such_net")
    with pytest.raises(ValueError, match="bad arguments"):
        M.create("tiny_resnet", no_such_arg=1)
    with pytest.raises(ValueError, match="engine"):
        M.create("tiny_resnet", engine="warp")


@pytest.mark.parametrize("name", ["tiny_resnet", "resnet18", "mlp_resnet"])
def test_config_rebuilds_the_model(name):
    model, x = _small(name, tied=True)
    cfg = model.config
    assert isinstance(cfg, M.ModelConfig) and cfg.name == name and cfg.kwargs["tied"] is True
    rebuilt = M.create(**dataclasses.asdict(cfg))
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x), rtol=0, atol=0)
    assert M.ModelConfig.from_dict(cfg.to_dict()) == cfg


def _fused_available() -> bool:
    ok = resode.fused.available_for("cpu")
    return ok and (not torch.cuda.is_available() or resode.fused.available_for("cuda"))


def test_engine_fused_without_extension_errors(monkeypatch):
    monkeypatch.setattr(resode.fused, "available_for", lambda device=None: False)
    for name in ("tiny_resnet", "mlp_resnet"):
        with pytest.raises(RuntimeError, match="engine='generic'"):
            M.create(name, depth=2, engine="fused")
        auto = M.create(name, depth=2, engine="auto")
        assert isinstance(auto.layer1, resode.ResidualStack)
        assert auto.config.kwargs["engine"] == "auto"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_takes_engine(name):
    with pytest.raises(ValueError, match=r"unknown engine 'warp'.*auto.*generic.*fused"):
        _small(name, engine="warp")
    model, _ = _small(name, engine="generic")
    assert model.config.kwargs["engine"] == "generic"
    assert all(isinstance(s, resode.ResidualStack) for s in model.residual_stacks())


@pytest.mark.parametrize("name", ["resnet", "resnet18"])
def test_resnet_family_has_no_fused_engine(name):
    with pytest.raises(ValueError, match=r"engine='fused'.*no fused stage.*engine='generic'"):
        _small(name, engine="fused")
    model, _ = _small(name, engine="auto")  # auto means generic here
    assert all(type(s) is resode.ResidualStack for s in model.residual_stacks())
    assert model.config.kwargs["engine"] == "auto"


def test_default_engines_are_unchanged():
    assert M.create("mlp_resnet", depth=2).config.kwargs["engine"] == "generic"
    assert isinstance(M.create("mlp_resnet", depth=2).layer1, resode.ResidualStack)
    assert M.create("tiny_resnet", depth=2).config.kwargs["engine"] == "auto"
    assert M.create("resnet18", width=2).config.kwargs["engine"] == "generic"


@pytest.mark.parametrize("backward", BACKWARDS)
def test_mlp_resnet_engine_fused_matches_generic(backward):
    if not _fused_available():
        pytest.skip("resode extension (fused MLPStack) not available")
    kw = dict(depth=5, dim=6, hidden=10, image_size=4, num_classes=3, backward=backward)
    torch.manual_seed(3)
    gen = M.create("mlp_resnet", engine="generic", **kw).double()
    torch.manual_seed(3)
    fused = M.create("mlp_resnet", engine="fused", **kw).double()
    assert isinstance(fused.layer1, resode.fused.MLPStack)
    assert fused.config.kwargs["engine"] == "fused"
    # same seed, same weights: the fused stage is built from the generic one
    ref = gen.layer1.state_dict()
    for k, v in fused.layer1.to_generic().state_dict().items():
        assert torch.equal(v, ref[k]), k
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    outs, grads = {}, {}
    for name, model in (("generic", gen), ("fused", fused)):
        out = model(x)
        outs[name] = out.detach()
        grads[name] = torch.autograd.grad(out.square().sum(), [model.embed.weight, model.fc.weight])
    torch.testing.assert_close(outs["fused"], outs["generic"], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads["fused"], grads["generic"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # checkpoints cross engines both ways
    g2 = M.create("mlp_resnet", engine="generic", **kw).double()
    g2.load_state_dict(fused.state_dict())
    f2 = M.create("mlp_resnet", engine="fused", **kw).double()
    f2.load_state_dict(gen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(g2(x), outs["generic"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f2(x), outs["generic"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_engine_fused_matches_generic(backward):
    if not _fused_available():
        pytest.skip("resode extension (fused ConvStack) not available")
    torch.manual_seed(0)
    gen = M.create("tiny_resnet", depth=4, engine="generic", backward=backward)
    torch.manual_seed(0)
    fused = M.create("tiny_resnet", depth=4, engine="fused", backward=backward)
    assert isinstance(fused.layer1, resode.fused.ConvStack)
    # the same seed gives the same weights under both engines (stem, stage and head)
    as_generic = M.create("tiny_resnet", depth=4, engine="generic")
    as_generic.load_state_dict(fused.state_dict())
    for k, v in gen.state_dict().items():
        assert torch.equal(as_generic.state_dict()[k], v), k
    _randomize(gen)
    fused.load_state_dict(gen.state_dict())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(fused(x), gen(x), rtol=1e-4, atol=1e-5)
    # checkpoints cross engines both ways
    gen.eval(), fused.eval()
    other = M.create("tiny_resnet", depth=4, engine="generic", backward=backward).eval()
    other.load_state_dict(fused.state_dict())
    other2 = M.create("tiny_resnet", depth=4, engine="fused", backward=backward).eval()
    other2.load_state_dict(gen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), gen(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(other2(x), gen(x), rtol=1e-4, atol=1e-5)


def test_surgery_on_fused_stages():
    if not _fused_available():
        pytest.skip("resode extension (fused ConvStack) not available")
    torch.manual_seed(0)
    tied = M.create("tiny_resnet", depth=3, tied=True, engine="fused").eval()
    _randomize(tied)
    x = torch.randn(2, 3, 16, 16)
    untied = M.untie(tied).eval()
    assert not untied.layer1.tied and type(untied.layer1) is type(tied.layer1)
    with torch.no_grad():
        torch.testing.assert_close(untied(x), tied(x), rtol=1e-5, atol=1e-6)
    deeper = M.resample_depth(untied, 6)
    assert deeper.layer1.depth == 6 and deeper.config.kwargs["depth"] == 6


# ----------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("scheme", ["euler", "heun"])
@pytest.mark.parametrize("name", ["tiny_resnet", "resnet"])
def test_untie_keeps_the_function(name, scheme):
    kw = dict(tied=True, scheme=scheme)
    if name == "resnet":
        kw["layers"] = [3, 4, 3, 3]
    else:
        kw["depth"] = 5
    torch.manual_seed(0)
    model, x = _small(name, **kw)
    _randomize(model)
    untied = M.untie(model)
    assert untied is not model and all(s.tied for s in model.residual_stacks())
    for s_t, s_u in zip(model.residual_stacks(), untied.residual_stacks(), strict=True):
        assert not s_u.tied and s_u.depth == s_t.depth and len(s_u.blocks) == s_t.depth
        assert s_u.step == s_t.step and s_u.scheme.name == scheme
        # every step has its own copy of the shared block
        ptrs = {p.data_ptr() for b in s_u.blocks for p in b.parameters()}
        assert len(ptrs) == s_u.depth * len(list(s_t.blocks[0].parameters()))
        for b in s_u.blocks:
            for p, q in zip(b.parameters(), s_t.blocks[0].parameters(), strict=True):
                assert torch.equal(p, q)
    assert untied.config.kwargs["tied"] is False
    for mode in ("eval", "train"):  # eval first: train mode updates the running statistics
        model.train(mode == "train"), untied.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(untied(x), model(x), rtol=0, atol=1e-6)
    rebuilt = M.create(**dataclasses.asdict(untied.config))
    rebuilt.load_state_dict(untied.state_dict())


def test_untie_gradient_is_the_tied_gradient_summed():
    torch.manual_seed(0)
    model, x = _small("mlp_resnet", tied=True, depth=4)
    untied = M.untie(model)
    model(x).sum().backward()
    untied(x).sum().backward()
    g_tied = model.layer1.blocks[0][0].weight.grad
    g_sum = sum(b[0].weight.grad for b in untied.layer1.blocks)
    torch.testing.assert_close(g_sum, g_tied, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("new_depth", [2, 3, 8, 11])
def test_resample_depth_copies_floor_blocks(new_depth):
    torch.manual_seed(0)
    model, x = _small("tiny_resnet", depth=4)
    _randomize(model)
    for i, b in enumerate(model.layer1.blocks):  # make every block distinguishable
        with torch.no_grad():
            b[0].bias.fill_(float(i))
    new = M.resample_depth(model, new_depth)
    s = new.layer1
    assert s.depth == new_depth and s.step == pytest.approx(1 / new_depth)
    for i in range(new_depth):
        src = model.layer1.block(i * 4 // new_depth)
        for p, q in zip(s.block(i).parameters(), src.parameters(), strict=True):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        for p, q in zip(s.block(i).buffers(), src.buffers(), strict=True):
            assert torch.equal(p, q)
    assert new.config.kwargs["depth"] == new_depth
    M.create(**dataclasses.asdict(new.config)).load_state_dict(new.state_dict())
    assert model.layer1.depth == 4  # input untouched
    assert new(x).shape == (2, 5)


def test_resample_depth_same_depth_is_identity_function():
    torch.manual_seed(0)
    model, x = _small("tiny_resnet", depth=4, scheme="heun")
    _randomize(model)
    model.eval()
    new = M.resample_depth(model, 4).eval()
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=0, atol=0)


def test_resample_depth_tied_and_per_stage():
    torch.manual_seed(0)
    model, x = _small("resnet", layers=[3, 3, 3, 3], tied=True)
    new = M.resample_depth(model, [4, 1, 7, 2])
    assert [s.depth for s in new.residual_stacks()] == [4, 1, 7, 2]
    for a, b in zip(model.residual_stacks(), new.residual_stacks(), strict=True):
        assert b.tied and len(b.blocks) == 1
        for p, q in zip(a.blocks[0].parameters(), b.blocks[0].parameters(), strict=True):
            assert torch.equal(p, q)
    assert new.config.name == "resnet" and new.config.kwargs["layers"] == [5, 2, 8, 3]
    M.create(**dataclasses.asdict(new.config)).load_state_dict(new.state_dict())
    with pytest.raises(ValueError, match="depths"):
        M.resample_depth(model, [2, 2])


def test_resample_named_entry_falls_back_to_generic_resnet():
    m = M.create("resnet34", width=2, small_input=True, num_classes=3)
    new = M.resample_depth(m, 2)
    assert new.config.name == "resnet"
    assert new.config.kwargs["layers"] == [3, 3, 3, 3]
    assert new.config.kwargs["block"] == "basic" and new.config.kwargs["num_classes"] == 3
    M.create(**dataclasses.asdict(new.config)).load_state_dict(new.state_dict())


def test_load_checkpoint_into_other_depth(tmp_path):
    torch.manual_seed(0)
    tied, x = _small("tiny_resnet", depth=4, tied=True)
    _randomize(tied)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": tied.state_dict(), "model_config": tied.config.to_dict()}, path)
    deep = M.create("tiny_resnet", **{**SMALL["tiny_resnet"][0], "depth": 9, "tied": True})
    M.load_checkpoint_into(deep, path)
    for (k, v), (k2, v2) in zip(tied.state_dict().items(), deep.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    # untied of another depth: refused unless resampling is asked for
    untied = M.untie(tied)
    torch.save({"model": untied.state_dict(), "model_config": untied.config.to_dict()}, path)
    target = M.create("tiny_resnet", **{**SMALL["tiny_resnet"][0], "depth": 8})
    with pytest.raises(ValueError, match="resample=True"):
        M.load_checkpoint_into(target, path)
    M.load_checkpoint_into(target, path, resample=True)
    for i in range(8):
        torch.testing.assert_close(
            target.layer1.block(i)[0].weight, untied.layer1.block(i * 4 // 8)[0].weight
        )
    with pytest.raises(ValueError, match="incompatible checkpoint"):
        M.load_checkpoint_into(M.create("mlp_resnet"), path)
