"""gradient-error (Fig. 4): relative gradient error of the adjoint vs depth, Euler vs Heun.

**Protocol.** A tiny ResNet with ``N0`` residual functions (32 in the paper) is trained with
exact gradients, once per scheme. Models of depth ``N`` are then made from it in two ways:

* ``copy`` (the paper's): :func:`resode.models.resample_depth`, function ``i`` is a copy of base
  function ``floor(i N0 / N)``. Below ``N0`` this subsamples the base functions (every step
  meets a new, unrelated function: a *jump* of the weights); above ``N0`` the weights are
  piecewise constant in depth: runs of ``N / N0`` copies separated by ``N0 - 1`` jumps;
* ``smooth`` (ours, ``N > N0`` only): :func:`interpolate_depth`, the weights of function ``i``
  interpolate linearly between consecutive base functions at ``t = i / N`` (continuous in depth,
  with a kink at every base function).

On one training batch, in float64, with BatchNorm in training mode, the per-tensor metric of the
paper's ``compare_gradients.py`` is measured: ``mean((g_bp - g_adj)^2) / mean(g_bp^2)`` (a
*squared* relative error; biases and tensors whose exact gradient is zero left out, see
:func:`resode.diagnostics.gradient_error`) for two backward passes:

* ``adjoint_stored`` -- **paper protocol**: each ``x_n`` rebuilt from the *stored* ``x_{n+1}``
  (what the paper's memcnn-based code measured; not memory-free);
* ``adjoint`` -- **the true adjoint**: reconstructions chained from the stage output.

**Regimes and theory.** Slopes of ``log(median error)`` against ``log N`` are fitted per regime
(:data:`REGIMES`): ``below`` (copies, ``N <= N0``), ``jump`` and ``run`` (copies, ``N >= N0``;
tensors of the blocks next to a change of base function ``floor(i N0 / N)``, and of the others,
present from ``N = 2 N0``) and ``smooth`` (interpolation, ``N > N0``). The predictions
(:data:`THEORY`) follow from the local error of one reverse step (``x_n`` rebuilt from an exact
``x_{n+1}``, step ``h = 1/N``, ``f`` smooth in ``x``):

* Euler: ``x_n - x^_n = h^2 J_n f_n + O(h^3)`` at every step, whatever the weights do.
* Heun: ``h^2/4 (J_{n+1} - J_n)(f_n - f_{n+1}) + O(h^3)``: ``O(h^2)`` at a jump of the weights;
  ``O(h^4)`` when ``f_{n+1} - f_n = O(h)`` (smooth weights, and piecewise-linear ones too: one
  step sees only ``f_n`` and ``f_{n+1}``; measured orders 2.0 and 4.0 on an MLP step).
* A block's gradient ``h (d f_n / d theta)^T a_{n+1}`` is wrong through ``x^_n`` and through the
  adjoint state ``a_{n+1}``, which collects ``h x`` (reconstruction error) from every later step.
  *Stored*: ``x^_n`` carries only its own local error. *Chained*: ``x^_n`` carries the sum of
  all later local errors: a coherent sum when they share a direction (runs of copies, smooth
  weights) and a random-walk sum ``sqrt(count)`` when each step meets an unrelated function
  (``N <= N0`` with weights rough in depth, as trained from an iid initialisation).
* The metric is squared: a relative error ``O(h^p)`` gives a slope ``-2p``.

Hence, stored: Euler ``-4`` everywhere; Heun ``-4`` below ``N0`` and at jumps, ``-6`` inside
runs (local ``h^4``, adjoint error ``N0 h h^2`` from the jumps), ``-8`` smooth. Chained: Euler
``-3`` to ``-2`` below ``N0`` (independent to coherent local errors), ``-2`` above; Heun ``-3``
to ``-2`` below, ``-4`` with copies (``N0`` jumps of ``h^2``), ``-6`` smooth. Checked on float64
MLP stages with iid base weights (``N0 = 8, 16``, depths to ``16 N0``): every fitted slope within
0.5 of its prediction but stored Heun below ``N0`` (``-3.5`` at ``N0 = 8``) and chained Euler
below ``N0`` (``-3.4``, ``-3.5``: the random-walk end); ``tests/test_experiments.py`` repeats
it.

The tiny ResNet's ReLU is not smooth in ``x``: a reconstruction error ``delta`` flips the ReLU
mask of a fraction ``~ delta`` of the units, which adds to the squared metric a term ``~ delta``
rather than ``delta^2``; where the smooth terms are tiny (stored Heun inside runs) it can
flatten the fitted slope at large ``N``.

The theory says where the paper's claim "the error falls faster for Heun" can show: above
``N0`` (chained; stored inside runs; smooth arm), not below it. The base model must be far from
its zero initialisation (residual branches of size ``||f_n(x_n)|| / ||x_n|| >=``
:data:`FAR_FROM_INIT` on average), else every scheme is exact and the claims are inconclusive.

Quick/gpu deviation: the residual stage's learning rate is multiplied by its depth (the paper
code's ``--adaptive`` option) so the base model leaves its zero initialisation in a short run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from resode.utils import loglog_slope, seed_everything

from .claims import Claim
from .context import Context
from .experiment import Experiment
from .figures import pyplot
from .sweeps import file_stamp

#: the backward passes compared with autograd, paper protocol first
VARIANTS = ("adjoint_stored", "adjoint")
LABELS = {"adjoint_stored": "paper protocol (adjoint_stored)", "adjoint": "true adjoint (chained)"}
SCHEMES = ("euler", "heun")
#: regime -> (arm, tensor group, description)
REGIMES: dict[str, tuple[str, str, str]] = {
    "below": ("copy", "all", "N<=N0"),
    "jump": ("copy", "edge", "N>=N0 copies, blocks at a jump"),
    "run": ("copy", "inner", "N>=N0 copies, blocks inside a run"),
    "smooth": ("smooth", "all", "N>N0 smooth"),
}
#: predicted slope range (lo, hi) of log(median squared error) vs log N (module docstring)
THEORY: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "adjoint_stored": {
        "euler": dict(below=(-4, -4), jump=(-4, -4), run=(-4, -4), smooth=(-4, -4)),
        "heun": dict(below=(-4, -4), jump=(-4, -4), run=(-6, -6), smooth=(-8, -8)),
    },
    "adjoint": {
        "euler": dict(below=(-3, -2), jump=(-2, -2), run=(-2, -2), smooth=(-2, -2)),
        "heun": dict(below=(-3, -2), jump=(-4, -4), run=(-4, -4), smooth=(-6, -6)),
    },
}
#: a measured slope agrees with theory when within this distance of the predicted range
THEORY_TOL = 1.0
#: smallest mean ||f_n(x_n)|| / ||x_n|| of the base model for a verdict
FAR_FROM_INIT = 0.1

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        train_depth=4,
        depths=[2, 4, 8, 16, 32],
        batch=16,
        train=dict(epochs=1, batch_size=64, lr=0.1, stage_lr_mult="depth",
                   max_steps_per_epoch=4, max_eval_batches=1),
    ),
    "quick": dict(
        train_depth=4,
        depths=[2, 4, 8, 16, 32],
        batch=8,
        train=dict(epochs=1, batch_size=64, lr=0.1, stage_lr_mult="depth",
                   max_steps_per_epoch=100, max_eval_batches=2),
    ),
    "paper": dict(
        train_depth=32,
        depths=[4, 8, 16, 32, 64, 128, 256],
        batch=256,
        train=dict(epochs=90, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4,
                   schedule="multistep", milestones=[30, 60]),
    ),
    "gpu": dict(
        train_depth=32,
        depths=[4, 8, 16, 32, 64, 128, 256, 512],
        batch=128,
        train=dict(epochs=10, batch_size=128, lr=0.1, stage_lr_mult="depth",
                   schedule="cosine", bf16=False),
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- models
def _stack_pairs(base: nn.Module, new: nn.Module) -> list[tuple[Any, Any]]:
    from resode.models import unwrap
    from resode.stack import ResidualStack, Stage

    def top(m: nn.Module) -> list[Stage]:
        return [s for n, s in unwrap(m).named_modules() if isinstance(s, Stage) and n]

    pairs = list(zip(top(base), top(new)))
    for src, dst in pairs:
        if not (isinstance(src, ResidualStack) and isinstance(dst, ResidualStack)) or src.tied:
            raise TypeError(
                f"interpolate_depth needs untied generic stages (ResidualStack), got "
                f"{type(src).__name__}; build the model with engine='generic' or convert fused "
                "stages with .to_generic()"
            )
    return pairs


@torch.no_grad()
def interpolate_depth(model: nn.Module, depth: int) -> nn.Module:
    """Copy of ``model`` whose residual stages have ``depth`` functions with weights linear in
    depth between the base functions.

    Base function ``k`` of a stage of depth ``N0`` sits at ``t = k / N0``; function ``i`` of the
    new stage takes, for every floating-point parameter and buffer, the linear interpolation at
    ``t = i / depth`` between base functions ``k = floor(i N0 / depth)`` and ``k + 1`` (the last
    one is held beyond ``t = (N0 - 1) / N0``). The weights are then continuous in depth with a
    kink at each base function, unlike :func:`resode.models.resample_depth`'s copies (piecewise
    constant). Untied generic stages only; step, scheme, backward mode and the model config
    follow ``resample_depth``.
    """
    from resode.models import resample_depth

    new = resample_depth(model, depth)
    for src, dst in _stack_pairs(model, new):
        n0, n = src.depth, dst.depth
        for i in range(n):
            k, rem = divmod(i * n0, n)
            w = rem / n
            a = src.block(k).state_dict()
            b = src.block(min(k + 1, n0 - 1)).state_dict()
            mixed = {key: torch.lerp(v, b[key], w) if v.is_floating_point() else v.clone()
                     for key, v in a.items()}  # fmt: skip
            dst.block(i).load_state_dict(mixed)
    return new


def edge_blocks(depth: int, base_depth: int) -> set[int]:
    """Blocks of a depth-``depth`` model made from ``base_depth`` functions that sit next to a
    change of base index ``floor(i N0 / N)`` (for copies: a jump of the weights)."""
    k = [i * base_depth // depth for i in range(depth)]
    return {i for i in range(depth)
            if (i > 0 and k[i - 1] != k[i]) or (i < depth - 1 and k[i + 1] != k[i])}  # fmt: skip


def tensor_groups(model: nn.Module, base_depth: int) -> dict[str, str]:
    """``{parameter name: "edge" | "inner" | "outside"}`` (outside: not in a residual stage)."""
    from resode.stack import stages

    where = {}
    for st in stages(model):
        edge = edge_blocks(st.depth, base_depth)
        for i in range(st.depth):
            for p in st.block(i).parameters():
                where[id(p)] = "edge" if i in edge else "inner"
    return {name: where.get(id(p), "outside") for name, p in model.named_parameters()}


@torch.no_grad()
def residual_size(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How far the residual functions are from zero (their initialisation) on the batch ``x``.

    ``ratio``: mean over steps of ``||f_n(x_n)|| / ||x_n||``; ``max_ratio``; ``displacement``:
    ``||x_N - x_0|| / ||x_0||`` over the stage. BatchNorm uses batch statistics; the model's
    running statistics are left as they were.
    """
    import copy

    m = copy.deepcopy(model).train()
    stage = m.layer1
    z = m.stem(x)
    z0, ratios = z, []

    def f(i: int, u: torch.Tensor) -> torch.Tensor:
        return stage.block(i)(u)

    for n in range(stage.num_steps):
        ratios.append(float(f(n, z).norm() / z.norm()))
        z = stage.scheme.step(f, n, z, stage.step)
    disp = float((z - z0).norm() / z0.norm())
    return {"ratio": float(np.mean(ratios)), "max_ratio": float(np.max(ratios)),
            "displacement": disp}  # fmt: skip


# ----------------------------------------------------------------------------- sweep points
def base_point(
    checkpoint: str, scheme: str, dataset: str, data_kwargs: dict, data_root: str | None,
    batch: int, seed: int, checkpoint_stamp: float | None = None, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Size of the trained base model's residual functions and the roughness of its weights in
    depth (:func:`resode.diagnostics.depth_smoothness`)."""
    from resode.diagnostics import depth_smoothness

    from .training import load_model, one_batch

    x, _ = one_batch(dataset, data_root, data_kwargs, batch, seed)
    model = load_model(checkpoint).double().to(device)
    smooth = depth_smoothness(model.layer1)
    return {"scheme": scheme, **residual_size(model, x.double().to(device)),
            "smoothness_mean_scaled": smooth["mean_scaled"]}  # fmt: skip


def measure_point(
    checkpoint: str, scheme: str, arm: str, depth: int, dataset: str, data_kwargs: dict,
    data_root: str | None, batch: int, seed: int, checkpoint_stamp: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Per-tensor gradient error of both variants for the base model ``checkpoint`` taken to
    ``depth`` by copies (``arm="copy"``) or interpolation (``"smooth"``)."""
    from resode.diagnostics import gradient_error
    from resode.models import resample_depth

    from .training import load_model, one_batch

    x, y = one_batch(dataset, data_root, data_kwargs, batch, seed)
    base = load_model(checkpoint)
    make = resample_depth if arm == "copy" else interpolate_depth
    model = make(base, depth).double().train().to(device)
    groups = tensor_groups(model, base.layer1.depth)
    seed_everything(seed)
    out: dict[str, Any] = {"scheme": scheme, "arm": arm, "depth": depth, "groups": groups}
    x, y = x.double().to(device), y.to(device)
    for v in VARIANTS:
        r = gradient_error(model, x, y, variant=v)
        out[v] = {"per_tensor": r["per_tensor"], "global_rel": r["global_rel"],
                  "zero_grad": len(r["zero_grad"])}  # fmt: skip
    return out


def collect(ctx: Context) -> dict[str, Any]:
    n0, seed = ctx.cfg["train_depth"], ctx.seed
    train_jobs = [
        # the generic engine is the reference (and fast in float64, unlike fused kernels)
        ctx.train_job(f"{s}-N{n0}-s{seed}", "tiny_resnet",
                      dict(depth=n0, scheme=s, backward="autograd", engine="generic"),
                      ctx.cfg["train"], seed=seed, folder="train")
        for s in SCHEMES
    ]  # fmt: skip
    trained = ctx.train_sweep(train_jobs, folder="train", desc="train")
    ckpts = {r["job"]["model_kwargs"]["scheme"]: r["checkpoint"] for r in trained}
    depths, batch = ctx.cfg["depths"], ctx.cfg["batch"]
    if ctx.max_steps is not None:  # --max-steps: a check that the preset runs, around N0
        depths, batch = [n for n in (n0 // 2, n0, 2 * n0) if n >= 2], min(batch, 8)
    common = dict(**ctx.data, batch=batch, seed=seed,
                  **({"device": ctx.device} if ctx.device != "cpu" else {}))  # fmt: skip
    base = ctx.sweep(
        base_point,
        [dict(checkpoint=ckpts[s], checkpoint_stamp=file_stamp(ckpts[s]), scheme=s, **common)
         for s in SCHEMES],
        key=lambda j: f"base-{j['scheme']}-s{seed}", desc="base",
    )  # fmt: skip
    jobs = [
        dict(checkpoint=ckpts[s], checkpoint_stamp=file_stamp(ckpts[s]), scheme=s, arm=arm,
             depth=n, **common)
        for s in SCHEMES
        for arm in ("copy", "smooth")
        for n in depths
        if (arm == "copy" or n > n0) and n >= (2 if s == "heun" else 1)
    ]  # fmt: skip
    rows = ctx.sweep(measure_point, jobs, desc="measure",
                     key=lambda j: f"{j['scheme']}-{j['arm']}-N{j['depth']}-s{seed}")  # fmt: skip
    return {"trained": trained, "base": base, "rows": rows}


# ----------------------------------------------------------------------------- numbers
def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"scheme": r["scheme"], "arm": r["arm"], "variant": v, "depth": r["depth"],
         "tensor": name, "group": r["groups"].get(name, "outside"), "error": e}
        for r in rows
        for v in VARIANTS
        for name, e in r[v]["per_tensor"].items()
    ]  # fmt: skip


def _median_rows(flat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and max error per (scheme, arm, variant, depth, group); group ``all`` too."""
    cells: dict[tuple, list[float]] = {}
    for f in flat:
        for g in ("all", f["group"]):
            cells.setdefault((f["scheme"], f["arm"], f["variant"], f["depth"], g), []).append(
                f["error"]
            )
    return [
        {"scheme": s, "arm": a, "variant": v, "depth": n, "group": g,
         "median_error": float(np.median(es)), "max_error": float(np.max(es)), "tensors": len(es)}
        for (s, a, v, n, g), es in sorted(cells.items())
        if g != "outside"
    ]  # fmt: skip


def regime_points(summary: list[dict[str, Any]], regime: str, scheme: str, variant: str,
                  n0: int) -> list[tuple[int, float]]:  # fmt: skip
    """``[(depth, median error)]`` of one regime: ``below`` uses ``N <= N0`` of the copies, the
    copy groups ``N >= N0``, the smooth groups ``N > N0``."""
    arm, group, _ = REGIMES[regime]
    if regime == "below":
        keep = lambda n: n <= n0  # noqa: E731
    elif arm == "copy":
        keep = lambda n: n >= n0  # noqa: E731
    else:
        keep = lambda n: n > n0  # noqa: E731
    return sorted(
        (r["depth"], r["median_error"]) for r in summary
        if r["scheme"] == scheme and r["variant"] == variant and r["arm"] == arm
        and r["group"] == group and keep(r["depth"])
    )  # fmt: skip


def _slopes(summary: list[dict[str, Any]], n0: int) -> list[dict[str, Any]]:
    """One row per (variant, scheme, regime): measured slope, theory, agreement."""
    out = []
    for v in VARIANTS:
        for s in SCHEMES:
            for reg in REGIMES:
                pts = regime_points(summary, reg, s, v, n0)
                slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
                lo, hi = THEORY[v][s][reg]
                ok = None if math.isnan(slope) else lo - THEORY_TOL <= slope <= hi + THEORY_TOL
                out.append({"variant": v, "scheme": s, "regime": reg, "slope": slope,
                            "theory_lo": lo, "theory_hi": hi, "agrees": ok,
                            "depths": " ".join(str(p[0]) for p in pts)})  # fmt: skip
    return out


def aggregate(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    flat = _flat(results["rows"])
    ctx.write_table("per_tensor.csv", flat, report=False)
    summary = _median_rows(flat)
    ctx.write_table("summary.csv", summary, report=False)
    slope_rows = _slopes(summary, ctx.cfg["train_depth"])
    ctx.write_table("slopes.csv", slope_rows)
    acc = {r["job"]["model_kwargs"]["scheme"]: r["best_test_acc"] for r in results["trained"]}
    base = {r["scheme"]: {k: r[k] for k in ("ratio", "max_ratio", "displacement",
                                             "smoothness_mean_scaled")}
            for r in results["base"]}  # fmt: skip
    slopes = {f"{r['variant']}/{r['scheme']}/{r['regime']}": r["slope"] for r in slope_rows}
    return {"slopes": slopes, "slope_table": slope_rows, "base": base, "summary": summary,
            "trained_test_acc": acc, "train_depth": ctx.cfg["train_depth"],
            "_flat": flat}  # fmt: skip


# ----------------------------------------------------------------------------- figure
def _median_line(summary: list[dict[str, Any]], s: str, v: str, arm: str, group: str,
                 keep) -> tuple[list[int], list[float]]:  # fmt: skip
    pts = sorted((r["depth"], r["median_error"]) for r in summary
                 if r["scheme"] == s and r["variant"] == v and r["arm"] == arm
                 and r["group"] == group and keep(r["depth"]))  # fmt: skip
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(ctx: Context, numbers: dict[str, Any]):
    flat, summary, n0 = numbers["_flat"], numbers["summary"], numbers["train_depth"]
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = {"euler": "tab:blue", "heun": "tab:red"}
    lines = [  # (arm, group, depths kept, style, label)
        ("copy", "all", lambda n: n <= n0, "-o", "copies, N<=N0"),
        ("copy", "edge", lambda n: n >= n0, "-^", "copies, blocks at a jump"),
        ("copy", "inner", lambda n: n >= n0, ":v", "copies, blocks inside a run"),
        ("smooth", "all", lambda n: n > n0, "--s", "smooth in depth"),
    ]
    rng = np.random.default_rng(0)
    for ax, v in zip(axes, VARIANTS):
        for s, off in (("euler", -0.06), ("heun", 0.06)):
            pts = [f for f in flat if f["scheme"] == s and f["variant"] == v
                   and f["arm"] == "copy" and f["error"] > 0]  # fmt: skip
            xs = np.array([f["depth"] for f in pts], float) * np.exp(
                off + 0.03 * rng.standard_normal(len(pts))
            )
            ax.scatter(xs, [f["error"] for f in pts], s=4, alpha=0.25, color=colors[s])
            for arm, group, keep, style, label in lines:
                x, y = _median_line(summary, s, v, arm, group, keep)
                ax.plot(x, y, style, color=colors[s], ms=4, label=f"{s}: {label}")
        ax.axvline(n0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"depth N (base model N0 = {n0}); dots: every tensor, copies")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2, loc="upper right")
        ax.set_title(LABELS[v] + ": medians over tensors")
        box = dict(fc="white", alpha=0.8, lw=0)
        ax.text(0.02, 0.02, _slope_text(numbers, v), transform=ax.transAxes, fontsize=6.5,
                family="monospace", va="bottom", bbox=box)  # fmt: skip
    axes[0].set_ylabel(r"per-tensor $\mathrm{mean}((g_{bp}-g_{adj})^2)/\mathrm{mean}(g_{bp}^2)$")
    return fig


def _fmt_theory(lo: float, hi: float) -> str:
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"


def _slope_text(numbers: dict[str, Any], variant: str) -> str:
    lines = ["slope (theory)   euler          heun"]
    for reg in REGIMES:
        cells = []
        for s in SCHEMES:
            r = next(r for r in numbers["slope_table"] if r["variant"] == variant
                     and r["scheme"] == s and r["regime"] == reg)  # fmt: skip
            cells.append(f"{r['slope']:6.2f} ({_fmt_theory(r['theory_lo'], r['theory_hi'])})")
        lines.append(f"{reg:8s} " + "  ".join(f"{c:>15s}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- claims
def _row(numbers: dict[str, Any], v: str, s: str, reg: str) -> dict[str, Any]:
    return next(r for r in numbers["slope_table"]
                if r["variant"] == v and r["scheme"] == s and r["regime"] == reg)  # fmt: skip


def _evidence(numbers: dict[str, Any], cells: list[tuple[str, str]]) -> str:
    """``regime: euler slope (theory), heun slope (theory)`` for each (variant, regime)."""
    parts = []
    for v, reg in cells:
        xs = []
        for s in SCHEMES:
            r = _row(numbers, v, s, reg)
            xs.append(f"{s} {r['slope']:.2f} ({_fmt_theory(r['theory_lo'], r['theory_hi'])})")
        what = f"{'stored' if v == 'adjoint_stored' else 'chained'} " if len(
            {c[0] for c in cells}) > 1 else ""  # fmt: skip
        parts.append(f"{what}{REGIMES[reg][2]}: " + ", ".join(xs))
    return "; ".join(parts)


def _base_text(numbers: dict[str, Any]) -> tuple[str, bool]:
    base = numbers["base"]
    far = all(b["ratio"] >= FAR_FROM_INIT for b in base.values())
    sizes = ", ".join(f"{s} {b['ratio']:.2f}" for s, b in base.items())
    text = f"base model (N0={numbers['train_depth']}) mean ||f_n(x_n)||/||x_n|| {sizes}"
    return text, far


def _faster(numbers: dict[str, Any], cells: list[tuple[str, str]]) -> tuple[bool, list[str]]:
    """Heun's slope below Euler's by more than 0.5 in every cell (variant, regime) where theory
    predicts a faster fall for Heun; returns (holds, the cells tested)."""
    tested = [(v, reg) for v, reg in cells
              if THEORY[v]["heun"][reg][1] < THEORY[v]["euler"][reg][0]]  # fmt: skip
    ok = all(_row(numbers, v, "heun", r)["slope"] < _row(numbers, v, "euler", r)["slope"] - 0.5
             for v, r in tested)  # fmt: skip
    return ok and bool(tested), [f"{'stored' if v == 'adjoint_stored' else 'chained'} {r}"
                                 for v, r in tested]  # fmt: skip


def _paper_claim(numbers: dict[str, Any], key: str, what: str,
                 cells: list[tuple[str, str]]) -> Claim:  # fmt: skip
    """Fig. 4's claim judged on the (variant, regime) ``cells``."""
    base, far = _base_text(numbers)
    slopes = [_row(numbers, v, s, r)["slope"] for s in SCHEMES for v, r in cells]
    falls = all(x < 0 for x in slopes if not math.isnan(x))
    faster, tested = _faster(numbers, cells)
    if not far:
        verdict = "inconclusive"
    elif any(math.isnan(x) for x in slopes):
        verdict = "not run"
    else:
        verdict = "reproduced" if falls and faster else "partial" if falls else "not reproduced"
    return Claim(
        key=key,
        text=f"Fig. 4 ({what}): the adjoint's gradient error decreases with depth, faster for "
        "Heun than Euler",
        evidence=f"{base}; slopes (theory): {_evidence(numbers, cells)}",
        value=_row(numbers, cells[-1][0], "heun", cells[-1][1])["slope"],
        verdict=verdict,
        rule=f"inconclusive when the base model is near identity (mean ||f||/||x|| < "
        f"{FAR_FROM_INIT}); reproduced when every slope is negative and Heun's is below Euler's "
        f"by more than 0.5 where theory predicts it ({', '.join(tested) or 'nowhere'}); "
        "partial when only the decrease shows; not reproduced when an error grows with depth",
    )


def _theory_claim(numbers: dict[str, Any]) -> Claim:
    rows = [r for r in numbers["slope_table"] if r["agrees"] is not None]
    agree = sum(bool(r["agrees"]) for r in rows)
    off = [f"{r['variant']}/{r['scheme']}/{r['regime']} {r['slope']:.2f} "
           f"({_fmt_theory(r['theory_lo'], r['theory_hi'])})"
           for r in rows if not r["agrees"]]  # fmt: skip
    base, far = _base_text(numbers)
    if not far:
        verdict = "inconclusive"
    elif not rows:
        verdict = "not run"
    elif agree == len(rows):
        verdict = "reproduced"
    else:
        verdict = "partial" if 2 * agree >= len(rows) else "not reproduced"
    return Claim(
        key="theory",
        text="(resode) the per-regime slopes follow the local-error theory of the reverse steps",
        evidence=f"{base}; {agree}/{len(rows)} slopes within {THEORY_TOL:g} of theory"
        + (f"; off: {', '.join(off)}" if off else "")
        + " (every slope in slopes.csv)",
        value=agree / len(rows) if rows else None,
        verdict=verdict,
        rule="inconclusive when the base model is near identity; reproduced when every fitted "
        f"slope is within {THEORY_TOL:g} of its predicted range, partial when at least half are",
    )


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    copy = ("below", "jump", "run")
    return [
        _paper_claim(numbers, "paper_protocol", "paper protocol: adjoint_stored, copies",
                     [("adjoint_stored", r) for r in copy]),
        _paper_claim(numbers, "true_adjoint", "true chained adjoint, copies",
                     [("adjoint", r) for r in copy]),
        _paper_claim(numbers, "smooth", "weights interpolated smoothly in depth, both variants",
                     [("adjoint_stored", "smooth"), ("adjoint", "smooth")]),
        _theory_claim(numbers),
    ]  # fmt: skip


EXPERIMENT = Experiment(
    "gradient-error", "Fig. 4: adjoint gradient error vs depth, Euler vs Heun",
    PRESETS, collect, aggregate, figure, claims,
    figure_name="gradient_error", paper_dataset="cifar10", sweep_keys=(),
)  # fmt: skip
