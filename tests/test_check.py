"""``resode.diagnostics.check`` and the ``resode check`` command (resode/check.py)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import flat_rel

import resode
from resode import check as cmd
from resode import diagnostics

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_resnet.py"


def _example():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import my_resnet
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return my_resnet.make_model().double()


def _batch(n=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def test_check_measures_each_stage_and_recommends():
    model = _example()
    before = copy.deepcopy(model.state_dict())
    x, y = _batch()
    report = diagnostics.check(model, x, y, refines=(0, 1))
    assert [s.name for s in report.stages] == ["shallow", "deep"]
    shallow, deep = report.stages
    assert (shallow.depth, shallow.step, deep.depth, deep.step) == (3, 1.0, 16, 1 / 16)
    # a standard ResNet stage (step 1): the adjoint is wrong, refining does not save it
    assert shallow.gradient_error[0] > 0.2 and shallow.drift[0] > 0.5
    assert shallow.recommended_backward == "autograd"
    # the deep Euler stage: accurate, and refine shrinks the error
    assert deep.gradient_error[1] < deep.gradient_error[0] < 0.05
    assert deep.recommended_backward in ("auto", "adjoint")
    # drift is the reverse steps' reconstruction error at the stage input
    for s in report.stages:
        for k in (0, 1):
            assert s.drift[k] == pytest.approx(s.reconstruction_error[k], rel=1e-9)
    # the isolated gradient error, by hand: only `deep` on the adjoint (refine 1)
    twin = copy.deepcopy(model).train()
    params = list(twin.parameters())
    exact = torch.autograd.grad(torch.nn.functional.cross_entropy(twin(x), y), params)
    twin.load_state_dict(before)
    twin.deep.backward, twin.deep.refine = "adjoint", 1
    approx = torch.autograd.grad(torch.nn.functional.cross_entropy(twin(x), y), params)
    assert deep.gradient_error[1] == pytest.approx(flat_rel(approx, exact), rel=1e-9)
    # activation memory: the adjoint keeps the stage input and output only
    deep_in = 16 * 16 * 8 * 8 * 8  # (B, 16, 8, 8) float64
    assert deep.saved_bytes_adjoint == 2 * deep_in < deep.saved_bytes_autograd / 10
    assert report.saved_bytes_adjoint < report.saved_bytes_autograd
    # the model is not modified
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(s.backward == "autograd" and s.last_backward is None for s in resode.stages(model))
    json.dumps(report.to_dict())
    assert "auto" in report.table() or "adjoint" in report.table()


def test_recommendation_rule():
    assert diagnostics.recommend({0: 0.1, 1: 0.01}, {0: 0.1, 1: 0.005}, 0.05, 0.01) == (
        "auto",
        1,
        "gradient error 0.01 <= 0.05 and drift <= tol",
    )
    assert diagnostics.recommend({0: 0.02, 1: 0.01}, {0: 0.1, 1: 0.05}, 0.05, 0.01)[:2] == (
        "adjoint",
        0,
    )
    assert diagnostics.recommend({0: 0.9, 1: 0.8}, {0: 5.0, 1: 4.0}, 0.05, 0.01)[:2] == (
        "autograd",
        0,
    )


def test_check_of_a_fused_model_measures_its_generic_twin():
    if not resode.fused.available_for("cpu"):
        pytest.skip("needs the compiled extension")
    model = resode.models.create("mlp_resnet", depth=8, dim=6, hidden=8, image_size=4)
    fused = resode.models.create(
        "mlp_resnet", depth=8, dim=6, hidden=8, image_size=4, engine="fused"
    )
    fused.load_state_dict(model.state_dict())
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    a = diagnostics.check(model.double(), x, y, refines=(0, 2))
    b = diagnostics.check(fused.double(), x, y, refines=(0, 2))
    assert b.stages[0].engine == "MLPStack" and a.stages[0].engine == "ResidualStack"
    assert b.stages[0].gradient_error == pytest.approx(a.stages[0].gradient_error, rel=1e-9)


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cmd.run(argv)
    return rc, out.getvalue(), err.getvalue()


def test_command_with_a_module_factory_and_json(tmp_path):
    rc, out, err = _run([f"{EXAMPLE}:make_model", "--shape", "3", "16", "16", "--batch", "8",
                         "--refine", "0", "1", "--json"])  # fmt: skip
    assert rc == 0, err
    data = json.loads(out)
    rows = {s["name"]: s for s in data["stages"]}
    assert rows["shallow"]["recommended_backward"] == "autograd"
    assert set(rows["deep"]["gradient_error"]) == {"0", "1"}
    # the same model with trained weights from a checkpoint (a plain state dict here)
    model = _example()
    with torch.no_grad():
        for b in model.deep.blocks:
            b[4].weight.mul_(0.0)  # the deep stage is the identity: exact adjoint
    torch.save(model.state_dict(), tmp_path / "w.pt")
    rc, out, err = _run([f"{EXAMPLE}:make_model", "--checkpoint", str(tmp_path / "w.pt"),
                         "--shape", "3", "16", "16", "--batch", "8", "--json"])  # fmt: skip
    assert rc == 0, err
    deep = {s["name"]: s for s in json.loads(out)["stages"]}["deep"]
    assert deep["gradient_error"]["0"] == 0.0


def test_command_with_a_registered_model_checkpoint_and_dataset(tmp_path):
    from resode.train import CHECKPOINT_FORMAT

    model = resode.models.create("tiny_resnet", depth=4, num_classes=10, engine="generic")
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
            "model_config": model.config.to_dict()}  # fmt: skip
    torch.save(ckpt, tmp_path / "ckpt.pt")
    rc, out, err = _run(["tiny_resnet", "--checkpoint", str(tmp_path / "ckpt.pt"),
                         "--dataset", "synthetic", "--batch", "8", "--refine", "0"])  # fmt: skip
    assert rc == 0, err
    assert "layer1" in out and "recommended" in out and "rule:" in out
    rc, out, err = _run(["tiny_resnet", "-k", "depth=3", "-k", "scheme=heun", "--shape", "3",
                         "16", "16", "--batch", "4", "--refine", "0", "--json"])  # fmt: skip
    assert rc == 0, err
    (stage,) = json.loads(out)["stages"]
    assert (stage["depth"], stage["scheme"]) == (3, "heun")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["no_such_model"], "unknown model 'no_such_model'"),
        (["no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
        ([f"{EXAMPLE}:nope"], "has no function 'nope'"),
        (["tiny_resnet", "-k", "depth"], "bad --kwarg 'depth'"),
        (["tiny_resnet", "--checkpoint", "/no/such/file.pt"], "no such checkpoint"),
        (["tiny_resnet", "--dataset", "mnist_xyz"], "unknown dataset 'mnist_xyz'"),
        (["tiny_resnet", "-k", "num_classes=3", "--dataset", "synthetic"], "out of bounds"),
    ],
)
def test_command_errors_are_one_line(argv, message):
    rc, out, err = _run([*argv, "--batch", "4", "--refine", "0"])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("resode check: error:") and message in err


def test_python_dash_m_and_the_cwd_module():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "resode.check", "examples.my_resnet:make_model", "--shape", "3",
         "8", "8", "--batch", "4", "--refine", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "shallow" in r.stdout and "deep" in r.stdout


def test_add_parser_wires_into_a_command_line():
    import argparse

    p = argparse.ArgumentParser(prog="resode")
    sub = p.add_subparsers(dest="command", required=True)
    cmd.add_parser(sub)
    args = p.parse_args(["check", "tiny_resnet", "--shape", "3", "8", "8", "--no-train"])
    assert args.func is cmd.main and args.train is False and args.shape == [3, 8, 8]
