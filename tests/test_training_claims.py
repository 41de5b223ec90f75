"""The training claims (Figs 3a, 3b, 3c, Table 2): verdict rules on synthetic numbers, the arms
each experiment adds (values from their smoke runs), the training helpers, determinism."""

from __future__ import annotations

import types

import pytest
import torch

import resode
from resode.models import create
from resode.reproduce import adjoint_failure, heun_depth, tied_depth, untie_finetune
from resode.reproduce.training import (
    BackwardLog,
    by_seed,
    paired,
    residual_size,
    standard_residual_init,
    train_run,
)

SYNTH = dict(num_train=256, num_test=128, in_channels=1, image_size=16, noise=2.0)


# ----------------------------------------------------------------------------- verdict rules
def _gaps(values: dict[int, tuple[float, float, float]]) -> dict[int, list[float]]:
    return {d: list(v) for d, v in values.items()}


def test_heun_match_verdict_reproduced_not_reproduced_inconclusive():
    tol = 0.01
    fail = (0.10, 0.12, 0.11)  # 11 points worse than autograd, std 1
    ok = (0.001, -0.002, 0.0)
    # Heun matches from N=3, Euler from N=4: reproduced
    euler = _gaps({2: fail, 3: fail, 4: ok})
    heun = _gaps({2: fail, 3: ok, 4: ok})
    verdict, rule, det = heun_depth.match_verdict(euler, heun, tol)
    assert verdict == "reproduced" and "seed std" in rule
    assert (det["match_depth_euler"], det["match_depth_heun"], det["deciding_depth"]) == (4, 3, 3)
    # the opposite: not reproduced
    assert heun_depth.match_verdict(heun, euler, tol)[0] == "not reproduced"
    # both match from the same depth: inconclusive
    assert heun_depth.match_verdict(heun, heun, tol)[0] == "inconclusive"
    # Heun matches earlier, but Euler's excess there is within the noise: inconclusive
    noisy = _gaps({2: fail, 3: (0.0, 0.08, -0.05), 4: ok})
    assert heun_depth.matches(noisy[3], tol)  # mean 1 pt, std 6.6: "matches" by noise
    assert (
        heun_depth.match_verdict(_gaps({2: fail, 3: (0.02, 0.03, 0.05), 4: ok}), heun, tol)[0]
        == "reproduced"
    )
    assert (
        heun_depth.match_verdict(_gaps({2: fail, 3: (0.03, -0.02, 0.04), 4: ok}), heun, tol)[0]
        == "inconclusive"
    )
    # never matching counts as an infinite depth
    assert heun_depth.match_depth(_gaps({2: fail, 3: fail}), tol) is None
    assert (
        heun_depth.match_verdict(_gaps({2: fail, 3: fail}), _gaps({2: fail, 3: ok}), tol)[0]
        == "reproduced"
    )


def test_fails_verdict_has_a_margin_and_both_sides():
    m = 0.02
    assert adjoint_failure.fails_verdict([0.10, 0.12, 0.11], m)[0] == "reproduced"
    assert adjoint_failure.fails_verdict([0.0, 0.001, -0.001], m)[0] == "not reproduced"
    assert adjoint_failure.fails_verdict([0.02, 0.06, -0.01], m)[0] == "inconclusive"
    # a small but consistent shortfall is not a failure to train
    assert adjoint_failure.fails_verdict([0.005, 0.006, 0.004], m)[0] == "not reproduced"
    assert "2 pts" in adjoint_failure.fails_verdict([0.1, 0.1], m)[1]


def _auto_numbers(short_adj, short_auto, acc_std=0.005):
    def row(s):
        return {
            "acc_mean": 0.8,
            "acc_std": acc_std,
            "train_loss_mean": 0.5,
            "shortfall_vs_autograd": s,
            "saved_MiB": 1.0,
            "stage_saved_MiB": 0.5,
            "label": "x",
            "fell_back": 3,
            "backward_passes": 3,
            "diverged": 0,
        }

    return {"autograd": row([0.0, 0.0, 0.0]), "adjoint": row(short_adj), "auto": row(short_auto)}


def test_auto_claim_needs_a_failing_adjoint():
    ok = [0.001, -0.002, 0.0]
    num = _auto_numbers([0.2, 0.3, 0.25], ok)
    assert adjoint_failure._auto_claim(num, 0.02, "reproduced").verdict == "reproduced"
    assert adjoint_failure._auto_claim(num, 0.02, "inconclusive").verdict == "inconclusive"
    bad = _auto_numbers([0.2, 0.3, 0.25], [0.1, 0.12, 0.11])
    assert adjoint_failure._auto_claim(bad, 0.02, "reproduced").verdict == "not reproduced"


def _tied_rows(acc: dict[int, list[float]]) -> list[dict]:
    return [
        {
            "job": {"model_kwargs": {"depth": d, "tied": True}, "seed": s},
            "best_test_acc": a,
            "final_train_loss": 1 - a,
            "num_params": 10,
        }
        for d, accs in acc.items()
        for s, a in enumerate(accs)
    ]


def _fake_ctx(tmp_path, cfg, seeds):
    ctx = types.SimpleNamespace(cfg=cfg, seeds=seeds, dataset="synthetic", tables=[])
    ctx.write_table = lambda name, rows, report=True: None
    return ctx


@pytest.mark.parametrize(
    "acc, verdict",
    [
        # rises, then flat: converges
        (
            {
                1: [0.70, 0.71, 0.69],
                2: [0.80, 0.80, 0.81],
                4: [0.84, 0.85, 0.84],
                8: [0.845, 0.848, 0.842],
            },
            "reproduced",
        ),
        # flat everywhere (differences are noise): inconclusive, not a verdict from noise
        (
            {
                1: [0.85, 0.86, 0.85],
                2: [0.86, 0.85, 0.86],
                4: [0.85, 0.86, 0.855],
                8: [0.86, 0.85, 0.86],
            },
            "inconclusive",
        ),
        # flat, then moving a lot at the deep end: not reproduced
        (
            {
                1: [0.85, 0.85, 0.85],
                2: [0.851, 0.849, 0.85],
                4: [0.85, 0.85, 0.85],
                8: [0.70, 0.72, 0.71],
            },
            "not reproduced",
        ),
    ],
)
def test_tied_depth_verdict_on_seed_effects(tmp_path, acc, verdict):
    ctx = _fake_ctx(tmp_path, {"depths": sorted(acc), "model": "tiny_resnet"}, [0, 1, 2])
    rows = _tied_rows(acc)
    flat = [0.8 + 0.001 * i for i in range(len(rows))]  # batch-statistics accuracies: flat
    numbers = tied_depth.aggregate(ctx, {"rows": rows, "batch_stats": flat})
    claim, diagnostic = tied_depth.claims(ctx, numbers)
    assert claim.verdict == verdict, claim.evidence
    assert "seed std" in claim.rule
    # the report's "effect over seeds" column: the spread of the effect the verdict judged
    assert claim.spread["n"] == 3 and claim.spread["mean"] == pytest.approx(claim.value)
    assert diagnostic.key == "converges_batch_stats" and diagnostic.verdict == "inconclusive"


# ----------------------------------------------------------------------------- helpers
def test_paired_and_by_seed():
    rows = [
        {"job": {"model_kwargs": {"backward": b}, "seed": s}, "acc": a}
        for b, s, a in [
            ("autograd", 0, 0.8),
            ("autograd", 1, 0.7),
            ("adjoint", 0, 0.6),
            ("adjoint", 1, None),
        ]
    ]
    ag, adj = by_seed(rows, "acc", backward="autograd"), by_seed(rows, "acc", backward="adjoint")
    assert ag == {0: 0.8, 1: 0.7} and adj[0] == 0.6 and adj[1] != adj[1]  # None -> nan
    assert paired(ag, {0: 0.5}) == pytest.approx([0.3])


def test_resnet_per_stage_backward_and_step():
    m = create(
        "resnet",
        dict(
            layers=[2, 3, 12, 1],
            width=4,
            backward=["autograd", "auto", "adjoint", "adjoint"],
            step=1.0,
        ),
        num_classes=3,
        in_channels=1,
    )
    st = dict(m.named_residual_stacks())
    assert [s.backward for s in st.values()] == ["autograd", "auto", "adjoint"]
    assert all(s.step == 1.0 for s in st.values())
    assert m.config.kwargs["step"] == 1.0
    d = create("resnet", dict(layers=[2, 3, 2, 2], width=4), num_classes=3, in_channels=1)
    assert d.config.kwargs["step"] is None and d.layer2.stack.step == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="list of 4 modes"):
        create("resnet", dict(layers=[2, 2, 2, 2], backward=["adjoint"]))
    assert adjoint_failure.stage_backwards("paper_code", "adjoint", [3, 4, 23, 3]) == [
        "autograd",
        "autograd",
        "adjoint",
        "autograd",
    ]


def test_standard_init_reaches_the_fused_stage():
    if not resode.fused.available_for("cpu"):  # tests/test_fused.py fails CI in that case
        pytest.skip("resode extension (fused ConvStack) not available")
    m = create("tiny_resnet", dict(depth=3, channels=4, engine="fused"), in_channels=1)
    assert float(m.layer1.bn2_weight.detach().abs().max()) == 0.0
    standard_residual_init(m)
    assert torch.equal(m.layer1.bn2_weight, torch.ones_like(m.layer1.bn2_weight))


def test_backward_log_counts_auto_fallbacks_on_a_non_ode_resnet():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 3, (16,))
    logs = {}
    for mode in ("autograd", "adjoint", "auto"):
        torch.manual_seed(0)
        m = standard_residual_init(
            create(
                "resnet",
                dict(layers=[2, 2, 2, 2], width=4, step=1.0, backward=mode),
                num_classes=3,
                in_channels=1,
            )
        )
        log = BackwardLog(m)
        for _ in range(3):
            torch.nn.functional.cross_entropy(m(x), y).backward()
        with torch.no_grad():  # an evaluation forward reads nothing new
            m.eval()(x)
        log.close()
        logs[mode] = log.summary()
    for mode, s in logs.items():
        assert [v["backwards"] for v in s.values()] == [3, 3, 3, 3], mode
    assert all(v["fell_back"] == 0 and v["worst_drift"] == 0 for v in logs["autograd"].values())
    assert all(v["fell_back"] == 0 and v["worst_drift"] > 0.1 for v in logs["adjoint"].values())
    assert all(v["fell_back"] == 3 and v["exact"] == 3 for v in logs["auto"].values())


def test_residual_size_is_zero_for_zero_initialised_functions():
    m = create("tiny_resnet", dict(depth=2, channels=4, engine="generic"), in_channels=1)
    x = torch.randn(8, 1, 16, 16)
    assert residual_size(m, x) == {"layer1": 0.0}
    assert residual_size(standard_residual_init(m), x)["layer1"] > 0.01


# ----------------------------------------------------------------------------- determinism
def _short_run(run_dir, seed=0):
    return train_run(
        str(run_dir),
        "tiny_resnet",
        dict(depth=2, channels=4, backward="adjoint", engine="generic"),
        "synthetic",
        SYNTH,
        None,
        "cpu",
        seed,
        residual_init="standard",
        epochs=2,
        batch_size=32,
        lr=0.1,
        max_steps_per_epoch=4,
        test_batch_size=64,
        max_eval_batches=1,
        num_threads=1,
    )


def test_a_quick_style_run_is_deterministic(tmp_path):
    a, b = _short_run(tmp_path / "a"), _short_run(tmp_path / "b")
    keys = ("train_loss", "test_acc", "test_loss")
    assert [[h[k] for k in keys] for h in a["history"]] == [
        [h[k] for k in keys] for h in b["history"]
    ]
    assert a["backward_log"] == b["backward_log"] and a["residual_size"] == b["residual_size"]
    assert a["backward_log"]["layer1"]["backwards"] == 8
    c = _short_run(tmp_path / "c", seed=1)
    assert c["history"][-1]["train_loss"] != a["history"][-1]["train_loss"]
    # resumed from its finished checkpoint: no step runs, the log of the whole run comes back
    again = _short_run(tmp_path / "a")
    assert again["backward_log"] == a["backward_log"]


# ----------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("training_claims")
    return {
        e.EXPERIMENT.id: e.EXPERIMENT.run("smoke", out=out)
        for e in (heun_depth, adjoint_failure, tied_depth, untie_finetune)
    }


def test_heun_depth_smoke_has_the_paper_code_arm(smoke):
    s = smoke["heun-depth"]
    rows = s["numbers"]["table"]
    stored = [r for r in rows if r["backward"] == "adjoint_stored"]
    assert stored and all("memcnn" in r["label"] for r in stored)
    for r in rows:
        if r["backward"] == "autograd":
            chained, paper = r["grad_error_adjoint_mean"], r["grad_error_adjoint_stored_mean"]
            assert 0 < paper and 0 < chained
            steps = r["depth"] - (r["scheme"] == "heun")
            if steps == 1:  # one step: rebuilt from the output either way
                assert chained == pytest.approx(paper, rel=1e-9)
            else:  # chained reconstructions accumulate error; stored ones do not
                assert abs(chained - paper) > 1e-3 * chained
    assert {c["key"] for c in s["claims"]} == {
        "match_depth",
        "match_depth_paper_code",
        "grad_error",
    }
    assert all(c["rule"] for c in s["claims"])
    grad = next(c for c in s["claims"] if c["key"] == "grad_error")
    assert grad["spread"]["n"] >= 1 and grad["spread"]["mean"] == pytest.approx(grad["value"])


def test_adjoint_failure_smoke_reports_fallbacks_and_memory(smoke):
    num = smoke["adjoint-failure"]["numbers"]
    auto = num["non_ode"]["auto"]
    assert auto["fell_back"] >= 1 and auto["fell_back"] <= auto["backward_passes"]
    assert num["non_ode"]["adjoint"]["fell_back"] == 0
    assert num["non_ode"]["grad_error_init"]["adjoint"] > 0.3  # step 1: not ODE-like
    for part in ("non_ode", "paper_code"):
        assert num[part]["adjoint"]["saved_MiB"] < num[part]["autograd"]["saved_MiB"]
    assert num["non_ode"]["auto"]["saved_MiB"] == num["non_ode"]["adjoint"]["saved_MiB"]
    pc = num["paper_code"]["adjoint_paper_code"]
    assert "eval-mode" in pc["label"]
    # the paper code's backward differs from the correct adjoint's
    g = num["paper_code"]["grad_error_init"]
    assert abs(g["adjoint_paper_code"] - g["adjoint"]) > 1e-3
    keys = [c["key"] for c in smoke["adjoint-failure"]["claims"]]
    assert keys == [
        "adjoint_fails",
        "auto_rescues",
        "paper_arrangement_adjoint_fails",
        "paper_code_fails",
    ]


def test_tied_and_untie_smoke_report_seed_spread(smoke):
    t = smoke["tied-depth"]["numbers"]["table"]
    assert [r["steps_per_stage"] for r in t] == [1, 2, 4]
    assert all(r["seeds"] == 2 and "acc_std" in r for r in t)
    u = smoke["untie-finetune"]["numbers"]
    assert len(u["acc"]["before"]) == len(u["acc"]["untied"]) == len(u["acc"]["tied"]) == 2
    assert u["memory_bytes"]["adjoint"] * 2 < u["memory_bytes"]["autograd"]
    keys = [c["key"] for c in smoke["untie-finetune"]["claims"]]
    assert keys == ["accuracy", "untying_matters", "untying_matters_batch_stats", "memory"]


def test_backward_modes_exist_for_every_arm():
    modes = set(resode.BACKWARD_MODES) | {"adjoint_stored", "adjoint_paper_code"}
    assert set(heun_depth.BACKWARDS) <= modes
    for spec in adjoint_failure.PARTS.values():
        assert set(spec["arms"]) <= modes
