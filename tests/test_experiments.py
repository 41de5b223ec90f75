"""The paper's experiments: every smoke preset end to end, sweeps resume, the report states each
claim with a number and a verdict, and the CLI parses what it documents.

The whole pipeline runs once per test session (``resode reproduce --preset smoke`` into a
temporary directory) and the tests read its outputs.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resode.cli import build_parser
from resode.reproduce import (
    EXPERIMENTS,
    PRESETS,
    UsageError,
    get_experiment,
    reproduce,
    run_experiment,
)
from resode.reproduce.claims import (
    VERDICTS,
    Claim,
    above_noise,
    seed_stats,
    spread_text,
    verdict_above_noise,
)
from resode.reproduce.files import read_complete
from resode.reproduce.report import MARKS
from resode.reproduce.sweeps import SweepPointError, run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    report = reproduce("smoke", out=out)
    assert not report.failed, report.statuses
    return out, report


def _finite_numbers(obj):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)


@pytest.mark.parametrize("exp_id", list(EXPERIMENTS))
def test_smoke_outputs(smoke, exp_id):
    out, _ = smoke
    d = out / exp_id
    assert not (d / "error.json").exists(), (d / "error.json").read_text()
    s = read_complete(d / "summary.json")
    assert s is not None, f"{exp_id}: no complete summary.json"
    prov = json.loads((d / "provenance.json").read_text())
    for key in ("config", "seeds", "torch_version", "device", "extension", "wall_time_s"):
        assert key in prov, f"{exp_id}: provenance lacks {key}"
    pngs = [f for f in s["figures"] if f.endswith(".png")]
    pdfs = [f for f in s["figures"] if f.endswith(".pdf")]
    assert pngs and len(pngs) == len(pdfs)
    for f in s["figures"]:
        p = d / f
        assert p.is_file() and p.stat().st_size > 1000, p
    for t in s["tables"]:
        lines = (d / t).read_text().strip().splitlines()
        assert len(lines) >= 2, f"{exp_id}: table {t} is empty"
    assert s["claims"], f"{exp_id}: no claims"
    assert s["preset"] == prov["preset"] == "smoke"
    for c in s["claims"]:
        assert c["verdict"] in VERDICTS
        assert re.search(r"\d", c["evidence"]), c
        assert c["rule"], f"{exp_id}: claim {c['key']} states no verdict rule"
    nums = list(_finite_numbers(s["numbers"]))
    assert nums and all(math.isfinite(x) for x in nums)


def test_smoke_numbers_sane(smoke):
    out, _ = smoke
    num = {e: read_complete(out / e / "summary.json")["numbers"] for e in EXPERIMENTS}
    # memory: autograd saves ~one (B, d) float32 activation per block, the adjoint a constant
    saved = num["memory"]["saved"]
    assert 0.8 * 500 * 500 * 4 < saved["autograd_bytes_per_block"] < 1.5 * 500 * 500 * 4
    assert saved["adjoint_max_bytes"] == saved["adjoint_min_bytes"]
    assert saved["ratio_autograd_over_adjoint"] > 10
    # linear weights: smoothness ~ 1/N
    assert -1.3 < num["linear-weights"]["slope_max_diff_vs_N"] < -0.7
    # reconstruction: the error falls with depth for both schemes
    for s in ("euler", "heun"):
        assert num["reconstruction"]["slopes"][s] < -0.5
    # gradient error: slopes in every regime, decreasing with depth (the smoke base model is
    # near identity, so its claims are inconclusive, never reproduced)
    g = num["gradient-error"]
    assert len(g["slopes"]) == 16 and all(v < 0 for v in g["slopes"].values()), g["slopes"]
    assert all(0 <= b["ratio"] < 1 for b in g["base"].values())
    for row in num["heun-depth"]["table"]:
        assert 0.0 <= row["error_mean"] <= 1.0
    for row in num["tied-depth"]["table"]:
        assert 0.0 <= row["acc_mean"] <= 1.0
    u = num["untie-finetune"]
    assert 0.0 <= u["acc_before"] <= 1.0 and 0.0 <= u["acc_after"] <= 1.0
    assert u["memory_bytes"]["adjoint"] < u["memory_bytes"]["autograd"]


def test_report_states_every_claim(smoke):
    out, report = smoke
    text = Path(report).read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "**" in ln]
    n_claims = sum(len(read_complete(out / e / "summary.json")["claims"]) for e in EXPERIMENTS)
    assert len(rows) == n_claims
    for ln in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip().strip("|"))]
        exp_id, _, measured, spread, verdict, rule = cells
        assert exp_id in EXPERIMENTS
        assert re.search(r"\d", measured), ln  # a measured number
        assert verdict.strip("*") in VERDICTS + MARKS, ln
        assert rule != "-" or verdict.strip("*") in MARKS, ln  # every verdict states its rule
        assert spread == "-" or re.search(r"\+- .* \(\d+ seeds?\)", spread), ln
    for e in EXPERIMENTS:
        s = read_complete(out / e / "summary.json")
        for f in s["figures"]:
            if f.endswith(".png"):
                assert f"({e}/{f})" in text  # every figure is in the report


def test_report_never_hides_a_failure(tmp_path):
    from resode.reproduce.report import write_report

    path = write_report(tmp_path, "smoke", {"memory": {"ok": False, "error": "Boom"}})
    text = path.read_text()
    assert "| memory | (all claims) | failed: Boom | - | **failed** | - |" in text
    # every other experiment is listed as not run (nothing in tmp_path), none is left out
    for e in EXPERIMENTS:
        if e != "memory":
            assert f"| {e} | (all claims) | not run at preset smoke | - | **not run** | - |" in text


def test_sweep_skips_finished_runs(tmp_path):
    calls = []

    def fn(x):
        calls.append(x)
        return {"y": x * x}

    jobs = [dict(x=i) for i in range(3)]
    r1 = run_sweep(fn, jobs, tmp_path, key=lambda j: f"x{j['x']}")
    assert [r["y"] for r in r1] == [0, 1, 4] and calls == [0, 1, 2]
    # an incomplete result file (interrupted run) is redone, complete ones are skipped
    (tmp_path / "x1.json").write_text(json.dumps({"y": 1}))
    r2 = run_sweep(fn, jobs, tmp_path, key=lambda j: f"x{j['x']}")
    assert calls == [0, 1, 2, 1] and [r["y"] for r in r2] == [0, 1, 4]
    assert (r2.ran, r2.reused) == (1, 2)
    # a stored result that `validate` rejects is rerun; changed arguments rerun the point
    r3 = run_sweep(fn, jobs, tmp_path, key=lambda j: f"x{j['x']}",
                   validate=lambda r: "bad file" if r["y"] == 4 else None)  # fmt: skip
    assert calls == [0, 1, 2, 1, 2] and (r3.ran, r3.reused) == (1, 2)


def test_sweep_failure_names_the_point(tmp_path):
    def fn(x):
        raise ValueError("broken input")

    with pytest.raises(SweepPointError, match=r"point x7 \(files in .*\) failed: ValueError"):
        run_sweep(fn, [dict(x=7)], tmp_path, key=lambda j: f"x{j['x']}")
    assert not (tmp_path / "x7.json").exists()


def test_claim_rejects_bad_verdicts_and_nan_successes():
    with pytest.raises(ValueError):
        Claim("k", "t", "e 1", 1.0, "maybe")
    assert Claim("k", "t", "e", float("nan"), "reproduced").verdict == "not reproduced"


def test_seed_statistics_and_noise_verdicts():
    st = seed_stats([1.0, 2.0, 3.0])
    assert st == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert seed_stats([5.0])["std"] == 0.0
    assert verdict_above_noise([2.0, 3.0, 4.0])[0] == "reproduced"  # 3 > 1
    assert verdict_above_noise([-2.0, -3.0, -4.0])[0] == "not reproduced"
    assert verdict_above_noise([-1.0, 0.5, 1.0])[0] == "inconclusive"  # |0.17| < 1.04
    assert verdict_above_noise([10.0])[0] == "inconclusive"  # one seed: no spread to judge
    verdict, rule = verdict_above_noise([2.0, 3.0, 4.0], k=2.0)
    assert verdict == "reproduced" and "2 x seed std" in rule
    c = Claim("k", "t", "e 1", 3.0, **above_noise([2.0, 3.0, 4.0]))
    assert (c.verdict, c.spread["std"]) == ("reproduced", 1.0)
    assert spread_text(c.spread) == "+3 +- 1 (3 seeds)" and spread_text(None) == "-"


def test_report_shows_the_spread_and_the_rule_of_each_claim(tmp_path):
    from resode.reproduce.files import write_json
    from resode.reproduce.report import write_report

    claims = [Claim("a", "effect A", "A by 0.3", 0.3, **above_noise([0.2, 0.3, 0.4])).to_dict(),
              Claim("b", "effect B", "B 1", 1.0, "reproduced", rule="B > 0").to_dict()]  # fmt: skip
    write_json(tmp_path / "memory" / "summary.json", dict(
        experiment="memory", preset="smoke", device="cpu", numbers={}, claims=claims,
        figures=[], tables=[], wall_time_s=1.0, complete=True))  # fmt: skip
    text = write_report(tmp_path, "smoke", {}).read_text()
    assert (
        "| memory | effect A | A by 0.3 | +0.3 +- 0.1 (3 seeds) | **reproduced** | effect "
        "mean +0.3 vs 1 x seed std 0.1 over 3 seeds" in text
    )
    assert "| memory | effect B | B 1 | - | **reproduced** | B > 0 |" in text


def test_cli_parses_documented_commands():
    p = build_parser()
    a = p.parse_args(["run", "memory", "--preset", "smoke", "--seeds", "1", "2", "--launcher",
                      "local", "--data-root", "/x", "--out", "o"])  # fmt: skip
    assert (a.experiment, a.preset, a.seeds, a.launcher) == ("memory", "smoke", [1, 2], "local")
    a = p.parse_args(["reproduce", "--preset", "quick", "--only", "memory", "reconstruction"])
    assert a.only == ["memory", "reconstruction"]
    a = p.parse_args(["run", "heun-depth", "--preset", "gpu", "--launcher", "torchrun",
                      "--nproc-per-node", "2", "--max-steps", "3"])  # fmt: skip
    assert (a.preset, a.launcher, a.nproc_per_node, a.max_steps) == ("gpu", "torchrun", 2, 3)
    a = p.parse_args(["check", "tiny_resnet", "--shape", "1", "28", "28", "--num-classes", "10"])
    assert (a.command, a.model, a.shape) == ("check", "tiny_resnet", [1, 28, 28])
    with pytest.raises(SystemExit):
        p.parse_args(["run", "nope"])
    for e in EXPERIMENTS:
        exp = get_experiment(e)
        assert exp.id == e and {"smoke", "quick", "paper"} <= set(exp.presets) <= set(PRESETS), e


@pytest.mark.parametrize("script", ["memory.py", "reproduce.py"])
def test_experiment_scripts_run_from_a_checkout(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0 and "--preset" in out.stdout
    assert ("--only" in out.stdout) == (script == "reproduce.py")


def test_every_experiment_has_its_script():
    scripts = {p.stem for p in (ROOT / "experiments").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == {e.replace("-", "_") for e in EXPERIMENTS} | {"reproduce"}


def test_rerun_keeps_the_provenance_of_reused_results(smoke, tmp_path):
    """A rerun that computes nothing keeps the provenance (command, commit, wall time) of the
    run that made the results; the numbers are unchanged."""
    import shutil

    out, _ = smoke
    shutil.copytree(out / "linear-weights", tmp_path / "linear-weights")
    before = (tmp_path / "linear-weights" / "provenance.json").read_text()
    old = read_complete(tmp_path / "linear-weights" / "summary.json")
    s = run_experiment("linear-weights", "smoke", out=tmp_path)
    assert (tmp_path / "linear-weights" / "provenance.json").read_text() == before
    assert s["reused"] is True and s["wall_time_s"] == old["wall_time_s"]
    assert s["numbers"] == old["numbers"] and s["claims"] == old["claims"]
    # a rerun with another seed computes new points: new provenance naming the earlier run
    s = run_experiment("linear-weights", "smoke", out=tmp_path, seeds=[0, 1])
    prov = json.loads((tmp_path / "linear-weights" / "provenance.json").read_text())
    assert prov["points_computed"] == 3 and prov["points_reused"] == 3
    assert prov["reused_from"]["wall_time_s"] == json.loads(before)["wall_time_s"]
    assert "reused" not in s


def test_cpu_only_experiment_says_it_ignores_the_device(tmp_path):
    ctx = get_experiment("linear-weights").context("smoke", tmp_path, None, "cuda", None, "inline")
    assert ctx.device == "cpu" and ctx.device_requested == "cuda"
    assert "linear-weights runs on cpu only" in ctx.device_note
    ctx = get_experiment("heun-depth").context("smoke", tmp_path, None, "cuda", None, "inline")
    assert ctx.device == "cuda" and ctx.device_note is None


def test_memory_block_is_the_library_mlp_block():
    from resode.models.blocks import mlp_block
    from resode.reproduce.memory import build

    stage = build("generic", "autograd", 3, 6, 4)
    ref = mlp_block(6, 4)
    assert all(type(stage.block(n)) is type(ref) for n in range(3))
    assert [type(m) for m in stage.block(0)] == [type(m) for m in ref]


# ----------------------------------------------------------------------------- gradient-error
def test_gradient_error_theory_holds_on_a_float64_mlp_stage():
    """gradient-error's predicted slopes, on the stage its derivation assumes (``f`` smooth in
    ``x``, iid base weights, float64): every fitted slope within ``THEORY_TOL`` of theory, and
    Heun's error falls faster than Euler's exactly where theory says it does."""
    import numpy as np
    from torch import nn

    import resode
    from resode.diagnostics import gradient_error
    from resode.models import resample_depth
    from resode.models.blocks import mlp_block
    from resode.reproduce import gradient_error as G

    n0, depths, rows = 8, [2, 4, 8, 16, 32, 64], []
    x, t = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    for scheme in G.SCHEMES:
        stage = resode.ResidualStack.from_factory(lambda: mlp_block(6, 12), n0, scheme=scheme)
        base = nn.Sequential(nn.Linear(6, 6), stage).double()
        for arm, make in (("copy", resample_depth), ("smooth", G.interpolate_depth)):
            for n in depths if arm == "copy" else [d for d in depths if d > n0]:
                model = make(base, n)
                groups = G.tensor_groups(model, n0)
                for v in G.VARIANTS:
                    r = gradient_error(model, x, t, lambda o, y: ((o - y) ** 2).mean(), variant=v)
                    rows += [
                        dict(scheme=scheme, arm=arm, variant=v, depth=n, tensor=k,
                             group=groups[k], error=e)
                        for k, e in r["per_tensor"].items()
                    ]  # fmt: skip
    table = G._slopes(G._median_rows(rows), n0)
    assert len(table) == 16 and all(np.isfinite(r["slope"]) for r in table)
    off = [(r["variant"], r["scheme"], r["regime"], round(r["slope"], 2)) for r in table
           if not r["agrees"]]  # fmt: skip
    assert not off, off
    slope = {(r["variant"], r["scheme"], r["regime"]): r["slope"] for r in table}
    # theory: Heun faster for the chained adjoint above N0 and for smooth weights; stored Heun
    # faster inside runs; never at the jumps of the stored variant
    for v, reg in [("adjoint", "jump"), ("adjoint", "run"), ("adjoint", "smooth"),
                   ("adjoint_stored", "run"), ("adjoint_stored", "smooth")]:  # fmt: skip
        assert slope[v, "heun", reg] < slope[v, "euler", reg] - 1.0, (v, reg)
    stored_jump = [slope["adjoint_stored", s, "jump"] for s in ("heun", "euler")]
    assert abs(stored_jump[0] - stored_jump[1]) < 1


def test_interpolate_depth_is_linear_between_the_base_functions():
    from torch import nn

    import resode
    from resode.models import resample_depth
    from resode.models.blocks import mlp_block
    from resode.reproduce.gradient_error import edge_blocks, interpolate_depth

    base = nn.Sequential(resode.ResidualStack.from_factory(lambda: mlp_block(4, 3), 4))
    same = interpolate_depth(base, 4)
    for a, b in zip(base.parameters(), same.parameters()):
        assert torch.equal(a, b)
    deep, copies = interpolate_depth(base, 16), resample_depth(base, 16)
    src = [dict(base[0].block(k).named_parameters()) for k in range(4)]
    for i in range(16):
        k, w = i // 4, (i % 4) / 4
        for name, p in deep[0].block(i).named_parameters():
            want = src[k][name] if k == 3 else (1 - w) * src[k][name] + w * src[k + 1][name]
            torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
            assert torch.equal(dict(copies[0].block(i).named_parameters())[name], src[k][name])
    assert deep[0].step == 1 / 16 and deep[0].depth == 16
    assert edge_blocks(16, 4) == {3, 4, 7, 8, 11, 12} and edge_blocks(4, 4) == {0, 1, 2, 3}
    with pytest.raises(TypeError, match="untied generic"):
        tied = nn.Sequential(resode.ResidualStack.from_factory(lambda: mlp_block(4, 3), 4,
                                                               tied=True))  # fmt: skip
        interpolate_depth(tied, 8)


def test_gradient_error_claims_refuse_a_verdict_on_a_near_identity_base_model(smoke):
    out, _ = smoke
    s = read_complete(out / "gradient-error" / "summary.json")
    ratios = [b["ratio"] for b in s["numbers"]["base"].values()]
    assert min(ratios) < 0.1  # four training steps from zero-initialised residual functions
    assert {c["verdict"] for c in s["claims"]} == {"inconclusive"}
    assert all("near identity" in c["rule"] for c in s["claims"])


# ----------------------------------------------------------------------------- gpu preset, torchrun
def test_gpu_preset_settings_launcher_and_device(tmp_path, monkeypatch):
    from resode.reproduce import inputs
    from resode.reproduce.sweeps import torchrun_nproc

    ctx = get_experiment("gradient-error").context("gpu", tmp_path, None, "cpu", None, "inline")
    assert ctx.cfg["train_depth"] == 32 and ctx.dataset == "fashion_mnist"  # offline data
    ctx = get_experiment("linear-weights").context("gpu", tmp_path, None, "cpu", None, "inline")
    assert ctx.cfg == get_experiment("linear-weights").presets["quick"]
    assert "no gpu settings" in ctx.device_note
    if not torch.cuda.is_available():
        assert inputs.default_launcher("gpu") == "inline"
        with pytest.raises(UsageError, match="--preset gpu needs a CUDA GPU"):
            run_experiment("memory", "gpu", out=tmp_path, device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert inputs.default_launcher("gpu") == "torchrun"
    assert inputs.default_launcher("quick") == "inline"
    assert torchrun_nproc("cuda") == 4 and torchrun_nproc("cpu") == 1
    assert torchrun_nproc("cuda", 2) == 2


def test_max_steps_cuts_every_training_section_and_the_sweeps(tmp_path):
    exp = get_experiment("memory")
    ctx = exp.context("paper", tmp_path, None, "cpu", None, "inline", max_steps=3)
    assert ctx.cfg["depths"] == [1, 2] and ctx.cfg["process"] == [10, 20]
    assert ctx.max_steps == 3 and ctx.cfg["max_steps"] == 3
    ctx = get_experiment("heun-depth").context("paper", tmp_path, None, "cpu", None, "inline",
                                               max_steps=3)  # fmt: skip
    assert len(ctx.seeds) == 1
    t = ctx.training({"epochs": 90, "batch_size": 256, "lr": 0.1})
    assert t == {"epochs": 1, "batch_size": 256, "lr": 0.1, "max_steps_per_epoch": 3,
                 "max_eval_batches": 1}  # fmt: skip
    with pytest.raises(UsageError, match="--max-steps"):
        run_experiment("memory", "smoke", out=tmp_path, max_steps=0)


def test_torchrun_launcher_trains_data_parallel_on_two_cpu_processes(tmp_path):
    """A training point under ``--launcher torchrun`` with 2 gloo processes gives the weights of
    the same point run inline on the union batch (the model has no BatchNorm)."""
    from resode.checkpoint import model_from_checkpoint
    from resode.reproduce.training import train_run

    def job(name):
        return dict(run_dir=str(tmp_path / name), model="mlp_resnet",
                    model_kwargs=dict(depth=3, dim=8, hidden=8, backward="adjoint"),
                    dataset="synthetic", data_kwargs=dict(num_train=96, num_test=48,
                    image_size=8, num_classes=4), data_root=None, device="cpu", seed=0,
                    epochs=1, max_steps_per_epoch=2, batch_size=32, lr=0.5,
                    max_eval_batches=1)  # fmt: skip

    ddp = run_sweep(train_run, [job("ddp")], tmp_path / "a", key=lambda j: "p",
                    launcher="torchrun", nproc=2)[0]  # fmt: skip
    one = run_sweep(train_run, [job("one")], tmp_path / "b", key=lambda j: "p")[0]
    assert ddp["history"][0]["world_size"] == 2 and one["history"][0]["world_size"] == 1
    a, b = model_from_checkpoint(ddp["checkpoint"]), model_from_checkpoint(one["checkpoint"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "a" / "p.torchrun.log").is_file()
