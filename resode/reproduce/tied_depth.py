"""tied-depth (Fig. 3a): tied-weight ResNets -- test accuracy converges as depth grows.

A residual stage whose ``N`` residual functions share one set of weights (``tied=True``) with step
``1/N`` is the Euler scheme of an *autonomous* ODE; more steps refine the discretisation of the same
flow, so the accuracy of tied networks should converge as ``N`` grows (the paper's Fig. 3a, on
CIFAR-10 and ImageNet with tied ResNets). Each depth is trained from scratch on the same schedule
over several seeds; a run of seed ``s`` at every depth shares its data order.

Regime (the quick preset), and why it is a fair test: the tiny ResNet's single conv stage, tied
(:func:`resode.models.tiny_resnet` with ``tied=True``, fused engine), on Fashion-MNIST -- the whole
representation is computed by the tied flow, so the number of steps is the one thing that changes
the function class (1 step: one residual block; many steps: the flow of that block). Trained to
the end of a cosine schedule (``QUICK_STEPS`` steps), depths 1, 2, 4, 8, 16. The paper preset keeps
the paper's four-stage tied ResNet on CIFAR-10.

"Converges", measured on seed-level effects: for seed ``s`` the accuracy changes between
consecutive depths ``c_s(k) = acc_s(N_{k+1}) - acc_s(N_k)``; the effect ``|c_s(first)| -
|c_s(last)|`` is positive when the deepest change is smaller than the shallowest. Reproduced when
its mean exceeds its seed std (:func:`resode.reproduce.claims.verdict_above_noise`), not reproduced
when it is below minus the std (accuracy still changing more at the deep end), inconclusive
otherwise -- in particular when the accuracy does not depend on depth beyond noise at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .claims import Claim, verdict_above_noise
from .context import Context
from .experiment import Experiment
from .figures import pyplot
from .training import GPU_TRAIN, SMOKE_TRAIN, pm, quick_train, stats_row

#: training steps of the quick preset
QUICK_STEPS = 600

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        depths=[1, 2, 4],
        seeds=[0, 1],
        model="tiny_resnet",
        model_kwargs=dict(channels=4, tied=True),
        train=SMOKE_TRAIN,
    ),
    "quick": dict(
        depths=[1, 2, 4, 8, 16],
        seeds=[0, 1, 2],
        model="tiny_resnet",
        model_kwargs=dict(channels=8, tied=True),
        train=quick_train(QUICK_STEPS),
    ),
    # one H100/H200, fused conv stage: the quick regime on CIFAR-10 (16 channels, whole
    # training set, 2 epochs of batch 128); 15 runs at ~2-8 ms/step (an estimate) = ~1 min
    "gpu": dict(
        depths=[1, 2, 4, 8, 16],
        seeds=[0, 1, 2],
        model="tiny_resnet",
        model_kwargs=dict(channels=16, tied=True),
        train=dict(GPU_TRAIN, epochs=2),
    ),
    "paper": dict(
        depths=[1, 2, 4, 8, 16, 32],
        seeds=[0, 1, 2],
        model="resnet",
        model_kwargs=dict(block="basic", width=64, small_input=True, tied=True),
        train=dict(GPU_TRAIN, epochs=200, deterministic=False),
    ),
}


def model_kwargs(model: str, kwargs: dict[str, Any], depth: int) -> dict[str, Any]:
    """The model's arguments at ``depth`` residual steps per stage (ResNet: every stage holds
    one ordinary block and ``depth`` tied residual functions)."""
    if model == "tiny_resnet":
        return dict(kwargs, depth=depth)
    if model == "resnet":
        return dict(kwargs, layers=[depth + 1] * 4)
    raise ValueError(f"tied-depth knows models 'tiny_resnet' and 'resnet', got {model!r}")


def _depth(job: dict[str, Any]) -> int:
    kw = job["model_kwargs"]
    return kw["depth"] if "depth" in kw else kw["layers"][0] - 1


def collect(ctx: Context) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    jobs = [
        ctx.train_job(
            f"steps{d}-s{s}",
            cfg["model"],
            model_kwargs(cfg["model"], cfg["model_kwargs"], d),
            cfg["train"],
            seed=s,
        )
        for d in cfg["depths"]
        for s in ctx.seeds
    ]
    return ctx.train_sweep(jobs)


def aggregate(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    depths = ctx.cfg["depths"]
    acc = {(_depth(r["job"]), r["job"]["seed"]): r["best_test_acc"] for r in rows}
    loss = {(_depth(r["job"]), r["job"]["seed"]): r["final_train_loss"] for r in rows}
    table = []
    for d in depths:
        a = [acc[(d, s)] for s in ctx.seeds]
        ls = [loss[(d, s)] for s in ctx.seeds]
        sel = [r for r in rows if _depth(r["job"]) == d]
        table.append(
            {
                "steps_per_stage": d,
                **stats_row("acc", a),
                **stats_row("train_loss", ls),
                "params": sel[0]["num_params"],
                "seeds": len(a),
            }
        )
    ctx.write_table("accuracy.csv", table)
    # per seed: accuracy change between consecutive depths
    changes = {
        s: [acc[(d2, s)] - acc[(d1, s)] for d1, d2 in zip(depths, depths[1:])] for s in ctx.seeds
    }
    effect = [abs(c[0]) - abs(c[-1]) for c in changes.values()] if len(depths) > 2 else []
    return {"table": table, "changes": {str(s): c for s, c in changes.items()}, "effect": effect}


def figure(ctx: Context, numbers: dict[str, Any]):
    table = numbers["table"]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    d = [r["steps_per_stage"] for r in table]
    for ax, key, scale, label in (
        (axes[0], "acc", 100, "best test accuracy (%)"),
        (axes[1], "train_loss", 1, "final training loss"),
    ):
        m = np.array([r[f"{key}_mean"] for r in table]) * scale
        s = np.array([r[f"{key}_std"] for r in table]) * scale
        ax.plot(d, m, "o-", label=f"tied, mean ± std over {len(ctx.seeds)} seeds")
        ax.fill_between(d, m - s, m + s, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("residual steps per stage (same parameters at every depth)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"tied-weight {ctx.cfg['model']} on {ctx.dataset}")
    axes[0].legend()
    return fig


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    table, effect, depths = numbers["table"], numbers["effect"], ctx.cfg["depths"]
    if not effect:
        verdict, rule = "inconclusive", "needs at least three depths"
    else:
        verdict, rule = verdict_above_noise(effect)
    chg = numbers["changes"]
    first = [c[0] for c in chg.values()]
    last = [c[-1] for c in chg.values()]
    return [
        Claim(
            key="converges",
            text="test accuracy of tied-weight ResNets converges as depth grows",
            evidence=(
                "best test accuracy (%) by steps/stage, mean ± std over seeds: "
                + ", ".join(
                    f"{r['steps_per_stage']}: {100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}"
                    for r in table
                )
                + f"; seed-paired change {depths[0]}->{depths[1]}: {pm(first, digits=2)} pts, "
                f"{depths[-2]}->{depths[-1]}: {pm(last, digits=2)} pts"
            ),
            value=float(np.mean(effect)) if effect else None,
            verdict=verdict,
            rule="per seed, |accuracy change between the two shallowest depths| - |change "
            "between the two deepest|: " + rule,
        )
    ]


EXPERIMENT = Experiment(
    "tied-depth",
    "Fig. 3a: tied-weight ResNets, test accuracy vs depth",
    PRESETS,
    collect,
    aggregate,
    figure,
    claims,
    figure_name="tied_depth",
    paper_dataset="cifar10",
)
