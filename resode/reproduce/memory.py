"""memory: activation memory vs depth -- linear for autograd, flat for the adjoint.

The paper's MLP residual functions ``f_n(x) = W2_n tanh(W1_n x + b1_n) + b2_n`` (``d = 500``,
hidden 8, batch 500), Euler steps ``h = 1/N``. Two measurements per (engine, backward, depth):

(a) **saved for backward**: bytes of the unique storages autograd keeps for the backward during
    the forward (:func:`resode.diagnostics.saved_tensor_bytes`), parameters excluded;
(b) **peak process memory**: in a fresh subprocess per point, one warm-up training step, then
    ``/proc/self/clear_refs`` (5) resets the peak RSS, and the reported number is ``VmHWM`` after
    a forward+backward minus ``VmRSS`` just before it. The child runs with
    ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS (otherwise glibc caches
    them and the second step's peak hides inside the first's). Gradients exist before the
    measured step, so the delta is activations plus transient workspace. Linux only; elsewhere
    (b) is reported as missing.

The fused ``resode.fused.MLPStack`` is measured too when the compiled extension is available.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import (
    Claim,
    check_preset,
    finish,
    pyplot,
    run_sweep,
    save_figure,
    seed_everything,
    write_csv,
)

ID = "memory"
TITLE = "Activation memory vs depth (autograd linear, adjoint flat)"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(dim=500, hidden=8, batch=500, depths=[1, 8, 32], process=[1, 32]),
    "quick": dict(
        dim=500,
        hidden=8,
        batch=500,
        depths=[1, 2, 5, 10, 20, 50, 100, 200, 300],
        process=[1, 50, 100, 200, 300],
    ),
    "paper": dict(
        dim=500, hidden=8, batch=500, depths=list(range(1, 301)), process=list(range(10, 301, 10))
    ),
}


class MLPBlock(nn.Module):
    """``Linear(d, hidden) - tanh - Linear(hidden, d)``, the paper's MLP residual function."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return self.fc2(torch.tanh(self.fc1(x)))


def fused_available() -> bool:
    """Is ``resode.fused.MLPStack`` importable and the compiled extension loaded?"""
    try:
        from resode import fused  # noqa: F401
        from resode._ext import extension_available

        return bool(extension_available())
    except Exception:
        return False


def build(engine: str, backward: str, depth: int, dim: int, hidden: int) -> nn.Module:
    if engine == "generic":
        import resode

        return resode.ResidualStack(
            [MLPBlock(dim, hidden) for _ in range(depth)], scheme="euler", backward=backward
        )
    if engine == "fused":
        from resode import fused

        return fused.MLPStack(
            dim, hidden, depth, activation="tanh", scheme="euler", backward=backward
        )
    raise ValueError(f"unknown engine {engine!r}; choose 'generic' or 'fused'")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _measure_in_process(
    engine: str, backward: str, depth: int, dim: int, hidden: int, batch: int, seed: int
) -> dict[str, Any]:
    """Child side: (a) saved bytes and (b) peak RSS delta of one training step."""
    from resode.diagnostics import saved_tensor_bytes

    torch.set_num_threads(1)
    seed_everything(seed)
    model = build(engine, backward, depth, dim, hidden)
    x = torch.randn(batch, dim)  # (B, d)
    params = list(model.parameters())
    saved = saved_tensor_bytes(lambda inp: model(inp), x, exclude=params)

    def step() -> None:
        model(x).square().mean().backward()

    step()  # warm-up: gradients, allocator and thread pools exist before the measurement
    peak = None
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        step()
        hwm = _status_kib("VmHWM")
        if before is not None and hwm is not None:
            peak = max(hwm - before, 0) * 1024
    except OSError:
        peak = None
    return {"saved_bytes": int(saved), "peak_bytes": peak}


def measure_point(
    engine: str,
    backward: str,
    depth: int,
    dim: int,
    hidden: int,
    batch: int,
    seed: int,
    process: bool,
) -> dict[str, Any]:
    """One point of the sweep; ``process=True`` measures in a fresh subprocess."""
    args = dict(
        engine=engine,
        backward=backward,
        depth=depth,
        dim=dim,
        hidden=hidden,
        batch=batch,
        seed=seed,
    )
    if not process:
        from resode.diagnostics import saved_tensor_bytes

        seed_everything(seed)
        model = build(engine, backward, depth, dim, hidden)
        x = torch.randn(batch, dim)
        saved = saved_tensor_bytes(lambda inp: model(inp), x, exclude=list(model.parameters()))
        return {**args, "process": False, "saved_bytes": int(saved), "peak_bytes": None}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "resode.reproduce.memory", "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed for {args}:\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {**args, "process": True, **json.loads(line)}


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


def run(
    preset: str = "quick",
    out: str | os.PathLike = "results",
    seeds: list[int] | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    launcher: str = "inline",
    **overrides: Any,
) -> dict[str, Any]:
    """Run the memory experiment; writes ``<out>/memory/``. Returns the summary."""
    check_preset(preset)
    t0 = time.time()
    cfg = {**PRESETS[preset], **overrides}
    seeds = list(seeds or [0])
    out_dir = Path(out) / ID
    engines = ["generic"] + (["fused"] if fused_available() else [])
    jobs = []
    for engine in engines:
        for backward in ("autograd", "adjoint"):
            for depth in cfg["depths"]:
                jobs.append(
                    dict(
                        engine=engine,
                        backward=backward,
                        depth=depth,
                        dim=cfg["dim"],
                        hidden=cfg["hidden"],
                        batch=cfg["batch"],
                        seed=seeds[0],
                        process=depth in cfg["process"] and sys.platform.startswith("linux"),
                    )
                )
    rows = run_sweep(
        measure_point,
        jobs,
        out_dir / "runs",
        key=lambda j: f"{j['engine']}-{j['backward']}-N{j['depth']}-p{int(j['process'])}",
        launcher="inline" if launcher == "local" else launcher,  # each point is its own process
        desc="memory",
    )
    rows = sorted(rows, key=lambda r: (r["engine"], r["backward"], r["depth"]))
    write_csv(
        out_dir / "memory.csv",
        [
            {
                k: r[k]
                for k in ("engine", "backward", "depth", "saved_bytes", "peak_bytes", "process")
            }
            for r in rows
        ],
    )

    mib = 1 / 2**20
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"autograd": "-o", "adjoint": "-s"}
    for engine in engines:
        for backward in ("autograd", "adjoint"):
            sel = [r for r in rows if r["engine"] == engine and r["backward"] == backward]
            lab = f"{backward} ({engine})"
            ls = styles[backward] if engine == "generic" else styles[backward].replace("-", "--")
            axes[0].plot(
                [r["depth"] for r in sel],
                [r["saved_bytes"] * mib for r in sel],
                ls,
                ms=3,
                label=lab,
            )
            sp = [r for r in sel if r.get("peak_bytes") is not None]
            axes[1].plot(
                [r["depth"] for r in sp], [r["peak_bytes"] * mib for r in sp], ls, ms=3, label=lab
            )
    axes[0].set_title("(a) tensors saved for backward")
    axes[1].set_title("(b) peak process memory of a step (fresh process)")
    for ax in axes:
        ax.set_xlabel("depth N (residual functions)")
        ax.set_ylabel("memory (MiB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MLP d={cfg['dim']}, hidden {cfg['hidden']}, batch {cfg['batch']}, Euler")
    figures = save_figure(fig, out_dir, "memory")

    # numbers and claims (generic engine)
    def sel(backward: str, engine: str = "generic", key: str = "saved_bytes"):
        return [
            (r["depth"], r[key])
            for r in rows
            if r["engine"] == engine and r["backward"] == backward and r.get(key) is not None
        ]

    numbers: dict[str, Any] = {"engines": engines}
    claims = []
    for key, name in (("saved_bytes", "saved"), ("peak_bytes", "peak")):
        ag, adj = sel("autograd", key=key), sel("adjoint", key=key)
        if not ag or not adj:
            continue
        dmax = max(d for d, _ in ag)
        ag_max = dict(ag)[dmax]
        adj_max = dict(adj).get(dmax)
        slope, r2 = _linear_fit([d for d, _ in ag], [v for _, v in ag])
        adj_vals = [v for _, v in adj]
        numbers[name] = {
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
            fa, fj = sel("autograd", engine, key), sel("adjoint", engine, key)
            if fa and fj:
                numbers[name][f"{engine}_ratio_autograd_over_adjoint"] = dict(fa)[dmax] / max(
                    dict(fj).get(dmax) or 1, 1
                )
        n = numbers[name]
        adj_slope, _ = _linear_fit([d for d, _ in adj], adj_vals)
        n["adjoint_bytes_per_block"] = adj_slope
        param_bytes = 4 * (2 * cfg["dim"] * cfg["hidden"] + cfg["dim"] + cfg["hidden"])
        n["parameter_bytes_per_block"] = param_bytes
        linear_ok = r2 > 0.98 and slope > 0
        # flat: the adjoint grows less than 10% as fast as autograd (peak memory also holds
        # the O(N) parameter-gradient buffers of a step, reported alongside)
        flat_ok = adj_slope < 0.1 * slope
        what = "bytes saved for backward" if name == "saved" else "peak process memory"
        claims.append(
            Claim(
                key=f"{name}_ratio",
                text=f"memory: autograd grows linearly in depth, adjoint is flat ({what})",
                evidence=(
                    f"autograd/adjoint = {n['ratio_autograd_over_adjoint']:.1f}x at N={dmax} "
                    f"({ag_max * mib:.1f} vs {(adj_max or 0) * mib:.2f} MiB); autograd grows "
                    f"{slope * mib:.3f} MiB/block (linear R^2={r2:.3f}), adjoint "
                    f"{adj_slope * mib:.4f} MiB/block (parameters: {param_bytes * mib:.3f} "
                    f"MiB/block)"
                ),
                value=n["ratio_autograd_over_adjoint"],
                verdict="reproduced" if (linear_ok and flat_ok and dmax >= 8) else "not reproduced",
            )
        )
    return finish(
        out_dir,
        ID,
        preset,
        cfg,
        seeds,
        "cpu",
        t0,
        numbers,
        claims,
        figures,
        tables=["memory.csv"],
    )


def _child_main(spec: str) -> None:
    args = json.loads(spec)
    res = _measure_in_process(**args)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        from resode.cli import experiment_main

        experiment_main(ID)
