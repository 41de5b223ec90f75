"""memory: activation memory vs depth -- linear for autograd, flat for the adjoint.

The paper's MLP residual functions ``f_n(x) = W2_n tanh(W1_n x + b1_n) + b2_n`` (``d = 500``,
hidden 8, batch 500; :func:`resode.models.blocks.mlp_block`), Euler steps ``h = 1/N``. Two
measurements per (engine, backward, depth):

(a) **saved for backward**: bytes of the unique storages autograd keeps for the backward during
    the forward (:func:`resode.diagnostics.saved_tensor_bytes`), parameters excluded;
(b) **peak process memory**: in a fresh process per point (:func:`resode.utils.run_in_child`,
    forked from a server whose glibc ``MALLOC_MMAP_THRESHOLD_`` is pinned so freed tensors go
    back to the OS), one warm-up training step, then :class:`resode.utils.PeakMemory` around a
    forward+backward: ``VmHWM`` (reset through ``/proc/self/clear_refs``) minus ``VmRSS`` just
    before. Gradients exist before the measured step, so the delta is activations plus
    transient workspace. Linux only; elsewhere (b) is reported as missing.

The fused ``resode.fused.MLPStack`` is measured too when the compiled extension is available.
On CUDA (``--device cuda``, the ``gpu`` preset) both measurements run in this process: (a) the
same, (b) the CUDA allocator's peak of a step (tensors only, :class:`resode.utils.PeakMemory`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .claims import Claim
from .context import Context
from .experiment import Experiment
from .figures import pyplot

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(dim=500, hidden=8, batch=500, depths=[1, 8, 32], process=[1, 32]),
    "quick": dict(
        dim=500,
        hidden=8,
        batch=500,
        depths=[1, 2, 5, 10, 20, 50, 100, 200, 300],
        process=[1, 100, 200, 300],
    ),
    "paper": dict(
        dim=500, hidden=8, batch=500, depths=list(range(1, 301)), process=list(range(10, 301, 10))
    ),
    "gpu": dict(
        dim=500,
        hidden=8,
        batch=500,
        depths=[1, *range(10, 301, 10)],
        process=[1, *range(10, 301, 10)],
    ),
}
MIB = 1 / 2**20


def build(engine: str, backward: str, depth: int, dim: int, hidden: int) -> nn.Module:
    """A stage of ``depth`` MLP residual functions on the ``generic`` or ``fused`` engine."""
    if engine == "generic":
        import resode
        from resode.models.blocks import mlp_block

        return resode.ResidualStack.from_factory(
            lambda: mlp_block(dim, hidden), depth, scheme="euler", backward=backward
        )
    if engine == "fused":
        from resode import fused

        return fused.MLPStack(
            dim, hidden, depth, activation="tanh", scheme="euler", backward=backward
        )
    raise ValueError(f"unknown engine {engine!r}; choose 'generic' or 'fused'")


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    from resode.diagnostics import saved_tensor_bytes

    return int(saved_tensor_bytes(lambda inp: model(inp), x, exclude=list(model.parameters())))


def _measure_in_process(
    engine: str, backward: str, depth: int, dim: int, hidden: int, batch: int, seed: int,
    device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """(a) saved bytes and (b) the peak of one training step: RSS delta (CPU, in a fresh child
    process) or the CUDA allocator's peak."""
    from resode.utils import PeakMemory, seed_everything

    seed_everything(seed)
    model = build(engine, backward, depth, dim, hidden).to(device)
    x = torch.randn(batch, dim).to(device)  # (B, d)
    saved = _saved_bytes(model, x)

    def step() -> None:
        model(x).square().mean().backward()

    step()  # warm-up: gradients, allocator and thread pools exist before the measurement
    try:
        with PeakMemory(device) as pm:
            step()
        peak = pm.peak_bytes
    except (OSError, RuntimeError):  # no /proc/self/clear_refs
        peak = None
    return {"saved_bytes": saved, "peak_bytes": peak}


def measure_point(
    engine: str,
    backward: str,
    depth: int,
    dim: int,
    hidden: int,
    batch: int,
    seed: int,
    process: bool,
    device: str = "cpu",
) -> dict[str, Any]:
    """One point of the sweep; ``process=True`` measures the peak too (CPU: in a fresh
    process; CUDA: in this one)."""
    from resode.utils import fresh_process_pool, run_in_child, seed_everything

    args = dict(engine=engine, backward=backward, depth=depth, dim=dim, hidden=hidden,
                batch=batch, seed=seed)  # fmt: skip
    if device != "cpu":
        res = _measure_in_process(**args, device=device) if process else {}
        if not process:
            seed_everything(seed)
            model = build(engine, backward, depth, dim, hidden).to(device)
            res = {"saved_bytes": _saved_bytes(model, torch.randn(batch, dim, device=device)),
                   "peak_bytes": None}  # fmt: skip
        return {**args, "process": process, "device": device, **res}
    if process:
        pool = fresh_process_pool(preload=("torch", __name__))
        res = run_in_child(pool, _measure_in_process, *args.values(), timeout=1800, threads=1)
        return {**args, "process": True, **res}
    seed_everything(seed)
    model = build(engine, backward, depth, dim, hidden)
    saved = _saved_bytes(model, torch.randn(batch, dim))
    return {**args, "process": False, "saved_bytes": saved, "peak_bytes": None}


def collect(ctx: Context) -> dict[str, Any]:
    from resode.fused import available_for

    cfg, dev = ctx.cfg, ctx.device
    engines = ["generic"] + (["fused"] if available_for(dev) else [])
    cuda = dev.startswith("cuda")
    jobs = [
        dict(engine=engine, backward=backward, depth=depth, dim=cfg["dim"], hidden=cfg["hidden"],
             batch=cfg["batch"], seed=ctx.seed,
             process=depth in cfg["process"] and (cuda or sys.platform.startswith("linux")),
             **({"device": dev} if cuda else {}))
        for engine in engines
        for backward in ("autograd", "adjoint")
        for depth in cfg["depths"]
    ]  # fmt: skip
    rows = ctx.sweep(
        measure_point,
        jobs,
        key=lambda j: f"{j['engine']}-{j['backward']}-N{j['depth']}-p{int(j['process'])}",
        launcher="inline" if ctx.launcher == "local" else None,  # each point is its own process
    )
    return {"engines": engines, "rows": sorted(rows, key=lambda r: (r["engine"], r["backward"],
                                                                   r["depth"]))}  # fmt: skip


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and R^2 of a least-squares line."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2:
        return float("nan"), float("nan")
    a, b = np.polyfit(x, y, 1)
    res = y - (a * x + b)
    ss = float(((y - y.mean()) ** 2).sum())
    return float(a), (1.0 - float((res**2).sum()) / ss) if ss > 0 else 1.0


def _series(rows, backward: str, engine: str = "generic", key: str = "saved_bytes"):
    return [
        (r["depth"], r[key])
        for r in rows
        if r["engine"] == engine and r["backward"] == backward and r.get(key) is not None
    ]


def _fit_numbers(cfg, rows, engines, key: str) -> dict[str, Any] | None:
    """Autograd vs adjoint numbers of one measurement (``None`` when it is missing)."""
    ag, adj = _series(rows, "autograd", key=key), _series(rows, "adjoint", key=key)
    if not ag or not adj:
        return None
    dmax = max(d for d, _ in ag)
    ag_max, adj_max = dict(ag)[dmax], dict(adj).get(dmax)
    slope, r2 = _linear_fit([d for d, _ in ag], [v for _, v in ag])
    adj_vals = [v for _, v in adj]
    n = {
        "largest_depth": dmax,
        "autograd_bytes_at_largest": ag_max,
        "adjoint_bytes_at_largest": adj_max,
        "ratio_autograd_over_adjoint": ag_max / adj_max if adj_max else float("inf"),
        "autograd_bytes_per_block": slope,
        "autograd_linear_r2": r2,
        "adjoint_min_bytes": min(adj_vals),
        "adjoint_max_bytes": max(adj_vals),
        "adjoint_spread_over_autograd_max": (max(adj_vals) - min(adj_vals)) / ag_max,
    }
    for engine in engines[1:]:
        fa, fj = _series(rows, "autograd", engine, key), _series(rows, "adjoint", engine, key)
        if fa and fj:
            n[f"{engine}_ratio_autograd_over_adjoint"] = dict(fa)[dmax] / max(
                dict(fj).get(dmax) or 1, 1
            )
    n["adjoint_bytes_per_block"] = _linear_fit([d for d, _ in adj], adj_vals)[0]
    n["parameter_bytes_per_block"] = 4 * (2 * cfg["dim"] * cfg["hidden"] + cfg["dim"]
                                          + cfg["hidden"])  # fmt: skip
    return n


def aggregate(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    rows, engines = results["rows"], results["engines"]
    cols = ("engine", "backward", "depth", "saved_bytes", "peak_bytes", "process")
    ctx.write_table("memory.csv", [{k: r[k] for k in cols} for r in rows])
    numbers: dict[str, Any] = {"engines": engines, "_rows": rows}
    for key, name in (("saved_bytes", "saved"), ("peak_bytes", "peak")):
        n = _fit_numbers(ctx.cfg, rows, engines, key)
        if n is not None:
            numbers[name] = n
    return numbers


def figure(ctx: Context, numbers: dict[str, Any]):
    rows = numbers["_rows"]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    styles = {"autograd": "-o", "adjoint": "-s"}
    for engine in numbers["engines"]:
        for backward in ("autograd", "adjoint"):
            sel = [r for r in rows if r["engine"] == engine and r["backward"] == backward]
            lab = f"{backward} ({engine})"
            ls = styles[backward] if engine == "generic" else styles[backward].replace("-", "--")
            axes[0].plot([r["depth"] for r in sel], [r["saved_bytes"] * MIB for r in sel], ls,
                         ms=3, label=lab)  # fmt: skip
            sp = [r for r in sel if r.get("peak_bytes") is not None]
            axes[1].plot(
                [r["depth"] for r in sp], [r["peak_bytes"] * MIB for r in sp], ls, ms=3, label=lab
            )
    axes[0].set_title("(a) tensors saved for backward")
    axes[1].set_title("(b) peak CUDA memory of a step" if ctx.device.startswith("cuda")
                      else "(b) peak process memory of a step (fresh process)")  # fmt: skip
    for ax in axes:
        ax.set_xlabel("depth N (residual functions)")
        ax.set_ylabel("memory (MiB)")
        ax.grid(alpha=0.3)
        ax.legend()
    cfg = ctx.cfg
    fig.suptitle(f"MLP d={cfg['dim']}, hidden {cfg['hidden']}, batch {cfg['batch']}, Euler")
    return fig


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    out = []
    for name in ("saved", "peak"):
        n = numbers.get(name)
        if n is None:
            continue
        slope, r2, adj_slope = (n["autograd_bytes_per_block"], n["autograd_linear_r2"],
                                n["adjoint_bytes_per_block"])  # fmt: skip
        dmax, ag_max, adj_max = (n["largest_depth"], n["autograd_bytes_at_largest"],
                                 n["adjoint_bytes_at_largest"])  # fmt: skip
        # flat: the adjoint grows less than 10% as fast as autograd (peak memory also holds
        # the O(N) parameter-gradient buffers of a step, reported alongside)
        ok = r2 > 0.98 and slope > 0 and adj_slope < 0.1 * slope and dmax >= 8
        peak = "peak CUDA memory" if ctx.device.startswith("cuda") else "peak process memory"
        what = "bytes saved for backward" if name == "saved" else peak
        out.append(Claim(
            key=f"{name}_ratio",
            text=f"memory: autograd grows linearly in depth, adjoint is flat ({what})",
            evidence=(
                f"autograd/adjoint = {n['ratio_autograd_over_adjoint']:.1f}x at N={dmax} "
                f"({ag_max * MIB:.1f} vs {(adj_max or 0) * MIB:.2f} MiB); autograd grows "
                f"{slope * MIB:.3f} MiB/block (linear R^2={r2:.3f}), adjoint "
                f"{adj_slope * MIB:.4f} MiB/block (parameters: "
                f"{n['parameter_bytes_per_block'] * MIB:.3f} MiB/block)"
            ),
            value=n["ratio_autograd_over_adjoint"],
            verdict="reproduced" if ok else "not reproduced",
            rule="reproduced when autograd memory is linear in N (R^2 > 0.98, positive slope) "
            "and the adjoint grows less than 10% as fast, up to N >= 8",
        ))  # fmt: skip
    return out


EXPERIMENT = Experiment(
    "memory", "Activation memory vs depth (autograd linear, adjoint flat)",
    PRESETS, collect, aggregate, figure, claims,
    figure_name="memory", sweep_keys=("depths", "process"),
)  # fmt: skip
