"""What the trustworthy adjoint costs: drift check, refined reverse steps and ``backward="auto"``.

One residual stage, Euler, ``x <- x + h f_n(x)``, per workload (the ``mlp`` and ``conv``
workloads of ``benchmarks/peers.py``: batch 256, Linear(512,64)-tanh-Linear(64,512); batch 64,
16 channels, 16x16, conv-BN-ReLU-conv-BN in training mode) and per regime:

* ``smooth``: depth ``N`` (default 64), step ``1/N``, weights smooth in depth
  (:func:`resode.models.blocks.smooth_in_depth_`): ODE-like, the adjoint's gradients are close;
* ``non-ode``: depth 4, step 1, iid weights: the regime of the paper's Fig. 3b (Sander, Ablin &
  Peyre, NeurIPS 2022) where the reconstruction adjoint's gradients are wrong.

Methods: ``autograd`` (resode's generic stage, exact, the time baseline), ``checkpoint``
(``torch.utils.checkpoint`` around each block, non-reentrant, exact), ``adjoint`` with
``refine`` K = 0, 1, 2 and ``auto`` (K = 0, default ``tol``) on the generic engine, and the same
(plus its own autograd) on the fused engine when :func:`resode.fused.available_for` the device.

Per (workload, regime, method): the median step time (forward + loss ``mean(y^2)`` + backward,
methods interleaved round-robin in one process so that load changes hit all alike), its ratio
to ``autograd``, the bytes saved for the backward, the relative gradient error
``||g - g_exact|| / ||g_exact||`` over all parameters against a hand-written autograd loop on a
float64 copy of the same stage, and the adjoints' ``drift`` and ``auto``'s ``fell_back`` from
``stage.last_backward``.

The drift check's cost (issue target: at most 5 % of the adjoint's step). The generic adjoint has
no switch to turn the check off, and the library is not changed for the benchmark, so it is
measured twice:

1. *isolated* (the verdict): the check's own operations as
   :func:`resode._adjoint.reconstruct_and_pull` runs them -- per step, under ``no_grad``,
   ``torch.maximum(err, dist(out, start), out=err)`` (one subtraction, one norm, one max on
   state-sized tensors), then ``rel_norm(x^_0, x_0)`` and ``relative(err, y)`` once -- called
   through the library's own functions ``N`` times at the stage's shape, timed alone, divided
   by the adjoint's median step time;
2. *A/B* (a cross-check, noisier): the same adjoint stage timed with ``resode._adjoint.dist``
   replaced, for that arm only, by a function returning a zero (the check then costs a 0-dim max
   per step and one norm at the end), interleaved with the unmodified arm; the overhead is the
   median over rounds of the per-round time ratio, minus 1.

The fused engine's check runs inside its C++ op and cannot be switched off; its cost is
*estimated* from the ATen equivalents of the work it adds per step (the consistency norm and
max, which the C++ fuses into one pass, the axpy that forms ``Phi_n(x^_n)`` and, for the MLP,
the block's second GEMM that the vector-Jacobian product alone does not need).

Writes ``results/benchmarks/trust.{json,md}`` (``--out``). The default CPU run takes about
3 minutes on 2 shared cores with ``--threads 1``; with several threads on cores that other jobs
keep busy, OpenMP spin-waiting can make it take hours (the script warns).

    python benchmarks/trust.py --threads 1        # the default CPU run (shared machine)
    python benchmarks/trust.py --quick            # tiny sizes, depth 8, 3 rounds (a smoke run)
    python benchmarks/trust.py --device cuda      # the same on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if (_HERE.parent / "resode" / "__init__.py").exists():  # run from a checkout
    sys.path.insert(1, str(_HERE.parent))

import _common  # noqa: E402
import _peers_measure as pmeasure  # noqa: E402
import _peers_methods as pmethods  # noqa: E402
import peers  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import resode  # noqa: E402
from resode import _adjoint  # noqa: E402

#: tiny workloads of ``--quick`` (and of the test)
QUICK_WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {"kind": "mlp", "batch": 16, "dim": 16, "hidden": 8},
    "conv": {"kind": "conv", "batch": 4, "channels": 3, "size": 6},
}
TARGET_OVERHEAD = 0.05
STEP = "grads=None + forward + loss=mean(y^2) + backward (no update: every step, the same weights)"


@dataclass(frozen=True)
class Regime:
    """How the stage is built: depth (``None``: ``--depth``), step (``None``: ``1/N``), and
    whether the weights are smooth in depth (else iid default initialisation)."""

    name: str
    depth: int | None
    step: float | None
    smooth: bool


REGIMES: dict[str, Regime] = {
    "smooth": Regime("smooth", None, None, True),
    "non-ode": Regime("non-ode", 4, 1.0, False),
}


@dataclass(frozen=True)
class TrustMethod:
    """One way to differentiate the stage. ``engine``: generic | fused | torch (checkpoint)."""

    key: str
    engine: str
    backward: str
    refine: int = 0


METHODS: tuple[TrustMethod, ...] = (
    TrustMethod("autograd", "generic", "autograd"),
    TrustMethod("checkpoint", "torch", "checkpoint"),
    *(TrustMethod(f"adjoint K={k}", "generic", "adjoint", k) for k in (0, 1, 2)),
    TrustMethod("auto", "generic", "auto"),
    TrustMethod("fused autograd", "fused", "autograd"),
    *(TrustMethod(f"fused adjoint K={k}", "fused", "adjoint", k) for k in (0, 1, 2)),
    TrustMethod("fused auto", "fused", "auto"),
)
BASELINE = "autograd"
#: the method whose step the drift check's cost is a fraction of (the cheapest adjoint step)
CHECKED = "adjoint K=0"


# --------------------------------------------------------------------------- the stages
class SteppedLoop(pmethods.PlainLoop):
    """Hand-written autograd loop ``x <- x + h f_n(x)`` (the exact float64 reference)."""

    def __init__(self, blocks: nn.ModuleList, step: float) -> None:
        super().__init__(blocks)
        self.step = step

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = x + self.step * b(x)
        return x


class SteppedCheckpoint(SteppedLoop):
    """Each block under ``torch.utils.checkpoint`` (non-reentrant): keeps each block's input."""

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = x + self.step * checkpoint(b, x, use_reentrant=False)
        return x


def build(
    method: TrustMethod, blocks: nn.ModuleList, cfg: dict[str, Any], step: float | None
) -> nn.Module:
    """The stage of ``method`` over ``blocks`` (shared parameters; the fused engine copies them
    into its own layout)."""
    if method.engine == "torch":
        return SteppedCheckpoint(blocks, 1.0 / len(blocks) if step is None else step)
    stack = resode.ResidualStack(
        list(blocks), scheme="euler", backward=method.backward, step=step, refine=method.refine
    )
    if method.engine == "generic":
        return stack
    from resode import fused

    cls = fused.MLPStack if cfg["kind"] == "mlp" else fused.ConvStack
    return cls.from_generic(stack)


@contextlib.contextmanager
def drift_check_replaced() -> Iterator[None]:
    """The A/B arm: ``resode._adjoint.dist`` (the per-step consistency norm and the final drift's
    numerator) returns a zero while inside; restored on exit. Only for timing: the report's
    drift is then 0."""
    original = getattr(_adjoint, "dist", None)
    if original is None:
        raise RuntimeError(
            "resode._adjoint.dist no longer exists: update drift_check_replaced() and "
            "check_ops() in benchmarks/trust.py to the adjoint's current drift check"
        )
    zeros: dict[tuple, Tensor] = {}

    def no_dist(a: Tensor, b: Tensor) -> Tensor:
        key = (a.device, _adjoint.norm_dtype(a))
        if key not in zeros:
            zeros[key] = torch.zeros((), dtype=key[1], device=a.device)
        return zeros[key]

    _adjoint.dist = no_dist
    try:
        yield
    finally:
        _adjoint.dist = original


def train_step(model: nn.Module, x: Tensor, check: bool = True) -> Callable[[], None]:
    """One timed step (:data:`STEP`); ``check=False`` runs it under :func:`drift_check_replaced`."""
    params = pmethods.trainable(model)

    def step() -> None:
        for p in params:
            p.grad = None
        with contextlib.nullcontext() if check else drift_check_replaced():
            model(x).square().mean().backward()

    return step


# --------------------------------------------------------------------------- drift-check cost
def check_ops(x: Tensor, num_steps: int) -> Callable[[], None]:
    """The generic adjoint's drift check for one backward of ``num_steps`` steps on states
    shaped like ``x``, with the library's own functions (:mod:`resode._adjoint`:
    ``reconstruct_and_pull``)."""
    a = x.detach().clone()
    b = a + 1e-3
    err = torch.zeros((), dtype=_adjoint.norm_dtype(a), device=a.device)

    def run() -> None:
        for _ in range(num_steps):
            with torch.no_grad():
                torch.maximum(err, _adjoint.dist(a, b), out=err)
        with torch.no_grad():
            _adjoint.rel_norm(a, b)
            _adjoint.relative(err, b)

    return run


def fused_check_estimate(
    x: Tensor, num_steps: int, cfg: dict[str, Any], h: float, gemm: bool = True
) -> Callable[[], None]:
    """ATen equivalents of the work the fused adjoint's check adds per step (module docstring):
    ``phi = x + h f`` and the consistency norm and max, plus for the MLP (``gemm``) the block's
    second GEMM."""
    f, phi = torch.zeros_like(x), torch.empty_like(x)
    err = torch.zeros((), dtype=_adjoint.norm_dtype(x), device=x.device)
    extra: Callable[[], Any] = lambda: None  # noqa: E731
    if cfg["kind"] == "mlp" and gemm:
        act = torch.randn(x.shape[0], cfg["hidden"], dtype=x.dtype, device=x.device)
        w2 = torch.randn(cfg["dim"], cfg["hidden"], dtype=x.dtype, device=x.device)
        b2 = torch.randn(cfg["dim"], dtype=x.dtype, device=x.device)
        extra = lambda: torch.addmm(b2, act, w2.t(), out=f)  # noqa: E731

    def run() -> None:
        with torch.no_grad():
            for _ in range(num_steps):
                extra()
                torch.add(x, f, alpha=h, out=phi)
                torch.maximum(err, _adjoint.dist(phi, x), out=err)

    return run


def ab_ratios(model: nn.Module, x: Tensor, args, bar) -> list[float]:
    """Per-round ratios ``t(with check) / t(check replaced)`` of the same stage, ``--ab-rounds``
    pairs after a warm-up of each arm, the order alternating between rounds (ABBA...), so that
    a load change within a pair biases neither arm."""
    with_check, without = train_step(model, x), train_step(model, x, check=False)
    for step in (with_check, without):
        _common.time_calls(step, args.device, warmup=max(args.warmup, 1), reps=0)
    ratios = []
    for r in range(args.ab_rounds):
        order = (with_check, without) if r % 2 == 0 else (without, with_check)
        t = {id(s): _common.time_calls(s, args.device, warmup=0, reps=1)[0] for s in order}
        ratios.append(t[id(with_check)] / t[id(without)])
        if bar:
            bar.update(1)
    return ratios


def drift_check_cost(
    x: Tensor,
    cfg: dict[str, Any],
    regime: Regime,
    models: dict[str, nn.Module],
    times: dict[str, list[float]],
    args,
    bar,
) -> dict[str, Any]:
    """Both measures of the check's cost (module docstring) at one (workload, regime), and the
    fused estimate."""
    depth = regime.depth or args.depth
    h = 1.0 / depth if regime.step is None else regime.step
    reps, warm = max(args.reps, 5), max(args.warmup, 1)
    iso = _common.median(_common.time_calls(check_ops(x, depth), args.device, warm, reps))
    out: dict[str, Any] = {"check_ops_s": iso, "num_steps": depth}
    adj = times[CHECKED]
    out["adjoint_step_s"] = _common.median(adj)
    out["isolated_fraction"] = iso / out["adjoint_step_s"]
    if args.ab_rounds:
        ratios = ab_ratios(models[CHECKED], x, args, bar)
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out["ab_ratios"] = ratios
        out["ab_overhead"] = statistics.median(ratios) - 1.0
        out["ab_quartiles"] = [q1 - 1.0, q3 - 1.0]
    fused_adj = times.get("fused adjoint K=0")
    if fused_adj:
        out["fused_adjoint_step_s"] = _common.median(fused_adj)
        for key, gemm in (("fused_estimate", True), ("fused_elementwise", False)):
            if key == "fused_elementwise" and cfg["kind"] != "mlp":
                continue
            run = fused_check_estimate(x, depth, cfg, h, gemm)
            est = _common.median(_common.time_calls(run, args.device, warm, reps))
            out[f"{key}_s"] = est
            out[f"{key}_fraction"] = est / out["fused_adjoint_step_s"]
    return out


# --------------------------------------------------------------------------- one point
def _methods(args) -> list[TrustMethod]:
    fused_ok = args.fused and args.fused_status == "available"
    return [m for m in METHODS if m.engine != "fused" or fused_ok]


def _report_of(model: nn.Module) -> dict[str, Any] | None:
    rep = getattr(model, "last_backward", None)
    return None if rep is None else rep.to_dict()


def time_point(models: dict[str, nn.Module], x: Tensor, args, bar) -> dict[str, list[float]]:
    """Step times of every model: warm-ups, then ``--reps`` rounds of one step each, in turn."""
    steps = {k: train_step(m, x) for k, m in models.items()}
    for step in steps.values():
        _common.time_calls(step, args.device, warmup=args.warmup, reps=0)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for k, step in steps.items():
            times[k] += _common.time_calls(step, args.device, warmup=0, reps=1)
        if bar:
            bar.update(1)
    return times


def gradient_errors(
    cfg: dict[str, Any], regime: Regime, depth: int, methods: list[TrustMethod], args, bar
) -> dict[str, dict[str, Any]]:
    """Relative gradient error of each method against a hand-written autograd loop, float64,
    with the ``last_backward`` report of the float64 backward."""
    f64 = {"dtype": torch.float64, "device": args.device}
    blocks = pmethods.make_blocks(cfg, depth, seed=args.seed, smooth=regime.smooth, **f64)
    x = pmethods.make_input(cfg, seed=args.seed + 1, **f64)
    target = pmethods.make_input(cfg, seed=args.seed + 2, **f64)
    h = 1.0 / depth if regime.step is None else regime.step
    names = [n for n, _ in resode.ResidualStack(list(blocks)).named_parameters()]
    ref_model = SteppedLoop(blocks, h)
    ref = pmeasure._flat(ref_model, pmeasure._loss_grads(ref_model, x, target), names)
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        model = build(m, blocks, cfg, regime.step)
        g = pmeasure._flat(model, pmeasure._loss_grads(model, x, target), names)
        err = float((g - ref).norm() / ref.norm())
        out[m.key] = {"rel_error": err, "report": _report_of(model)}
        if bar:
            bar.update(1)
    return out


def measure_point(w: str, regime: Regime, args, bar) -> dict[str, Any]:
    """Every measurement at one (workload, regime)."""
    cfg = args.workloads_cfg[w]
    depth = regime.depth or args.depth
    methods = _methods(args)
    dev = {"device": args.device}
    blocks = pmethods.make_blocks(cfg, depth, seed=args.seed, smooth=regime.smooth, **dev)
    x = pmethods.make_input(cfg, seed=args.seed + 1, **dev)
    models = {m.key: build(m, blocks, cfg, regime.step) for m in methods}
    times = time_point(models, x, args, bar)
    rows: dict[str, dict[str, Any]] = {}
    base = _common.median(times[BASELINE])
    for m in methods:
        t = _common.median(times[m.key])
        rows[m.key] = {**asdict(m), "times_s": times[m.key], "time_s": t, "ratio": t / base}
        rows[m.key]["report_f32"] = _report_of(models[m.key])
        rows[m.key]["saved_bytes"] = pmethods.activation_bytes(models[m.key], x)
    for k, v in gradient_errors(cfg, regime, depth, methods, args, bar).items():
        rows[k].update(v)
    cost = drift_check_cost(x, cfg, regime, models, times, args, bar)
    if bar:
        bar.update(1)
    return {
        "workload": w,
        "config": cfg,
        "regime": asdict(regime),
        "depth": depth,
        "step": 1.0 / depth if regime.step is None else regime.step,
        "methods": rows,
        "drift_check": cost,
    }


def _worst(points: list[dict[str, Any]], key: str) -> tuple[str, float] | None:
    """The (workload/regime, value) with the largest ``drift_check[key]``."""
    vals = {
        f"{p['workload']}/{p['regime']['name']}": p["drift_check"][key]
        for p in points
        if key in p["drift_check"]
    }
    return max(vals.items(), key=lambda kv: kv[1]) if vals else None


def verdict(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The drift-check target: the check's isolated cost <= 5 % of the generic adjoint's step
    at every (workload, regime); the fused engine's estimate is reported beside it."""
    worst = _worst(points, "isolated_fraction")
    if worst is None:
        return {"status": "not measured"}
    met = worst[1] <= TARGET_OVERHEAD
    line = (
        f"Drift check <= {TARGET_OVERHEAD:.0%} of the generic adjoint's step: "
        f"{'MET' if met else 'MISSED'} (worst {worst[1]:.2%} at {worst[0]}; isolated timing of "
        "the check's own ops)"
    )
    out: dict[str, Any] = {"status": "met" if met else "missed", "target": TARGET_OVERHEAD}
    out["worst"] = {"at": worst[0], "fraction": worst[1]}
    fused = _worst(points, "fused_estimate_fraction")
    if fused is not None:
        out["fused_worst"] = {"at": fused[0], "fraction": fused[1]}
        out["fused_status"] = "met" if fused[1] <= TARGET_OVERHEAD else "missed"
        line += (
            f". Fused engine (estimate): {'met' if fused[1] <= TARGET_OVERHEAD else 'MISSED'}, "
            f"worst {fused[1]:.2%} at {fused[0]}"
        )
    ab = _worst(points, "ab_overhead")
    if ab is not None:
        out["ab_worst"] = {"at": ab[0], "overhead": ab[1]}
        line = line.replace(
            "own ops)", f"own ops; A/B cross-check: worst median {ab[1]:.2%} at {ab[0]})"
        )
    out["line"] = line
    return out


def threads_warning(info: dict[str, Any]) -> str | None:
    """A warning when several intra-op threads share CPUs that are already busy: OpenMP's
    spin-waiting then makes step times meaningless (measured on the 2-core development machine
    at load ~4: a 64-block MLP autograd step took 8.6 s with 2 threads, 0.12 s with 1)."""
    load, cpus = info.get("loadavg_at_start"), info.get("affinity") or info.get("cpu_count")
    if info["device"] != "cpu" or info["torch_threads"] <= 1 or not load or not cpus:
        return None
    if load[0] < cpus:
        return None
    return (
        f"{info['torch_threads']} intra-op threads on {cpus} CPUs at load {load[0]}: step times "
        "may be dominated by OpenMP spin-waiting; rerun with --threads 1 (or OMP_NUM_THREADS=1)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the run; returns the result dict. ``--threads`` applies to this
    run only (torch's thread count is restored afterwards)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    threads_before = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    args.fused_status = pmethods.fused_status(args.device)
    info = _common.machine_info(args.device)
    warning = threads_warning(info)
    if warning:
        print("warning:", warning, file=sys.stderr)
    n_methods = len(_methods(args))
    per_point = args.reps + n_methods + args.ab_rounds + 1
    bar = _common.progress(per_point * len(args.workloads) * len(args.regimes), "trust")
    points = [measure_point(w, REGIMES[r], args, bar) for w in args.workloads for r in args.regimes]
    if bar:
        bar.close()
    return {
        "provenance": {
            "machine": info,
            "torch": torch.__version__,
            "command": " ".join(["benchmarks/trust.py", *args.argv]),
            "started": started,
            "wall_s": time.perf_counter() - t0,
            "loadavg_at_end": _common.load_average(),
            "fused": args.fused_status,
            "step": STEP,
            "warmup": args.warmup,
            "reps": args.reps,
            "tol": _adjoint.DEFAULT_TOL,
            "warning": warning,
        },
        "points": points,
        "verdict": verdict(points),
    }


# --------------------------------------------------------------------------- report
def _sci(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.1e}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _head(cols: list[str], left: int) -> list[str]:
    """A Markdown table's header: the first ``left`` columns left-aligned, the others right."""
    align = ["---"] * left + ["---:"] * (len(cols) - left)
    return [f"| {' | '.join(cols)} |", f"|{'|'.join(align)}|"]


def _fell_back(row: dict[str, Any]) -> str:
    if row["backward"] != "auto":
        return ""
    f32, f64 = row.get("report_f32"), row.get("report")
    return " / ".join("-" if r is None else ("yes" if r["fell_back"] else "no") for r in (f32, f64))


def summary_table(points: list[dict[str, Any]]) -> list[str]:
    """One row per (workload, regime, method)."""
    lines = _head(
        ["workload", "regime", "method", "step (ms)", "x autograd", "saved for backward"]
        + ["grad rel. error (f64)", "drift (f64)", "auto fell back (f32 / f64)"],
        left=3,
    )
    for p in points:
        for k, r in p["methods"].items():
            rep = r.get("report") or {}
            drift = rep.get("drift") if r["backward"] in ("adjoint", "auto") else None
            lines.append(
                f"| {p['workload']} | {p['regime']['name']} (N={p['depth']}, h={p['step']:.3g}) "
                f"| {k} | {1e3 * r['time_s']:.1f} | {r['ratio']:.2f} "
                f"| {_common.human_bytes(r.get('saved_bytes'))} | {_sci(r.get('rel_error'))} "
                f"| {_sci(drift)} | {_fell_back(r)} |"
            )
    return lines


def refine_table(points: list[dict[str, Any]]) -> list[str]:
    """Step time of refine K = 1, 2 and of auto relative to the adjoint with K = 0."""
    lines = _head(["workload", "regime", "engine", "K=1 / K=0", "K=2 / K=0", "auto / K=0"], 3)
    for p in points:
        ms = p["methods"]
        for prefix in ("", "fused "):
            k0 = ms.get(f"{prefix}adjoint K=0")
            if k0 is None:
                continue
            cells = [
                f"{ms[f'{prefix}{s}']['time_s'] / k0['time_s']:.2f}"
                for s in ("adjoint K=1", "adjoint K=2", "auto")
            ]
            eng = "fused" if prefix else "generic"
            row = [p["workload"], p["regime"]["name"], eng, *cells]
            lines.append(f"| {' | '.join(row)} |")
    return lines


def check_table(points: list[dict[str, Any]]) -> list[str]:
    """The drift check's cost, both measures, and the fused estimate."""
    lines = _head(
        ["workload", "regime", "N", "adjoint K=0 step (ms)", "check ops alone (ms)", "isolated"]
        + ["A/B: with / without - 1, median [quartiles] of paired rounds"]
        + ["fused: estimate (without the MLP's GEMM)"],
        left=2,
    )
    for p in points:
        c = p["drift_check"]
        ab, elem = "-", ""
        if "fused_elementwise_fraction" in c:
            elem = f" ({_pct(c['fused_elementwise_fraction'])})"
        if "ab_overhead" in c:
            q1, q3 = c["ab_quartiles"]
            ab = f"{_pct(c['ab_overhead'])} [{_pct(q1)}, {_pct(q3)}] ({len(c['ab_ratios'])} pairs)"
        lines.append(
            f"| {p['workload']} | {p['regime']['name']} | {c['num_steps']} "
            f"| {1e3 * c.get('adjoint_step_s', math.nan):.1f} | {1e3 * c['check_ops_s']:.3f} "
            f"| {_pct(c.get('isolated_fraction'))} | {ab} "
            f"| {_pct(c.get('fused_estimate_fraction'))}{elem} |"
        )
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    """The run as Markdown: provenance, the tables, the verdict."""
    prov, m = result["provenance"], result["provenance"]["machine"]
    head = [
        "## Trustworthy adjoint: cost of the drift check, refine and auto",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {prov['torch']} "
        f"({m['torch_threads']} threads, OMP_NUM_THREADS={m['omp_num_threads_env']}), device "
        f"`{m['device']}`{', ' + m['gpu'] if m.get('gpu') else ''}; load average at start "
        f"{m['loadavg_at_start']}, at end {prov['loadavg_at_end']}.  ",
        f"Started {prov['started']}; run time {prov['wall_s']:.0f} s. Fused engine: "
        f"{prov['fused']}.  ",
        f"Command: `{prov['command']}`.  ",
        f"Step: {prov['step']}; time = median of {prov['reps']} rounds after {prov['warmup']} "
        "warm-up(s), methods interleaved round-robin in one process. Gradient error: "
        "`||g - g_exact|| / ||g_exact||` over all parameters, float64 copy of the same stage, "
        "against a hand-written autograd loop; loss `0.5 ||y - t||^2 / B`. "
        f"`auto`: refine 0, tol {prov['tol']}.",
        "",
        f"**{result['verdict'].get('line', result['verdict']['status'])}**",
        "",
        *([f"Warning: {prov['warning']}.", ""] if prov.get("warning") else []),
    ]
    body = [
        *summary_table(result["points"]),
        "",
        "**Cost of refined reverse steps and of auto (step time relative to the adjoint, K=0)**",
        "",
        *refine_table(result["points"]),
        "",
        "**Drift check: cost relative to the adjoint's step (K=0)**",
        "",
        *check_table(result["points"]),
        "",
        "Isolated: the check's own ops (per step `torch.maximum(err, dist(out, start), out=err)`,"
        " then `rel_norm(x^_0, x_0)` and `relative(err, y)` once; resode._adjoint's own "
        "functions) N times at the stage's shape, timed alone, over the adjoint's median step. "
        "A/B: the same stage with `resode._adjoint.dist` replaced by a zero for that arm only, "
        "timed in pairs with the unmodified one (order alternating), the median of the per-pair "
        "ratios. Fused: the check runs inside the C++ op and "
        "cannot be switched off; estimate = ATen equivalents of what it adds per step (the "
        "axpy forming Phi_n(x^_n), the consistency norm and max, and for the MLP the block's "
        "second GEMM).",
        "",
    ]
    return "\n".join(head + body)


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--quick", action="store_true", help="tiny sizes, depth 8, 1 warm-up, 3 rounds")
    add("--workloads", nargs="+", choices=("mlp", "conv"), default=["mlp", "conv"])
    add("--regimes", nargs="+", choices=tuple(REGIMES), default=list(REGIMES))
    add("--depth", type=int, default=None, help="depth of the smooth regime (default 64)")
    add("--warmup", type=int, default=None, help="untimed steps per method (default 1)")
    add("--reps", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    add(
        "--ab-rounds",
        type=int,
        default=None,
        help="paired rounds of the drift check's A/B cross-check (default 15, --quick 4; 0: off)",
    )
    add("--seed", type=int, default=0)
    add(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the fused engine, where resode.fused.available_for(device)",
    )
    add("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    add("--out", type=Path, default=Path("results/benchmarks"))
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.depth = a.depth or (8 if a.quick else 64)
    a.warmup = 1 if a.warmup is None else a.warmup
    a.reps = a.reps or (3 if a.quick else 5)
    a.ab_rounds = (4 if a.quick else 15) if a.ab_rounds is None else a.ab_rounds
    a.workloads_cfg = QUICK_WORKLOADS if a.quick else peers.WORKLOADS
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the Markdown report and write ``<out>/trust.{json,md}``."""
    args = parse_args(argv)
    result = run(args)
    print(md := to_markdown(result))
    print("wrote", *map(str, _common.write_json_md(args.out, "trust", result, md)))
    return result


if __name__ == "__main__":
    main()
