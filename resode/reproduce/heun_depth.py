"""heun-depth (Fig. 3c): test error vs depth, Euler/Heun x autograd / adjoint / paper-code adjoint.

The tiny ResNet (:func:`resode.models.tiny_resnet`) is trained at several depths ``N`` (step
``h = 1/N``) with each scheme and each backward, over several seeds. The paper's claim: trained
with the adjoint, Heun matches autograd from a smaller depth than Euler.

Orders. Euler's reverse step ``x_n ~ x_{n+1} - h f_n(x_{n+1})`` has local error ``O(h^2)``; Heun's
reverse step has local error ``O(h^4)`` when the weights are smooth in depth (``O(h^2)`` at a
jump), so its adjoint gradient error falls like ``O(1/N^2)`` or faster (measured about
``1/N^3``). With the paper's step ``h = 1/N`` a Heun stage of ``N`` functions takes ``N - 1``
steps and spans ``[0, (N-1)/N]``, so as an approximation of the flow on ``[0, 1]`` it is first
order (``resode.ResidualStack(..., step="unit")`` spans ``[0, 1]``; the tiny ResNet keeps the
paper's step). BatchNorm running statistics are updated once per block *evaluation* -- twice per
forward for Heun's inner functions -- as in the paper's code.

Arms (each scheme):

* ``autograd``: exact gradients.
* ``adjoint``: the memory-free reconstruction adjoint: every ``x_n`` is rebuilt from the stage
  output by chained reverse steps (errors accumulate over the steps) -- the method as it runs.
* ``adjoint_stored``: **what the paper's code trained with** for this figure: its
  ``train_tiny.py`` wraps every block in memcnn's ``InvertibleModuleWrapper``, which inverts each
  block from its *stored* output (errors do not chain; memory ``O(N)``). A one-step stage (Heun
  at ``N = 2``) rebuilds its input from its output under both adjoints: that run is shared.

Regime of the quick preset, and why it is a fair test. The adjoint's gradient error is set by the
size of the residual functions relative to the step: the claim can only show once the trained
functions are far from zero. The paper's tiny ResNet zero-initialises the last BN of every
residual function (``train_tiny.py``: ``zero_init=True``) and trains 90 epochs, long enough for
the functions to grow. In a pilot (seed 0, Fashion-MNIST, 8 channels, batch 64, lr 0.1 cosine)
zero-initialised functions grew slowly and the adjoints' accuracy only departed from autograd's
after ~1000 steps (800 steps: within 1 point at ``N = 2``; 1600 steps at ``N = 2``: 15 points
below for both schemes; at ``N = 3``: Euler 2.9 points below, Heun 0.15; at ``N = 4``: all arms
within 0.6), which the CPU budget cannot afford for 54 runs. The quick preset therefore starts
the residual functions at ``O(1)`` with torchvision's initialisation (last BN weight 1, as the
paper's own ResNet-101 for Fig. 3b: ``zero_init_residual=False``): the regime the paper's tiny
ResNets reach after long training, from the first step (pilot, 800 steps, ``N = 2``: Euler -4.3,
Heun -3.8 points; ``N = 3``: Euler -2.1, Heun -1.0). The size ``||x_N - x_0|| / ||x_0||`` of
every trained stage is reported. Depths 2, 3, 4: where the reconstruction starts and stops
mattering at this training length, so every arm *could* fail or match there; trained
``QUICK_STEPS`` steps to the end of a cosine schedule. The paper preset keeps zero init.

Verdicts use the seed-paired excess error of each adjoint arm, ``gap_s(N) = err_adjoint -
err_autograd`` (same seed: same initialisation and data order). The adjoint *matches* autograd
at depth ``N`` when the mean gap is at most ``max(match_tol, its seed std)``; the *match depth* is
the smallest depth from which it matches at every larger depth. Reproduced when Heun's match
depth is smaller than Euler's *and*, at Heun's match depth, Euler's gap exceeds Heun's by more
than the seed std of the paired difference; not reproduced when the opposite holds beyond the
noise; inconclusive otherwise. Test error is the best over the evaluations (the paper's
``max(test_acc)``); the final training loss is reported beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .claims import Claim, above_noise, seed_stats, verdict_above_noise
from .context import Context
from .experiment import Experiment
from .figures import pyplot
from .sweeps import file_stamp
from .training import GPU_TRAIN, SMOKE_TRAIN, by_seed, paired, pm, quick_train, stats_row

SCHEMES = ("euler", "heun")
BACKWARDS = ("autograd", "adjoint", "adjoint_stored")
ADJOINTS = ("adjoint", "adjoint_stored")
LABELS = {
    "autograd": "autograd",
    "adjoint": "adjoint (chained, memory-free)",
    "adjoint_stored": "paper code: per-block inversion from stored outputs (memcnn)",
}
#: training steps of the quick preset (see the module docstring)
QUICK_STEPS = 720

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        depths=[2, 3],
        seeds=[0],
        model=dict(channels=4),
        train=SMOKE_TRAIN,
        grad_batch=32,
        residual_init="standard",
        match_tol=0.02,
    ),
    "quick": dict(
        depths=[2, 3, 4],
        seeds=[0, 1, 2],
        model=dict(channels=8),
        train=quick_train(QUICK_STEPS),
        grad_batch=64,
        residual_init="standard",
        match_tol=0.01,
    ),
    # one H100/H200, fused conv stage: the quick regime on CIFAR-10 at the paper's width (16
    # channels), whole training set, 2 epochs of batch 128 (780 steps); 54 runs at ~4 ms/step
    # (a launch-bound tiny stage; an estimate, not measured) = ~3 min
    "gpu": dict(
        depths=[2, 3, 4],
        seeds=[0, 1, 2],
        model=dict(channels=16),
        train=dict(GPU_TRAIN, epochs=2),
        grad_batch=128,
        residual_init="standard",
        match_tol=0.01,
    ),
    "paper": dict(
        depths=[2, 4, 8, 16, 32, 64],
        seeds=[1, 2, 3, 4],
        model=dict(channels=16),
        train=dict(
            GPU_TRAIN,
            epochs=90,
            batch_size=256,
            schedule="multistep",
            milestones=[30, 60],
            gamma=0.1,
            deterministic=False,
        ),
        grad_batch=256,
        residual_init="zero",
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
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Relative gradient error ``||g_adj - g_bp|| / ||g_bp||`` of a trained model, float64, one
    training batch: the chained adjoint and the paper code's stored-output protocol."""
    from resode.diagnostics import gradient_error
    from resode.utils import seed_everything

    from .training import fixed_threads, load_model, one_batch

    x, y = one_batch(dataset, data_root, data_kwargs, batch, seed)
    net = load_model(checkpoint).double().train()
    out = {}
    with fixed_threads(num_threads):
        for variant in ADJOINTS:
            seed_everything(seed)
            out[variant] = gradient_error(net, x.double(), y, variant=variant)["global_rel"]
    return out


def _one_step(scheme: str, depth: int) -> bool:
    return depth - (scheme == "heun") == 1


def _shares_stored(kw: dict[str, Any]) -> bool:
    """A one-step stage rebuilds its input from its output under both adjoints: the
    ``adjoint_stored`` run would repeat the ``adjoint`` run number for number (measured: equal
    errors, losses and residual sizes), so it is not trained again."""
    return kw["backward"] == "adjoint" and _one_step(kw["scheme"], kw["depth"])


def _shared_stored_run(run: dict[str, Any]) -> dict[str, Any]:
    job = dict(run["job"], model_kwargs=dict(run["job"]["model_kwargs"], backward="adjoint_stored"))
    return dict(run, job=job, shared_with="adjoint")


def collect(ctx: Context) -> dict[str, Any]:
    jobs = [
        ctx.train_job(
            f"{scheme}-{bw}-N{depth}-s{seed}",
            "tiny_resnet",
            dict(depth=depth, scheme=scheme, backward=bw, **ctx.cfg["model"]),
            ctx.cfg["train"],
            seed=seed,
            residual_init=ctx.cfg.get("residual_init", "zero"),
        )
        for depth in ctx.cfg["depths"]
        for scheme in SCHEMES
        for bw in BACKWARDS
        for seed in ctx.seeds
        if not (bw == "adjoint_stored" and _one_step(scheme, depth))
    ]
    rows = list(ctx.train_sweep(jobs))
    rows += [_shared_stored_run(r) for r in rows if _shares_stored(r["job"]["model_kwargs"])]
    # gradient errors of both adjoints on every autograd-trained model
    auto = [r for r in rows if r["job"]["model_kwargs"]["backward"] == "autograd"]
    gjobs = [
        dict(
            checkpoint=r["checkpoint"],
            checkpoint_stamp=file_stamp(r["checkpoint"]),
            **ctx.data,
            batch=ctx.cfg["grad_batch"],
            seed=r["job"]["seed"],
            num_threads=ctx.training(ctx.cfg["train"]).get("num_threads"),
        )
        for r in auto
    ]
    gres = ctx.sweep(
        grad_error_point,
        gjobs,
        key=lambda j: Path(j["checkpoint"]).parent.name,
        folder="grad",
        desc="gradient error",
    )
    grad = {}
    for r, g in zip(auto, gres):
        kw = r["job"]["model_kwargs"]
        for variant in ADJOINTS:
            grad[(kw["scheme"], kw["depth"], variant, r["job"]["seed"])] = g[variant]
    return {"rows": rows, "grad": grad}


def _gaps(rows: list[dict[str, Any]], depths: list[int]) -> dict[tuple[str, str, int], list]:
    """Seed-paired ``err_adjoint - err_autograd`` per (scheme, adjoint arm, depth)."""
    out = {}
    for scheme in SCHEMES:
        for depth in depths:
            ref = by_seed(rows, "best_test_error", scheme=scheme, depth=depth, backward="autograd")
            for bw in ADJOINTS:
                err = by_seed(rows, "best_test_error", scheme=scheme, depth=depth, backward=bw)
                out[(scheme, bw, depth)] = paired(err, ref)
    return out


def matches(gaps: list[float], tol: float) -> bool:
    """The adjoint matches autograd: mean shortfall at most ``max(tol, seed std)``."""
    st = seed_stats(gaps)
    return st["mean"] <= max(tol, st["std"])


def match_depth(gaps: dict[int, list[float]], tol: float) -> int | None:
    """Smallest depth from which :func:`matches` holds at every larger depth (``None``: never)."""
    best = None
    for d in sorted(gaps, reverse=True):
        if not matches(gaps[d], tol):
            break
        best = d
    return best


def match_verdict(
    gap_euler: dict[int, list[float]], gap_heun: dict[int, list[float]], tol: float
) -> tuple[str, str, dict[str, Any]]:
    """``(verdict, rule, details)`` of "Heun matches autograd from a smaller depth than Euler"
    (module docstring): the match depths, then the seed-paired effect at the deciding depth."""
    d_e, d_h = match_depth(gap_euler, tol), match_depth(gap_heun, tol)
    inf = math.inf
    rule = (
        f"adjoint matches autograd at N when its mean seed-paired error excess is <= "
        f"max({100 * tol:g} pts, its seed std); reproduced when Heun's match depth is smaller "
        "than Euler's and, at Heun's, Euler's excess minus Heun's (paired by seed) has mean > "
        "1 seed std; not reproduced when the opposite holds beyond 1 std; else "
        "inconclusive"
    )
    details: dict[str, Any] = {"match_depth_euler": d_e, "match_depth_heun": d_h}
    if (d_h or inf) == (d_e or inf):
        return "inconclusive", rule, details
    # the scheme that matches first decides; only its direction can give a verdict
    d, want = (d_h, "reproduced") if (d_h or inf) < (d_e or inf) else (d_e, "not reproduced")
    effect = [e - h for e, h in zip(gap_euler[d], gap_heun[d])]
    verdict, _ = verdict_above_noise(effect)
    details.update(deciding_depth=d, effect=effect)
    return (want if verdict == want else "inconclusive"), rule, details


def _table(ctx: Context, rows, grad, gaps) -> list[dict[str, Any]]:
    table = []
    for depth in ctx.cfg["depths"]:
        for scheme in SCHEMES:
            for bw in BACKWARDS:
                kw = dict(scheme=scheme, depth=depth, backward=bw)
                err = list(by_seed(rows, "best_test_error", **kw).values())
                loss = list(by_seed(rows, "final_train_loss", **kw).values())
                sel = [
                    r for r in rows if all(r["job"]["model_kwargs"][k] == v for k, v in kw.items())
                ]
                size = [next(iter(r["residual_size"].values())) for r in sel]
                row = {
                    "depth": depth,
                    "scheme": scheme,
                    "backward": bw,
                    "label": LABELS[bw],
                    **stats_row("test_error", err),
                    **stats_row("train_loss", loss),
                    "residual_size_mean": float(np.mean(size)),
                    "seeds": len(err),
                    "error_mean": float(np.mean(err)),
                }
                if bw == "autograd":
                    for v in ADJOINTS:
                        g = [grad[(scheme, depth, v, s)] for s in ctx.seeds]
                        row[f"grad_error_{v}_mean"] = float(np.mean(g))
                else:
                    row.update(stats_row("gap_vs_autograd", gaps[(scheme, bw, depth)]))
                table.append(row)
    return table


def aggregate(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    rows, grad = results["rows"], results["grad"]
    depths, tol = ctx.cfg["depths"], ctx.cfg["match_tol"]
    gaps = _gaps(rows, depths)
    table = _table(ctx, rows, grad, gaps)
    ctx.write_table("test_error.csv", table)
    verdicts = {}
    for bw in ADJOINTS:
        ge = {d: gaps[("euler", bw, d)] for d in depths}
        gh = {d: gaps[("heun", bw, d)] for d in depths}
        verdicts[bw] = match_verdict(ge, gh, tol)
    # per seed: mean over depths of log10(Euler's gradient error / Heun's), autograd models
    grad_effect = {
        v: [
            float(
                np.mean(
                    [math.log10(grad[("euler", d, v, s)] / grad[("heun", d, v, s)]) for d in depths]
                )
            )
            for s in ctx.seeds
        ]
        for v in ADJOINTS
    }
    return {
        "table": table,
        "gaps": {f"{s}/{bw}/N{d}": g for (s, bw, d), g in gaps.items()},
        "match": {bw: verdicts[bw][2] for bw in ADJOINTS},
        "grad_error_log_ratio": grad_effect,
        "_gaps": gaps,
        "_verdicts": verdicts,
        "_grad": grad,
    }


def figure(ctx: Context, numbers: dict[str, Any]):
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    colors = {"euler": "tab:blue", "heun": "tab:red"}
    styles = {"autograd": "-", "adjoint": "--", "adjoint_stored": ":"}
    for scheme in SCHEMES:
        for bw in BACKWARDS:
            t = [r for r in numbers["table"] if r["scheme"] == scheme and r["backward"] == bw]
            d = [r["depth"] for r in t]
            for ax, key in zip(axes, ("test_error", "train_loss")):
                scale = 100 if key == "test_error" else 1
                m = np.array([r[f"{key}_mean"] for r in t]) * scale
                s = np.array([r[f"{key}_std"] for r in t]) * scale
                ax.plot(
                    d,
                    m,
                    styles[bw],
                    marker="o",
                    color=colors[scheme],
                    label=f"{scheme} + {LABELS[bw]}",
                )
                ax.fill_between(d, m - s, m + s, color=colors[scheme], alpha=0.12)
    axes[0].set_ylabel("best test error (%)")
    axes[1].set_ylabel("final training loss")
    for ax in axes:
        ax.set_xticks(ctx.cfg["depths"])
        ax.set_xlabel("depth N (step 1/N)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"tiny ResNet on {ctx.dataset}: mean ± std over {len(ctx.seeds)} seeds")
    axes[1].legend(fontsize=7)
    return fig


def _gap_text(gaps, bw: str, depths: list[int]) -> str:
    return "; ".join(
        f"{s}: " + ", ".join(f"N={d} {pm(gaps[(s, bw, d)])}" for d in depths) for s in SCHEMES
    )


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    depths, gaps, grad = ctx.cfg["depths"], numbers["_gaps"], numbers["_grad"]
    out = []
    for bw, what in (
        ("adjoint", "the memory-free (chained) adjoint"),
        (
            "adjoint_stored",
            "the paper code's adjoint (per-block inversion from stored outputs, memcnn)",
        ),
    ):
        verdict, rule, det = numbers["_verdicts"][bw]
        size = [r["residual_size_mean"] for r in numbers["table"] if r["backward"] == "autograd"]
        out.append(
            Claim(
                key="match_depth" if bw == "adjoint" else "match_depth_paper_code",
                text=f"trained with {what}, Heun matches autograd from a smaller depth than Euler",
                evidence=(
                    f"test-error excess over autograd (pts, mean ± std over seeds, paired) "
                    f"{_gap_text(gaps, bw, depths)}; match depth Euler="
                    f"{det['match_depth_euler']}, Heun={det['match_depth_heun']} (None = "
                    f"never); residual size ||x_N-x_0||/||x_0|| of the autograd models "
                    f"{min(size):.2f}-{max(size):.2f}"
                ),
                value=float(det["match_depth_heun"] or math.nan),
                verdict=verdict,
                rule=rule,
                # the seed-paired effect at the deciding depth (Euler's excess minus Heun's)
                spread=seed_stats(det["effect"]) if det.get("effect") else None,
            )
        )
    eff = numbers["grad_error_log_ratio"]

    def mean_grad(scheme: str, depth: int) -> float:
        return float(np.mean([grad[(scheme, depth, "adjoint", s)] for s in ctx.seeds]))

    out.append(
        Claim(
            key="grad_error",
            text="at equal depth, Heun's adjoint gradients are closer to autograd's than Euler's",
            evidence="relative gradient error of the autograd-trained models (chained adjoint, "
            "mean over seeds): "
            + "; ".join(
                f"N={d}: Euler {mean_grad('euler', d):.2e}, Heun {mean_grad('heun', d):.2e}"
                for d in depths
            )
            + f"; per-seed mean log10(Euler/Heun): chained {pm(eff['adjoint'], 1, 2)}, "
            f"paper code (stored) {pm(eff['adjoint_stored'], 1, 2)}",
            value=float(np.mean(eff["adjoint"])),
            **above_noise(
                eff["adjoint"],
                prefix="per seed, mean over depths of log10(Euler's error / Heun's), chained "
                "adjoint: ",
            ),
        )
    )
    return out


EXPERIMENT = Experiment(
    "heun-depth",
    "Fig. 3c: test error vs depth, Euler/Heun x autograd/adjoint/paper-code adjoint",
    PRESETS,
    collect,
    aggregate,
    figure,
    claims,
    figure_name="test_error_vs_depth",
    paper_dataset="cifar10",
)
