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

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import Claim, check_preset, finish, pyplot, run_sweep, save_figure, write_csv
from .training import train_run as train_point

ID = "tied-depth"
TITLE = "Fig. 3a: tied-weight ResNets, test accuracy vs depth"

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


def run(
    preset: str = "quick",
    out: str | os.PathLike = "results",
    seeds: list[int] | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    launcher: str = "inline",
    **overrides: Any,
) -> dict[str, Any]:
    from .training import dataset_for

    check_preset(preset)
    t0 = time.time()
    cfg = {**PRESETS[preset], **overrides}
    seeds = list(seeds or cfg["seeds"])
    out_dir = Path(out) / ID
    dataset, data_kwargs = dataset_for(preset, data_root, paper="cifar10")
    cfg["dataset"] = dataset
    jobs = [
        dict(
            run_dir=str(out_dir / "runs" / f"steps{d}-s{s}"),
            model="resnet",
            model_kwargs=dict(layers=[d + 1] * 4, tied=True, scheme="euler", **cfg["model"]),
            dataset=dataset,
            data_kwargs=data_kwargs,
            data_root=data_root,
            device=device,
            seed=s,
            **cfg["train"],
        )
        for d in cfg["depths"]
        for s in seeds
    ]
    rows = run_sweep(
        train_point,
        jobs,
        out_dir / "runs",
        key=lambda j: Path(j["run_dir"]).name,
        launcher=launcher,
        desc="tied-depth",
    )
    table = []
    for d in cfg["depths"]:
        accs = [r["best_test_acc"] for r in rows if r["job"]["model_kwargs"]["layers"][0] == d + 1]
        table.append(
            {
                "steps_per_stage": d,
                "acc_mean": float(np.mean(accs)),
                "acc_min": float(np.min(accs)),
                "acc_max": float(np.max(accs)),
                "params": next(
                    r["num_params"] for r in rows if r["job"]["model_kwargs"]["layers"][0] == d + 1
                ),
                "seeds": len(accs),
            }
        )
    write_csv(out_dir / "accuracy.csv", table)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    d = [r["steps_per_stage"] for r in table]
    ax.plot(d, [100 * r["acc_mean"] for r in table], "o-", label="tied ResNet (mean)")
    ax.fill_between(
        d, [100 * r["acc_min"] for r in table], [100 * r["acc_max"] for r in table], alpha=0.2
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("residual steps per stage (same parameters at every depth)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(f"tied-weight ResNet on {dataset}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figures = save_figure(fig, out_dir, "tied_depth")

    acc = [r["acc_mean"] for r in table]
    first_change = abs(acc[1] - acc[0]) if len(acc) > 1 else float("nan")
    last_change = abs(acc[-1] - acc[-2]) if len(acc) > 1 else float("nan")
    ok = len(acc) > 2 and last_change < first_change
    claims = [
        Claim(
            key="converges",
            text="test accuracy of tied-weight ResNets converges as depth grows",
            evidence=(
                "accuracy (%) by steps/stage: "
                + ", ".join(f"{r['steps_per_stage']}: {100 * r['acc_mean']:.1f}" for r in table)
                + f"; change between the two shallowest {100 * first_change:.1f} pts, "
                f"between the two deepest {100 * last_change:.1f} pts"
            ),
            value=last_change,
            verdict="reproduced" if ok else "not reproduced",
        )
    ]
    return finish(
        out_dir,
        ID,
        preset,
        cfg,
        seeds,
        device,
        t0,
        {"table": table, "first_change": first_change, "last_change": last_change},
        claims,
        figures,
        tables=["accuracy.csv"],
    )


if __name__ == "__main__":
    from resode.cli import experiment_main

    experiment_main(ID)
