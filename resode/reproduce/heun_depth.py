"""heun-depth (Fig. 3c): test error vs depth for Euler/Heun x autograd/adjoint.

The tiny ResNet (:func:`resode.models.tiny_resnet`) trained at several depths with each scheme
and backward mode, several seeds; best-epoch test error, mean and quartiles over seeds. The
paper's claim: with the adjoint, Heun matches autograd from a smaller depth than Euler.

"Matches" is measured as: the smallest depth ``D`` such that at every depth ``>= D`` the mean
adjoint error is within ``match_tol`` (absolute, default 2 points; 1 point on the paper preset)
of the mean autograd error of the same scheme.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .claims import Claim
from .context import Context
from .experiment import Experiment
from .figures import pyplot
from .sweeps import file_stamp

METHODS = [("euler", "autograd"), ("euler", "adjoint"), ("heun", "autograd"), ("heun", "adjoint")]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        depths=[2, 4],
        seeds=[0],
        train=dict(epochs=1, batch_size=64, lr=0.1, max_steps_per_epoch=4, max_eval_batches=1),
        match_tol=0.02,
    ),
    "quick": dict(
        depths=[2, 4, 8, 16],
        seeds=[0, 1],
        train=dict(
            epochs=1,
            batch_size=128,
            lr=0.1,
            schedule="cosine",
            max_steps_per_epoch=250,
            max_eval_batches=5,
            test_batch_size=1000,
        ),
        match_tol=0.02,
    ),
    "paper": dict(
        depths=[2, 4, 8, 16, 32, 64],
        seeds=[1, 2, 3, 4],
        train=dict(
            epochs=90,
            batch_size=256,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="multistep",
            milestones=[30, 60],
            gamma=0.1,
        ),
        match_tol=0.01,
    ),
}


def grad_error_point(
    checkpoint: str,
    dataset: str,
    data_kwargs: dict,
    data_root: str | None,
    batch: int,
    seed: int,
    checkpoint_stamp: float | None = None,
) -> dict[str, Any]:
    """Adjoint vs autograd gradient error (global relative norm) of a trained model."""
    from resode.diagnostics import gradient_error
    from resode.utils import seed_everything

    from .training import load_model, one_batch

    x, y = one_batch(dataset, data_root, data_kwargs, batch, seed)
    seed_everything(seed)
    net = load_model(checkpoint).double().train()
    return {"global_rel": gradient_error(net, x.double(), y)["global_rel"]}


def match_depth(table: list[dict[str, Any]], scheme: str, tol: float) -> int | None:
    """Smallest depth from which adjoint is within ``tol`` of autograd (``None``: never)."""
    depths = sorted({r["depth"] for r in table})
    err = {(r["depth"], r["backward"]): r["error_mean"] for r in table if r["scheme"] == scheme}
    best = None
    for d in reversed(depths):
        if abs(err[(d, "adjoint")] - err[(d, "autograd")]) <= tol:
            best = d
        else:
            break
    return best


def collect(ctx: Context) -> dict[str, Any]:
    jobs = [
        ctx.train_job(
            f"{scheme}-{backward}-N{depth}-s{seed}",
            "tiny_resnet",
            dict(depth=depth, scheme=scheme, backward=backward),
            ctx.cfg["train"],
            seed=seed,
        )  # fmt: skip
        for depth in ctx.cfg["depths"]
        for scheme, backward in METHODS
        for seed in ctx.seeds
    ]
    rows = ctx.train_sweep(jobs)
    # gradient error of the adjoint on the autograd-trained models (first seed), per depth
    ckpts = {
        (r["job"]["model_kwargs"]["scheme"], r["job"]["model_kwargs"]["depth"]): r["checkpoint"]
        for r in rows
        if r["job"]["model_kwargs"]["backward"] == "autograd" and r["job"]["seed"] == ctx.seed
    }
    gjobs = [
        dict(checkpoint=c, checkpoint_stamp=file_stamp(c), **ctx.data,
             batch=ctx.training(ctx.cfg["train"])["batch_size"], seed=ctx.seed)
        for c in ckpts.values()
    ]  # fmt: skip
    gres = ctx.sweep(grad_error_point, gjobs, key=lambda j: Path(j["checkpoint"]).parent.name,
                     folder="grad", desc="gradient error")  # fmt: skip
    return {"rows": rows, "grad": {k: g["global_rel"] for k, g in zip(ckpts, gres)}}


def aggregate(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    rows, gerr = results["rows"], results["grad"]
    table = []
    for depth in ctx.cfg["depths"]:
        for scheme, backward in METHODS:
            kw = dict(depth=depth, scheme=scheme, backward=backward)
            errs = [r["best_test_error"] for r in rows if r["job"]["model_kwargs"] == kw]
            q1, med, q3 = np.percentile(errs, [25, 50, 75])
            table.append({**kw, "error_mean": float(np.mean(errs)), "error_q1": float(q1),
                          "error_median": float(med), "error_q3": float(q3),
                          "seeds": len(errs),
                          "adjoint_grad_error_trained": gerr.get((scheme, depth))})  # fmt: skip
    ctx.write_table("test_error.csv", table)
    tol = ctx.cfg["match_tol"]
    err = {(r["scheme"], r["depth"], r["backward"]): r["error_mean"] for r in table}
    gap = {
        s: {d: err[(s, d, "adjoint")] - err[(s, d, "autograd")] for d in ctx.cfg["depths"]}
        for s in ("euler", "heun")
    }
    return {
        "grad_error_trained": {f"{s}/N{d}": v for (s, d), v in gerr.items()},
        "match_depth": {s: match_depth(table, s, tol) for s in ("euler", "heun")},
        "gap": gap,
        "table": table,
        "_grad": gerr,
    }


def figure(ctx: Context, numbers: dict[str, Any]):
    fig, ax = pyplot().subplots(figsize=(6, 4.2))
    colors = {"euler": "tab:blue", "heun": "tab:red"}
    for scheme, backward in METHODS:
        t = [r for r in numbers["table"] if r["scheme"] == scheme and r["backward"] == backward]
        d = [r["depth"] for r in t]
        ls = "-" if backward == "autograd" else "--"
        ax.plot(d, [100 * r["error_mean"] for r in t], ls, marker="o", color=colors[scheme],
                label=f"{scheme} + {backward}")  # fmt: skip
        ax.fill_between(d, [100 * r["error_q1"] for r in t], [100 * r["error_q3"] for r in t],
                        color=colors[scheme], alpha=0.15)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth N")
    ax.set_ylabel("best test error (%)")
    ax.set_title(f"tiny ResNet on {ctx.dataset}: mean and quartiles over {len(ctx.seeds)} seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    tol, depths, gerr = ctx.cfg["match_tol"], ctx.cfg["depths"], numbers["_grad"]
    d_euler, d_heun = numbers["match_depth"]["euler"], numbers["match_depth"]["heun"]
    big = 10**9
    gap_txt = "; ".join(
        f"{s}: " + ", ".join(f"N={d}: {100 * g:+.1f}" for d, g in numbers["gap"][s].items())
        for s in ("euler", "heun")
    )
    ratio = np.mean([gerr[("heun", d)] / max(gerr[("euler", d)], 1e-300) for d in depths])
    heun_closer = all(gerr[("heun", d)] < gerr[("euler", d)] for d in depths)
    return [
        Claim(
            key="match_depth",
            text="with the adjoint, Heun matches autograd from a smaller depth than Euler",
            evidence=(
                f"adjoint within {100 * tol:.0f} pts of autograd from depth "
                f"Euler={d_euler}, Heun={d_heun} (None = never); adjoint-autograd error gap "
                f"(pts) {gap_txt}"
            ),
            value=float(d_heun) if d_heun else float("nan"),
            verdict="reproduced" if (d_heun or big) < (d_euler or big) else "not reproduced",
            rule=f"reproduced when the depth from which the adjoint's mean error stays within "
            f"{100 * tol:.0f} pts of autograd's is smaller for Heun than for Euler",
        ),
        Claim(
            key="grad_error",
            text="at equal depth, Heun adjoint gradients are closer to autograd's than Euler's",
            evidence="relative gradient error ||g_adj-g_bp||/||g_bp|| of the autograd-trained "
            "models: "
            + "; ".join(
                f"N={d}: Euler {gerr[('euler', d)]:.2e}, Heun {gerr[('heun', d)]:.2e}"
                for d in depths
            ),
            value=float(ratio),
            verdict="reproduced" if heun_closer else "not reproduced",
            rule="reproduced when Heun's error is below Euler's at every depth",
        ),
    ]


EXPERIMENT = Experiment(
    "heun-depth", "Fig. 3c: test error vs depth, Euler/Heun x autograd/adjoint",
    PRESETS, collect, aggregate, figure, claims,
    figure_name="test_error_vs_depth", paper_dataset="cifar10"
)  # fmt: skip
