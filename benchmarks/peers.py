"""resode against what a user would pick instead: memory, speed and gradient error vs depth.

One residual network -- ``N`` untied blocks, ``x <- x + f_n(x) / N`` -- trained by:

* ``plain``: a hand-written autograd loop (the baseline of every time ratio);
* ``checkpoint``: ``torch.utils.checkpoint`` around each block (non-reentrant);
* ``torchdiffeq``: ``torchdiffeq.odeint_adjoint``, fixed-step Euler on ``t in [0, 1]`` with
  ``step_size = 1/N``, the vector field at time ``t`` being block ``floor(t N)`` (the continuous
  adjoint of the piecewise-constant ODE);
* ``generic-{euler,heun}-{autograd,adjoint}``: :class:`resode.ResidualStack`;
* ``fused-{euler,heun}-{autograd,adjoint}``: :mod:`resode.fused` (when the extension is built).

Measured per (workload, depth, method), each method in its own fresh process (so that depth
1024 fits in memory and every peak starts from an empty allocator): activation memory (bytes
saved for backward) and the peak memory of one training step at every depth (16 ... 1024), the
step time as a ratio to ``plain`` at a mid depth; and, separately, the relative gradient error
against exact autograd in float64 for depths 8..256 with iid and depth-smooth weights, with
fitted log-log slopes. Writes ``results/benchmarks/peers.{json,md}`` and the plots
``peers_memory``, ``peers_time`` and ``peers_gradient_error`` (PNG and PDF). See
``benchmarks/README.md`` for how to read them.

Threads: each measuring process uses torch's default number of intra-op threads, which
follows ``OMP_NUM_THREADS``. On a CPU shared with other jobs run with ``OMP_NUM_THREADS=1``
(or ``--threads 1``): with every core busy, OpenMP spin-waiting makes multi-thread step times
meaningless. The default run takes about 10-15 minutes on 2 cores with ``OMP_NUM_THREADS=1``.

    OMP_NUM_THREADS=1 python benchmarks/peers.py      # the default CPU run
    python benchmarks/peers.py --quick                # small depths, few repetitions
    python benchmarks/peers.py --device cuda          # the same table on a GPU
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if (_HERE.parent / "resode" / "__init__.py").exists():  # run from a checkout
    sys.path.insert(1, str(_HERE.parent))

import _common  # noqa: E402
import torch  # noqa: E402
from _peers_measure import (  # noqa: E402
    gradient_worker,
    measure_method,
    measure_point,
    time_methods,
)
from _peers_methods import (  # noqa: E402, F401 - the names the tests and users reach
    METHOD_BY_KEY,
    METHODS,
    Method,
    PlainLoop,
    TorchdiffeqAdjoint,
    activation_bytes,
    build_method,
    fused_status,
    make_blocks,
    make_input,
)
from _peers_report import evaluate_targets, plot, to_markdown  # noqa: E402

from resode.utils import (  # noqa: E402
    MMAP_THRESHOLD,
    fresh_process_pool,
    loglog_slope,
    run_in_child,
)

# --------------------------------------------------------------------------- workloads
#: name -> block configuration and batch. ``mlp-narrow`` is the narrow configuration of the
#: extension issue (where the fused engine should beat plain autograd).
WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {"kind": "mlp", "batch": 256, "dim": 512, "hidden": 64},
    "conv": {"kind": "conv", "batch": 64, "channels": 16, "size": 16},
    "mlp-narrow": {"kind": "mlp", "batch": 128, "dim": 64, "hidden": 64},
}
DEFAULT_WORKLOADS = ("mlp", "conv", "mlp-narrow")
#: memory (saved bytes and fresh-process peak) at every depth (``--depths 16 64 256 1024`` adds
#: a point: about 5 more minutes on 2 shared cores)
DEFAULT_DEPTHS = (16, 64, 1024)
#: step times at a mid depth only (the time ratios barely move with depth)
DEFAULT_TIME_DEPTHS = (64,)
#: workloads with their own default depths (the narrow MLP only where the extension issue sets
#: its target)
DEFAULT_DEPTHS_OF = {"mlp-narrow": (256,)}
QUICK_DEPTHS = (4, 16)
#: the gradient-error study: the MLP block at a narrow width (torchdiffeq's adjoint costs
#: O(N^2 * params per block) so the full width is out of reach at depth 256 in float64)
GRAD_CONFIG = {"kind": "mlp", "batch": 64, "dim": 32, "hidden": 16}
GRAD_DEPTHS = (8, 16, 32, 64, 128, 256)
QUICK_GRAD_DEPTHS = (4, 8, 16)
#: imported once by the process server so that each measuring process starts at once (torch
#: imports some of these lazily on the first backward or checkpoint: seconds per process)
PRELOAD = (
    "torch",
    "torch.fx.experimental.symbolic_shapes",
    "torch.utils.checkpoint",
    "torch._dynamo",
    "torchdiffeq",
    "resode",
    "resode._adjoint",
    "resode.fused",
    "_peers_measure",
)
#: torchdiffeq's training step costs O(N^2) (every reverse step carries the adjoint of all N
#: blocks' parameters: about 1.9 s at depth 64 and 86 s at 256 for ``mlp`` on one idle core);
#: above this depth only its saved bytes (a forward) are measured. A fixed depth, not a time
#: estimate, so that the table does not depend on the machine's load.
TORCHDIFFEQ_MAX_STEP_DEPTH = 64
STEP = "grads=None + forward + loss=mean(y^2) + backward + SGD update (lr 1e-4)"


# --------------------------------------------------------------------------- planning
def _estimate(prev: dict[int, float], depth: int) -> float | None:
    """Extrapolate linearly in depth from the largest smaller depth measured."""
    smaller = [d for d in prev if d < depth and math.isfinite(prev[d])]
    return prev[max(smaller)] * depth / max(smaller) if smaller else None


def _step_skip(k: str, depth: int, args: argparse.Namespace) -> str | None:
    """Why the training step of method ``k`` is not run at ``depth`` (its saved bytes still
    are: they need a forward only)."""
    if METHOD_BY_KEY[k].family == "torchdiffeq" and depth > args.torchdiffeq_max_step_depth:
        return (
            f"step not run above depth {args.torchdiffeq_max_step_depth} "
            "(--torchdiffeq-max-step-depth: its step costs O(N^2))"
        )
    return None


def _point_skip(
    k: str, depth: int, history: dict[str, dict[str, dict[int, float]]], args: argparse.Namespace
) -> str | None:
    """Why method ``k`` is not run at all at ``depth``: activations, extrapolated linearly
    from the smaller depths, above ``--max-activation-gib``."""
    est = _estimate(history["act_b"][k], depth)
    if est and est > args.max_activation_gib * 2**30:
        return (
            f"skipped: estimated activations {est / 2**30:.1f} GiB > "
            f"--max-activation-gib {args.max_activation_gib}"
        )
    return None


def _plan_point(w, depth, keys, history, args, fstatus, result) -> tuple[dict, dict, list]:
    """At (``w``, ``depth``): the statuses of the methods not run, the memory jobs
    ``{key: peak}`` (peak: measure the step's peak memory too) and the keys to time."""
    timed, peak = depth in args.time_depths_of[w], depth in args.peak_depths_of[w]
    point: dict[str, Any] = {}
    jobs: dict[str, bool] = {}
    to_time: list[str] = []
    for k in keys:
        m = METHOD_BY_KEY[k]
        if m.family == "fused" and fstatus != "available":
            point[k] = {"status": fstatus}
        elif m.scheme == "heun" and depth < 2:
            continue
        elif (why := _point_skip(k, depth, history, args)) is not None:
            point[k] = {"status": why}
            result["skipped"].append(f"{w} depth {depth} {k}: {why}")
        elif (why := _step_skip(k, depth, args)) is not None and (peak or timed):
            jobs[k] = False
            point[k] = {"step_skipped": why}
            result["skipped"].append(f"{w} depth {depth} {k}: {why} (saved bytes measured)")
        else:
            jobs[k] = peak
            to_time += [k] if timed else []
    return point, jobs, to_time


# --------------------------------------------------------------------------- measuring
def _check_child(v: dict[str, Any], args: argparse.Namespace) -> None:
    """The measuring process ran with the mmap-threshold setting the run records."""
    want = (
        str(MMAP_THRESHOLD) if args.pin_mmap_threshold else os.environ.get("MALLOC_MMAP_THRESHOLD_")
    )
    got = v.get("process", {}).get("malloc_mmap_threshold", want)
    if got != want:
        raise RuntimeError(
            f"the measuring processes run with MALLOC_MMAP_THRESHOLD_={got!r}, this run asked "
            f"for {want!r}: the process server of this Python process was started earlier with "
            "the other setting; run the benchmark in a new process"
        )


def _in_child(pool, fn, *fn_args, args: argparse.Namespace) -> Any:
    return run_in_child(pool, fn, *fn_args, timeout=args.child_timeout, threads=args.threads)


def _run_many(pool, calls: dict[Any, tuple], args, bar) -> dict[Any, Any]:
    """Run ``calls`` (``{name: (estimated_bytes, fn, fn_args)}``) each in a fresh process of
    ``pool``, up to ``--jobs`` at a time while the estimated memory of those running stays
    within ``--max-activation-gib`` (a call that alone exceeds it runs alone); largest first.
    For memory and gradient processes only: a peak is per process, so a neighbour does not
    change it; times are never measured side by side. Returns ``{name: result}``, a failed
    call's result being its ``RuntimeError``."""
    budget = args.max_activation_gib * 2**30
    pending = sorted(calls, key=lambda n: -calls[n][0])
    running: dict[Future, tuple[Any, float]] = {}
    out: dict[Any, Any] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        while pending or running:
            used = sum(est for _, est in running.values())
            fit = [n for n in pending if not running or used + calls[n][0] <= budget]
            if fit and len(running) < args.jobs:
                pending.remove(fit[0])
                est, fn, fn_args = calls[fit[0]]
                running[ex.submit(_in_child, pool, fn, *fn_args, args=args)] = (fit[0], est)
                continue
            for f in wait(running, return_when=FIRST_COMPLETED).done:
                name, _ = running.pop(f)
                try:
                    out[name] = f.result()
                except RuntimeError as e:
                    out[name] = e
                if bar:
                    bar.update(1)
    return out


def _measure_methods(pool, cfg, depth, jobs, history, args, bar) -> dict[str, Any]:
    """The memory of every method of ``jobs`` at one depth: a process per method (several
    side by side with ``--jobs``), or one for them all (``--isolate point``)."""
    if args.isolate == "point":
        try:
            out = _in_child(pool, measure_point, cfg, depth, jobs, args.device, args=args)
        except RuntimeError as e:
            out = {k: {"status": f"failed: {e}"} for k in jobs}
        if bar:
            bar.update(len(jobs))
        return out
    calls = {
        k: (
            _estimate(history["act_b"][k], depth) or 0,
            measure_method,
            (cfg, depth, k, args.device, peak),
        )
        for k, peak in jobs.items()
    }
    out = _run_many(pool, calls, args, bar)
    failed = {k: {"status": f"failed: {v}"} for k, v in out.items() if isinstance(v, Exception)}
    return {k: failed.get(k, out[k]) for k in jobs}


def _time_point(cfg, depth, keys, args) -> dict[str, Any]:
    """Step times of ``keys`` at one depth, in one fresh *spawned* process (glibc's malloc
    settings of this environment, not the pinned ones of the memory processes), methods
    interleaved round-robin; ``time_ratio`` = median / median of ``plain``, and
    ``time_ratio_paired_median`` = median over the rounds of the per-round ratios."""
    ctx = mp.get_context("spawn")
    fn_args = (cfg, depth, keys, args.device, args.warmup, args.reps)
    try:
        out = _in_child(ctx, time_methods, *fn_args, args=args)
    except RuntimeError as e:
        return {k: {"status": f"timing failed: {e}"} for k in keys}
    base = out.get("plain", {})
    for k in keys:
        v = out.get(k, {})
        if "time_s" in v and "time_s" in base:
            v["time_ratio"] = v["time_s"] / base["time_s"]
            paired = [a / b for a, b in zip(v["times_s"], base["times_s"])]
            v["time_ratio_paired_median"] = _common.median(paired)
    return out


def _record(point, timing, w, depth, history, args, result) -> None:
    """Merge the times into ``point``; check the memory processes; note the saved bytes."""
    for k, v in timing.items():
        if k in point and k != "process":
            times = {f: v[f] for f in v if f.startswith("time")}
            point[k].update(times if v.get("status") == "ok" else {"time_status": v["status"]})
    if timing:
        result["timing_processes"].setdefault(w, {})[str(depth)] = timing.get("process")
    for k, v in point.items():
        if v.get("status") == "ok":
            _check_child(v, args)
            history["act_b"][k][depth] = v["activation_bytes"]


def _measure_workload(w, keys, fstatus, pool, args, result, bar) -> None:
    cfg = WORKLOADS[w]
    history: dict[str, dict[str, dict[int, float]]] = {"act_b": {k: {} for k in keys}}
    for depth in args.depths_of[w]:
        point, jobs, to_time = _plan_point(w, depth, keys, history, args, fstatus, result)
        if bar:
            bar.update(len(keys) - len(jobs))
        for k, v in _measure_methods(pool, cfg, depth, jobs, history, args, bar).items():
            point[k] = {**v, **point.get(k, {})}
        if to_time and bar:
            bar.set_postfix_str(f"{w} N={depth} timing")
        timing = _time_point(cfg, depth, to_time, args) if to_time else {}
        _record(point, timing, w, depth, history, args, result)
        result["points"].setdefault(w, {})[str(depth)] = point


def _gradient_errors(keys, pool, args) -> dict[str, Any]:
    """Relative gradient error per depth and its log-log slope, iid and smooth weights."""
    gkeys = [k for k in keys if k != "plain" and not k.endswith("-autograd")]
    calls = {
        (label, depth): (
            0,
            gradient_worker,
            (depth, label == "smooth", gkeys, args.device, 0, GRAD_CONFIG),
        )
        for label in ("iid", "smooth")
        for depth in args.grad_depths
    }
    bar = _common.progress(len(calls), "gradient error")
    results = _run_many(pool, calls, args, bar)
    if bar:
        bar.close()
    out = {}
    for label in ("iid", "smooth"):
        per_depth: dict[str, Any] = {}
        for depth in args.grad_depths:
            r = results[(label, depth)]
            failed = isinstance(r, Exception)
            per_depth[str(depth)] = {k: {"status": f"failed: {r}"} for k in gkeys} if failed else r
        slopes = {}
        for k in gkeys:
            pts = [
                (int(d), v[k]["rel_error"])
                for d, v in per_depth.items()
                if v.get(k, {}).get("status") == "ok"
            ]
            slopes[k] = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
        out[label] = {"per_depth": per_depth, "slopes": slopes}
    return out


# --------------------------------------------------------------------------- driver
def _new_result(args: argparse.Namespace, keys: list[str], fstatus: str) -> dict[str, Any]:
    machine = _common.machine_info(args.device)
    return {
        "benchmark": "peers",
        "command": " ".join(sys.argv),
        "machine": machine,
        "fused": fstatus,
        "settings": {
            "workloads": {w: WORKLOADS[w] for w in args.workloads},
            "depths": {w: list(args.depths_of[w]) for w in args.workloads},
            "time_depths": {w: list(args.time_depths_of[w]) for w in args.workloads},
            "peak_depths": {w: list(args.peak_depths_of[w]) for w in args.workloads},
            "warmup": args.warmup,
            "reps": args.reps,
            "methods": keys,
            "isolate": args.isolate,
            "jobs": args.jobs,
            "timing": "one spawned process per (workload, timed depth), methods interleaved "
            "round-robin, glibc malloc settings of the environment (MALLOC_MMAP_THRESHOLD_="
            f"{os.environ.get('MALLOC_MMAP_THRESHOLD_')})",
            "pin_mmap_threshold": args.pin_mmap_threshold,
            "mmap_threshold_bytes": MMAP_THRESHOLD if args.pin_mmap_threshold else None,
            "child_threads": args.threads or torch.get_num_threads(),
            "child_timeout_s": args.child_timeout,
            "torchdiffeq_max_step_depth": args.torchdiffeq_max_step_depth,
            "max_activation_gib": args.max_activation_gib,
            "grad_config": GRAD_CONFIG,
            "grad_depths": list(args.grad_depths),
            "step": STEP,
        },
        "loadavg": {"start": (machine["loadavg_at_start"] or [None])[0], "max_seen": None},
        "timing_processes": {},
        "points": {},
        "gradient_error": {},
        "skipped": [],
    }


def _processes(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What every measuring process of the run reported about itself (pid, load, CPU time)."""
    out = []
    for pts in result["points"].values():
        for point in pts.values():
            out += [v["process"] for v in point.values() if "process" in v]
    for pts in result["timing_processes"].values():
        out += [p for p in pts.values() if p]
    for g in result["gradient_error"].values():
        out += [v["process"] for v in g["per_depth"].values() if "process" in v]
    return out


def _load_and_cpu(result: dict[str, Any]) -> None:
    """The highest load average any measuring process saw, and their total CPU time (about
    the run's wall time on one idle core)."""
    procs = _processes(result)
    loads = [p[f"loadavg_{when}"] for p in procs for when in ("start", "end")]
    result["loadavg"]["max_seen"] = max((la[0] for la in loads if la), default=None)
    result["cpu_s"] = sum(p.get("cpu_s", 0.0) for p in procs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the run (see the module docstring); returns the result dict."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    keys = [m.key for m in METHODS if args.methods is None or m.key in args.methods]
    fstatus = fused_status(args.device)
    started = time.time()
    result = _new_result(args, keys, fstatus)
    pool = fresh_process_pool(PRELOAD, pin_mmap_threshold=args.pin_mmap_threshold)
    n_points = sum(len(args.depths_of[w]) for w in args.workloads)
    bar = _common.progress(n_points * len(keys), "memory+time")
    for w in args.workloads:
        _measure_workload(w, keys, fstatus, pool, args, result, bar)
    if bar:
        bar.close()
    result["gradient_error"] = _gradient_errors(keys, pool, args)
    result["targets"] = evaluate_targets(result)
    result["loadavg"]["end"] = (_common.load_average() or [None])[0]
    _load_and_cpu(result)
    result["elapsed_s"] = time.time() - started
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add(
        "--quick",
        action="store_true",
        help=f"depths {QUICK_DEPTHS} (all timed), gradient depths {QUICK_GRAD_DEPTHS}, "
        "3 timed rounds (a smoke run, not for quoting)",
    )
    add("--depths", type=int, nargs="+", help="depths for every workload")
    add("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None)
    add(
        "--methods",
        nargs="+",
        choices=[m.key for m in METHODS],
        default=None,
        help="subset of methods ('plain' is always added: it is the time baseline)",
    )
    add(
        "--time-depths",
        type=int,
        nargs="+",
        default=None,
        help=f"time steps at these depths (default: {DEFAULT_TIME_DEPTHS[0]}, the narrow MLP at "
        "its own depth; with --depths or --quick: every depth)",
    )
    add(
        "--peak-depths",
        type=int,
        nargs="+",
        default=None,
        help="measure the peak step memory only at these depths (default: every depth)",
    )
    add("--grad-depths", type=int, nargs="+", default=None)
    add("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    add("--reps", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    add(
        "--isolate",
        choices=("method", "point"),
        default=None,
        help="one measuring process per (workload, depth, method) (default on CPU: a fresh "
        "allocator per peak, and depth 1024 fits in memory) or per (workload, depth) (default "
        "on CUDA, where the allocator's counters are exact per method and processes are slow "
        "to start)",
    )
    add(
        "--pin-mmap-threshold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"start the measuring processes with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} "
        "(glibc returns freed buffers to the OS at once, so the CPU peak follows the live "
        "tensors); --no-pin-mmap-threshold measures with glibc's default, what a user gets",
    )
    add(
        "--torchdiffeq-max-step-depth",
        type=int,
        default=TORCHDIFFEQ_MAX_STEP_DEPTH,
        help="run torchdiffeq's training step (peak, time) up to this depth only; above, its "
        f"saved bytes only (default {TORCHDIFFEQ_MAX_STEP_DEPTH}: its step costs O(N^2))",
    )
    add(
        "--max-activation-gib",
        type=float,
        default=8.0,
        help="the most activation memory the run may hold at a time (protects a shared "
        "machine's RAM): a point whose activations, extrapolated linearly in depth from the "
        "previous depth, exceed it is skipped, and processes side by side (--jobs) stay within it",
    )
    add(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per measuring process (default: torch's, i.e. OMP_NUM_THREADS)",
    )
    add(
        "--jobs",
        type=int,
        default=None,
        help="memory and gradient processes run side by side, at most this many (default: "
        "the available cores / threads per process; 1 with --isolate point); the timing "
        "processes always run alone",
    )
    add("--child-timeout", type=float, default=1800.0, help="seconds per measuring process")
    add("--out", type=Path, default=Path("results/benchmarks"))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill in the per-workload depths."""
    a = _parser().parse_args(argv)
    if a.workloads is None:
        a.workloads = ["mlp", "conv"] if a.quick else list(DEFAULT_WORKLOADS)
    if a.methods is not None and "plain" not in a.methods:
        a.methods = ["plain", *a.methods]
    a.isolate = a.isolate or ("point" if a.device == "cuda" else "method")
    if a.jobs is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        per_process = a.threads or torch.get_num_threads()
        a.jobs = 1 if a.isolate == "point" else max(1, (cpus or 1) // per_process)
    a.depths_of, a.time_depths_of, a.peak_depths_of = {}, {}, {}
    for w in a.workloads:
        if a.depths or a.quick:
            depths = timed = tuple(a.depths or QUICK_DEPTHS)
        else:
            depths, timed = DEFAULT_DEPTHS_OF.get(w, DEFAULT_DEPTHS), DEFAULT_TIME_DEPTHS
        a.depths_of[w] = depths
        if depths is DEFAULT_DEPTHS_OF.get(w):  # (measured in full at its own depths)
            a.time_depths_of[w] = a.peak_depths_of[w] = depths
            continue
        a.time_depths_of[w] = tuple(d for d in depths if d in (a.time_depths or timed))
        a.peak_depths_of[w] = tuple(d for d in depths if d in (a.peak_depths or depths))
    a.grad_depths = a.grad_depths or (QUICK_GRAD_DEPTHS if a.quick else GRAD_DEPTHS)
    a.reps = a.reps if a.reps is not None else (3 if a.quick else 5)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    md = to_markdown(result)
    written = _common.write_json_md(args.out, "peers", result, md)
    written += plot(result, args.out)
    print(md)
    print("wrote", *map(str, written))
    return result


if __name__ == "__main__":
    main()
