"""benchmarks/paper_cost.py: the FLOP count of a training step matches a hand count and scales
with the batch, the adjoint's recomputation is counted, the runs of a preset are the ones its
experiment trains, and the command writes totals that follow from its rows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
paper_cost = pytest.importorskip("paper_cost")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_step_flops_of_an_mlp_match_the_hand_count():
    """Linear(i, h) - tanh - Linear(h, o), input without gradient: forward 2B(ih + ho); backward
    of the second layer 4Bho (input and weight gradients), of the first 2Bih (weight only)."""
    b, i, h, o = 4, 12, 20, 7
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, o))
    x, y = torch.randn(b, i), torch.randint(0, o, (b,))
    hand = 2 * b * (i * h + h * o) + 4 * b * h * o + 2 * b * i * h
    got = paper_cost.step_flops(net, x, y)
    assert got > 0
    assert abs(got - hand) <= 0.01 * hand, (got, hand)
    assert paper_cost.eval_flops(net, x) == 2 * b * (i * h + h * o)


def _tiny(backward: str) -> nn.Module:
    import resode

    torch.manual_seed(0)
    return resode.models.create(
        "tiny_resnet", depth=4, channels=4, in_channels=3, num_classes=10, engine="generic",
        backward=backward,
    ).train()  # fmt: skip


def test_step_flops_scale_with_batch_and_count_the_adjoint_recomputation():
    data = paper_cost.DataShape("x", 64, 64, 3, 16, 10)
    flops = {}
    for bw in ("autograd", "adjoint"):
        net = _tiny(bw)
        f2 = paper_cost.step_flops(net, *paper_cost.batch_of(data, 2))
        f6 = paper_cost.step_flops(net, *paper_cost.batch_of(data, 6))
        assert f2 > 0
        assert abs(f6 / f2 - 3.0) < 0.03, (bw, f2, f6)  # linear in the batch within 1 %
        flops[bw] = f2
    # the adjoint rebuilds and recomputes the stage inside its backward: more work than
    # autograd, less than twice (the counter sees into the custom backward)
    assert 1.1 < flops["adjoint"] / flops["autograd"] < 2.0, flops


def test_runs_of_the_heun_depth_paper_preset():
    """6 depths x 2 schemes x 3 backwards x 4 seeds, less the Heun N=2 ``adjoint_stored`` run
    shared with ``adjoint`` (one step): 140 runs in 35 configurations; 90 epochs of
    floor(50000 / 256) steps, as the training loader (drop_last) gives."""
    from resode.data import _ShardedBatches

    jobs, others = paper_cost.record_jobs("heun-depth", "paper")
    assert len(jobs) == 140
    configs = paper_cost.configurations(jobs)
    assert len(configs) == 35 and {c["runs"] for c in configs} == {4}
    assert others == {"gradient error": 48}  # 6 depths x 2 schemes x 4 seeds, not training
    cfg = paper_cost.train_config(configs[0]["job"])
    data = paper_cost.DataShape.of("cifar10", {})
    loader_len = len(_ShardedBatches(50_000, 256, 0, True, True, 0, 1))
    assert paper_cost.steps_per_epoch(cfg, data) == loader_len == 195
    assert cfg.epochs == 90 and cfg.batch_size == 256


def test_fine_tuning_runs_train_only_their_stage():
    jobs, _ = paper_cost.record_jobs("untie-finetune", "paper")
    configs = paper_cost.configurations(jobs)
    assert [c["runs"] for c in configs] == [3, 3, 3]
    fine = {c["job"].get("transform"): c for c in configs if c["base"] is not None}
    assert set(fine) == {"untie", None}
    data = paper_cost.DataShape.of("cifar10", {})
    for transform, config in fine.items():
        net = paper_cost.build(config, data, engine="generic")
        trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
        assert trainable == {"layer3"}
        assert net.layer3.stack.tied == (transform is None)
        assert net.layer3.stack.backward == "adjoint"
        assert net.layer2.stack.backward == "autograd"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    argv = ["--experiments", "heun-depth", "--flop-batch", "1", "--assume-tflops", "50",
            "--out", str(out)]  # fmt: skip
    return paper_cost.main(argv), out


def test_cli_totals_follow_from_the_rows(cli_run):
    result, out = cli_run
    (exp,) = result["experiments"]
    rows, total = exp["configs"], exp["total"]
    assert total["runs"] == 140 and total["steps"] == 140 * 90 * 195
    for r in rows:
        assert r["steps"] == r["runs"] * r["epochs"] * r["steps_per_epoch"]
        train = r["gflop_per_step"] * 1e9 * r["steps"] / 1e15
        assert math.isclose(r["train_pflop"], train, rel_tol=1e-9)
        assert r["eval_samples"] == r["runs"] * 90 * 10_000
        assert r["gflop_per_step"] > 3 * r["eval_gflop_per_sample"] * r["batch"] * 0.9
    assert math.isclose(total["pflop"], sum(r["pflop"] for r in rows), rel_tol=1e-9)
    assert math.isclose(total["hours_assumed"], total["pflop"] * 1e3 / 50 / 3600, rel_tol=1e-9)
    assert total["hours_measured"] is None
    # deeper is dearer: FLOPs per step grow with depth for each (scheme, backward)
    by = {}
    for r in rows:
        by.setdefault(r["config"].split("depth=")[1].split(",", 1)[1], []).append(
            r["gflop_per_step"]
        )
    assert all(v == sorted(v) and v[0] < v[-1] for v in by.values())
    saved = json.loads((out / "paper_cost.json").read_text())
    assert saved["experiments"][0]["total"]["steps"] == total["steps"]
    assert saved["provenance"]["machine"]["torch"] == torch.__version__
    md = (out / "paper_cost.md").read_text()
    assert f"| heun-depth | 140 | {total['steps']:,} |" in md
    assert "assumed 50 TFLOP/s" in md


def test_measured_hours_follow_from_the_step_time(tmp_path):
    """``--measure-steps`` on the smoke preset (synthetic data, 4 steps per epoch)."""
    result = paper_cost.main(["--experiments", "gradient-error", "--preset", "smoke",
                              "--measure-steps", "1", "--out", str(tmp_path)])  # fmt: skip
    (exp,) = result["experiments"]
    for r in exp["configs"]:
        assert r["steps_per_epoch"] == 4  # min(512 // 64, max_steps_per_epoch=4)
        m = r["measured"]
        assert m["step_s"] > 0 and len(m["step_times_s"]) == 1
        hours = (m["step_s"] * r["steps"] + m["eval_s_per_sample"] * r["eval_samples"]) / 3600
        assert math.isclose(r["hours_measured"], hours, rel_tol=1e-9)
    assert math.isclose(
        exp["total"]["hours_measured"], sum(r["hours_measured"] for r in exp["configs"])
    )
