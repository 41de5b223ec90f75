"""tied-depth (Fig. 3a): tied-weight ResNets -- test accuracy converges as depth grows.

A residual stage whose ``N`` residual functions share one set of weights (``tied=True``) with step
``1/N`` is the Euler scheme of an *autonomous* ODE; more steps refine the discretisation of the same
flow, so the accuracy of tied networks should converge as ``N`` grows (the paper's Fig. 3a, on
CIFAR-10 and ImageNet with tied ResNets). Each depth is trained from scratch on the same schedule
over several seeds; a run of seed ``s`` at every depth shares its data order.

Regime of the quick preset, and why it is a fair test: the tiny ResNet's single conv stage, tied
(:func:`resode.models.tiny_resnet` with ``tied=True``, fused engine), on Fashion-MNIST -- the whole
representation is computed by the tied flow, so the number of steps is the one thing that changes
the function class (1 step: one residual block; many steps: the flow of that block). Every depth
(1, 2, 4, 8, 16) trains ``QUICK_STEPS`` steps to the end of a cosine schedule. The paper preset
keeps the paper's four-stage tied ResNet on CIFAR-10.

BatchNorm in a tied stage (as in the paper's code, ``ImplicitNet``) is one module evaluated at
every step: its running statistics average over the steps, while in training each step is
normalised by its own batch statistics. A pilot showed that at test time this mismatch grows with
the number of steps (eval-mode accuracy falling with depth while the training loss and the
accuracy with batch statistics stay flat), so besides the paper's evaluation the experiment
reports, as a labelled diagnostic, the test accuracy with BatchNorm normalising by the statistics
of each test batch of 1000 images.

"Converges", measured on seed-level effects: for seed ``s`` the accuracy changes between
consecutive depths ``c_s(k) = acc_s(N_{k+1}) - acc_s(N_k)``; the effect ``|c_s(first)| -
|c_s(last)|`` is positive when the deepest change is smaller than the shallowest. Reproduced when
its mean exceeds its seed std (:func:`resode.reproduce.claims.verdict_above_noise`), not reproduced
when it is below minus the std (accuracy still changing more at the deep end), inconclusive
otherwise -- in particular when the accuracy does not depend on depth beyond noise at all. Both
evaluations get this verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .claims import Claim, seed_stats, verdict_above_noise
from .context import Context
from .experiment import Experiment
from .figures import pyplot
from .training import GPU_TRAIN, SMOKE_TRAIN, batch_stats_sweep, pm, quick_train, stats_row

#: training steps of the quick preset
QUICK_STEPS = 480

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


def collect(ctx: Context) -> dict[str, Any]:
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
    rows = ctx.train_sweep(jobs)
    bres = batch_stats_sweep(ctx, rows, cfg["train"])
    return {"rows": rows, "batch_stats": [b["acc"] for b in bres]}


def _effects(acc: dict[tuple[int, int], float], depths: list[int], seeds: list[int]):
    """Per seed: the accuracy changes between consecutive depths, and the effect
    ``|first change| - |last change|`` (empty with fewer than three depths)."""
    changes = {s: [acc[(d2, s)] - acc[(d1, s)] for d1, d2 in zip(depths, depths[1:])]
               for s in seeds}  # fmt: skip
    effect = [abs(c[0]) - abs(c[-1]) for c in changes.values()] if len(depths) > 2 else []
    return changes, effect


def aggregate(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    depths, seeds, rows = ctx.cfg["depths"], ctx.seeds, results["rows"]
    key = [(_depth(r["job"]), r["job"]["seed"]) for r in rows]
    acc = {k: r["best_test_acc"] for k, r in zip(key, rows)}
    acc_bs = dict(zip(key, results["batch_stats"]))
    loss = {k: r["final_train_loss"] for k, r in zip(key, rows)}
    table = []
    for d in depths:
        sel = [r for k, r in zip(key, rows) if k[0] == d]
        table.append({
            "steps_per_stage": d,
            **stats_row("acc", [acc[(d, s)] for s in seeds]),
            **stats_row("acc_batch_stats", [acc_bs[(d, s)] for s in seeds]),
            **stats_row("train_loss", [loss[(d, s)] for s in seeds]),
            "params": sel[0]["num_params"],
            "seeds": len(sel),
        })  # fmt: skip
    ctx.write_table("accuracy.csv", table)
    changes, effect = _effects(acc, depths, seeds)
    changes_bs, effect_bs = _effects(acc_bs, depths, seeds)
    return {
        "table": table,
        "changes": {str(s): c for s, c in changes.items()},
        "effect": effect,
        "changes_batch_stats": {str(s): c for s, c in changes_bs.items()},
        "effect_batch_stats": effect_bs,
    }


def figure(ctx: Context, numbers: dict[str, Any]):
    table = numbers["table"]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    d = [r["steps_per_stage"] for r in table]
    curves = (
        (axes[0], "acc", 100, "BN running statistics (the paper's evaluation)"),
        (axes[0], "acc_batch_stats", 100, "BN batch statistics (diagnostic)"),
        (axes[1], "train_loss", 1, "final training loss"),
    )
    for ax, key, scale, label in curves:
        m = np.array([r[f"{key}_mean"] for r in table]) * scale
        s = np.array([r[f"{key}_std"] for r in table]) * scale
        ax.plot(d, m, "o-", label=label)
        ax.fill_between(d, m - s, m + s, alpha=0.2)
    for ax, ylabel in zip(axes, ("test accuracy (%)", "final training loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("residual steps per stage (same parameters at every depth)")
        ax.set_ylabel(f"{ylabel}, mean ± std over {len(ctx.seeds)} seeds")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_title(f"tied-weight {ctx.cfg['model']} on {ctx.dataset}")
    return fig


def _claim(key: str, text: str, table, prefix: str, changes, effect, depths) -> Claim:
    verdict, rule = verdict_above_noise(effect) if effect else ("inconclusive", "needs 3 depths")
    first = [c[0] for c in changes.values()]
    last = [c[-1] for c in changes.values()]
    accs = ", ".join(f"{r['steps_per_stage']}: {100 * r[f'{prefix}_mean']:.1f} ± "
                     f"{100 * r[f'{prefix}_std']:.1f}" for r in table)  # fmt: skip
    return Claim(
        key=key,
        text=text,
        evidence=(f"test accuracy (%) by steps/stage, mean ± std over seeds: {accs}; "
                  f"seed-paired change {depths[0]}->{depths[1]}: {pm(first, digits=2)} pts, "
                  f"{depths[-2]}->{depths[-1]}: {pm(last, digits=2)} pts; final training loss "
                  + ", ".join(f"{r['steps_per_stage']}: {r['train_loss_mean']:.3f}"
                              for r in table)),
        value=float(np.mean(effect)) if effect else None,
        verdict=verdict,
        rule="per seed, |accuracy change between the two shallowest depths| - |change "
        "between the two deepest|: " + rule,
        spread=seed_stats(effect) if effect else None,
    )  # fmt: skip


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    table, depths = numbers["table"], ctx.cfg["depths"]
    return [
        _claim("converges", "test accuracy of tied-weight ResNets converges as depth grows",
               table, "acc", numbers["changes"], numbers["effect"], depths),
        _claim("converges_batch_stats", "(diagnostic, not in the paper) the same, with "
               "BatchNorm normalising by test-batch statistics instead of the running "
               "statistics that a tied stage shares across its steps", table, "acc_batch_stats",
               numbers["changes_batch_stats"], numbers["effect_batch_stats"], depths),
    ]  # fmt: skip


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
