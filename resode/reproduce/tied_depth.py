"""tied-depth (Fig. 3a): tied-weight ResNets -- accuracy converges as depth grows.

A ResNet whose residual stacks share one residual function per stage (``tied=True``) is a
discretised *autonomous* ODE; increasing the number of steps refines the discretisation, so the
test accuracy should converge as depth grows. Trained at several depths (steps per stage), same
schedule; best-epoch test accuracy per depth.

Presets: ``paper`` = CIFAR-10, SGD 0.1 momentum 0.9 wd 5e-4, batch 128, cosine, 200 epochs, the
paper's basic-block ResNet stages with tied weights; ``quick`` = Fashion-MNIST, width 8,
ImageNet-style stem (cheap on CPU), a few dozen steps. "Converges" is measured as: the accuracy
change between the two deepest models is smaller than between the two shallowest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .claims import Claim
from .context import Context
from .experiment import Experiment
from .figures import pyplot

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        depths=[1, 2, 4],
        seeds=[0],
        model=dict(block="basic", width=4, small_input=False),
        train=dict(epochs=1, batch_size=64, lr=0.1, max_steps_per_epoch=3, max_eval_batches=1),
    ),
    "quick": dict(
        depths=[1, 2, 4, 8],
        seeds=[0],
        model=dict(block="basic", width=8, small_input=False),
        train=dict(epochs=1, batch_size=128, lr=0.1, max_steps_per_epoch=300, max_eval_batches=5),
    ),
    "paper": dict(
        depths=[1, 2, 4, 8, 16, 32],
        seeds=[0, 1, 2],
        model=dict(block="basic", width=64, small_input=True),
        train=dict(
            epochs=200,
            batch_size=128,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
        ),
    ),
}


def collect(ctx: Context) -> list[dict[str, Any]]:
    jobs = [
        ctx.train_job(
            f"steps{d}-s{s}",
            "resnet",
            dict(layers=[d + 1] * 4, tied=True, scheme="euler", **ctx.cfg["model"]),
            ctx.cfg["train"],
            seed=s,
        )
        for d in ctx.cfg["depths"]
        for s in ctx.seeds
    ]
    return ctx.train_sweep(jobs)


def aggregate(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    table = []
    for d in ctx.cfg["depths"]:
        sel = [r for r in rows if r["job"]["model_kwargs"]["layers"][0] == d + 1]
        accs = [r["best_test_acc"] for r in sel]
        table.append(
            {
                "steps_per_stage": d,
                "acc_mean": float(np.mean(accs)),
                "acc_min": float(np.min(accs)),
                "acc_max": float(np.max(accs)),
                "params": sel[0]["num_params"],
                "seeds": len(accs),
            }
        )
    ctx.write_table("accuracy.csv", table)
    acc = [r["acc_mean"] for r in table]
    first_change = abs(acc[1] - acc[0]) if len(acc) > 1 else float("nan")
    last_change = abs(acc[-1] - acc[-2]) if len(acc) > 1 else float("nan")
    return {"table": table, "first_change": first_change, "last_change": last_change}


def figure(ctx: Context, numbers: dict[str, Any]):
    table = numbers["table"]
    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    d = [r["steps_per_stage"] for r in table]
    ax.plot(d, [100 * r["acc_mean"] for r in table], "o-", label="tied ResNet (mean)")
    ax.fill_between(
        d, [100 * r["acc_min"] for r in table], [100 * r["acc_max"] for r in table], alpha=0.2
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("residual steps per stage (same parameters at every depth)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(f"tied-weight ResNet on {ctx.dataset}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    table, first, last = numbers["table"], numbers["first_change"], numbers["last_change"]
    return [
        Claim(
            key="converges",
            text="test accuracy of tied-weight ResNets converges as depth grows",
            evidence=(
                "accuracy (%) by steps/stage: "
                + ", ".join(f"{r['steps_per_stage']}: {100 * r['acc_mean']:.1f}" for r in table)
                + f"; change between the two shallowest {100 * first:.1f} pts, "
                f"between the two deepest {100 * last:.1f} pts"
            ),
            value=last,
            verdict="reproduced" if (len(table) > 2 and last < first) else "not reproduced",
            rule="reproduced when the accuracy change between the two deepest models is smaller "
            "than between the two shallowest (at least three depths)",
        )
    ]


EXPERIMENT = Experiment(
    "tied-depth", "Fig. 3a: tied-weight ResNets, test accuracy vs depth",
    PRESETS, collect, aggregate, figure, claims,
    figure_name="tied_depth", paper_dataset="cifar10"
)  # fmt: skip
