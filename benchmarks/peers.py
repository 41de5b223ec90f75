"""resode against what a user would pick instead: memory, speed and gradient error vs depth.

One residual network -- ``N`` untied blocks, ``x <- x + f_n(x) / N`` -- trained by:

* ``plain``: a hand-written autograd loop (the baseline of every time ratio);
* ``checkpoint``: ``torch.utils.checkpoint`` around each block (non-reentrant);
* ``torchdiffeq``: ``torchdiffeq.odeint_adjoint``, fixed-step Euler on ``t in [0, 1]`` with
  ``step_size = 1/N``, the vector field at time ``t`` being block ``floor(t N)`` (the continuous
  adjoint of the piecewise-constant ODE);
* ``generic-{euler,heun}-{autograd,adjoint}``: :class:`resode.ResidualStack`;
* ``fused-{euler,heun}-{autograd,adjoint}``: :mod:`resode.fused` (when the extension is built).

Measured per (workload, depth, method): activation memory (bytes saved for backward), the peak
memory of one training step in a fresh process, and the step time as a ratio to ``plain`` in the
same process; and, separately, the relative gradient error against exact autograd in float64 for
depths 8..256 with iid and depth-smooth weights, with fitted log-log slopes. Writes
``results/benchmarks/peers.{json,md}`` and the plots ``peers_memory``, ``peers_time`` and
``peers_gradient_error`` (PNG and PDF). See ``benchmarks/README.md`` for how to read them.

    python benchmarks/peers.py                    # full CPU run (depths 16, 64, 256, 1024)
    python benchmarks/peers.py --quick            # small depths, few repetitions
    python benchmarks/peers.py --device cuda --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if (_HERE.parent / "resode" / "__init__.py").exists():  # run from a checkout
    sys.path.insert(1, str(_HERE.parent))
import _common  # noqa: E402

import resode  # noqa: E402
from resode.diagnostics import saved_tensor_bytes  # noqa: E402

# --------------------------------------------------------------------------- workloads
#: name -> block configuration and batch. ``mlp-narrow`` is the narrow configuration of the
#: extension issue (where the fused engine should beat plain autograd).
WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {"kind": "mlp", "batch": 256, "dim": 512, "hidden": 64},
    "conv": {"kind": "conv", "batch": 64, "channels": 16, "size": 16},
    "mlp-narrow": {"kind": "mlp", "batch": 128, "dim": 64, "hidden": 64},
}
DEFAULT_WORKLOADS = ("mlp", "conv", "mlp-narrow")
DEFAULT_DEPTHS = (16, 64, 256, 1024)
#: workloads measured at fewer depths by default (the narrow MLP only where the extension issue
#: sets its target)
DEFAULT_DEPTHS_OF = {"mlp-narrow": (256,)}
QUICK_DEPTHS = (4, 16)
#: the gradient-error study: the MLP block at a narrow width (torchdiffeq's adjoint costs
#: O(N^2 * params per block) so the full width is out of reach at depth 256 in float64)
GRAD_CONFIG = {"kind": "mlp", "batch": 64, "dim": 32, "hidden": 16}
GRAD_DEPTHS = (8, 16, 32, 64, 128, 256)
QUICK_GRAD_DEPTHS = (4, 8, 16)
#: imported once by the process server so that each measuring child starts at once (torch
#: imports some of these lazily on the first backward or checkpoint: seconds per child)
PRELOAD = (
    "torch",
    "torch.fx.experimental.symbolic_shapes",
    "torch.utils.checkpoint",
    "torch._dynamo",
    "torchdiffeq",
    "resode",
    "resode._adjoint",
)
#: skip a torchdiffeq point whose estimated step exceeds this (seconds)
TORCHDIFFEQ_STEP_LIMIT_S = 60.0


def make_block(cfg: dict[str, Any]) -> nn.Module:
    """One residual function of the workload (a plain ``nn.Sequential`` of standard layers)."""
    if cfg["kind"] == "mlp":
        return nn.Sequential(
            nn.Linear(cfg["dim"], cfg["hidden"]), nn.Tanh(), nn.Linear(cfg["hidden"], cfg["dim"])
        )
    c = cfg["channels"]
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
    )


def make_blocks(
    cfg: dict[str, Any],
    depth: int,
    *,
    seed: int = 0,
    smooth: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> nn.ModuleList:
    """``depth`` blocks with iid default-initialised weights, or weights smooth in depth.

    Smooth: every parameter tensor follows ``P(t) = P0 + sin(2 pi t) P1 + cos(pi t) P2`` at
    ``t = n / N``, with ``P0, P1, P2`` independent default initialisations (so the weights
    sample a fixed smooth curve and ``||theta_{n+1} - theta_n|| ~ 1/N``).
    """
    torch.manual_seed(seed)
    if smooth:
        basis = [make_block(cfg) for _ in range(3)]
        blocks = []
        for n in range(depth):
            t = n / depth
            coef = (1.0, math.sin(2 * math.pi * t), math.cos(math.pi * t))
            b = make_block(cfg)
            with torch.no_grad():
                for name, p in b.named_parameters():
                    src = [dict(bb.named_parameters())[name] for bb in basis]
                    p.copy_(sum(c * s for c, s in zip(coef, src)))
            blocks.append(b)
    else:
        blocks = [make_block(cfg) for _ in range(depth)]
    return nn.ModuleList(blocks).to(device=device, dtype=dtype)


def make_input(
    cfg: dict[str, Any], *, seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg["kind"] == "mlp":
        shape = (cfg["batch"], cfg["dim"])  # (B, D)
    else:
        shape = (cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])  # (B, C, H, W)
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


# --------------------------------------------------------------------------- methods
class PlainLoop(nn.Module):
    """Hand-written autograd loop: ``x <- x + f_n(x) / N``."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: Tensor) -> Tensor:
        h = 1.0 / len(self.blocks)
        for b in self.blocks:
            x = x + h * b(x)
        return x


class CheckpointLoop(PlainLoop):
    """Each block under ``torch.utils.checkpoint`` (non-reentrant): stores each block's input."""

    def forward(self, x: Tensor) -> Tensor:
        h = 1.0 / len(self.blocks)
        for b in self.blocks:
            x = x + h * checkpoint(b, x, use_reentrant=False)
        return x


class PiecewiseField(nn.Module):
    """Vector field ``f(t, x) = f_{floor(t N)}(x)`` (clamped to ``N - 1``); counts evaluations."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks
        self.evaluations = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        n = len(self.blocks)
        # the Euler grid is t_k = k / N; the small offset guards against t*N = k - ulp
        i = min(int(math.floor(float(t.detach()) * n + 1e-3)), n - 1)
        self.evaluations += 1
        return self.blocks[i](x)


class TorchdiffeqAdjoint(nn.Module):
    """``torchdiffeq.odeint_adjoint`` with fixed-step Euler, ``h = 1/N``, on ``[0, 1]``.

    Forward: exactly the Euler ResNet. Backward: the continuous adjoint ODE integrated backwards
    with the same Euler grid; its reverse step from ``t_{k+1}`` evaluates the field at
    ``t_{k+1}``, i.e. block ``k + 1`` where the forward used block ``k``, which is where its
    gradient error on a piecewise-constant network comes from.
    """

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.field = PiecewiseField(blocks)

    def forward(self, x: Tensor) -> Tensor:
        from torchdiffeq import odeint_adjoint

        n = len(self.field.blocks)
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        params = tuple(p for p in self.field.blocks.parameters() if p.requires_grad)
        ys = odeint_adjoint(
            self.field,
            x,
            t,
            method="euler",
            options={"step_size": 1.0 / n},
            adjoint_params=params,
        )  # (2, *x.shape)
        return ys[-1]


@dataclass(frozen=True)
class Method:
    key: str
    family: str  # plain | checkpoint | torchdiffeq | generic | fused
    scheme: str = "euler"
    backward: str = "autograd"

    @property
    def memory_free(self) -> bool:
        return self.backward == "adjoint" or self.family == "torchdiffeq"


METHODS: tuple[Method, ...] = (
    Method("plain", "plain"),
    Method("checkpoint", "checkpoint"),
    Method("torchdiffeq", "torchdiffeq", backward="adjoint"),
    *(
        Method(f"{fam}-{s}-{b}", fam, s, b)
        for fam in ("generic", "fused")
        for s in ("euler", "heun")
        for b in ("autograd", "adjoint")
    ),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}


class Unavailable(RuntimeError):
    """The method cannot run here (e.g. the extension is not built)."""


def fused_status(device: str = "cpu") -> str:
    """``"available"``, or why the fused engine cannot run on ``device``."""
    try:
        from resode import _ext, fused  # noqa: F401
    except ImportError as e:
        return f"not built (import failed: {e})"
    try:
        status = _ext.extension_available()
    except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
        return f"not built ({type(e).__name__}: {e})"
    ok = (
        getattr(status, torch.device(device).type, False)
        if not isinstance(status, bool)
        else (status and torch.device(device).type == "cpu")
    )
    if ok:
        return "available"
    return f"not built ({getattr(status, 'reason', 'resode._ext.extension_available() is False')})"


def build_method(method: Method, blocks: nn.ModuleList, cfg: dict[str, Any]) -> nn.Module:
    """The network of ``method`` over ``blocks`` (shared parameters, except for the fused
    engine, which copies them into its own layout with ``from_generic``)."""
    if method.family == "plain":
        return PlainLoop(blocks)
    if method.family == "checkpoint":
        return CheckpointLoop(blocks)
    if method.family == "torchdiffeq":
        return TorchdiffeqAdjoint(blocks)
    stack = resode.ResidualStack(list(blocks), scheme=method.scheme, backward=method.backward)
    if method.family == "generic":
        return stack
    device = next(blocks.parameters()).device
    status = fused_status(device.type)
    if status != "available":
        raise Unavailable(status)
    from resode import fused

    cls = fused.MLPStack if cfg["kind"] == "mlp" else fused.ConvStack
    try:
        stage = cls.from_generic(stack)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"from_generic failed: {type(e).__name__}: {e}") from e
    stage.backward = method.backward
    return stage.to(device=device)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def extra_saved_bytes(model: nn.Module) -> int:
    """Bytes a stage reports holding for backward outside ``save_for_backward`` (fused)."""
    total = 0
    for m in model.modules():
        v = getattr(m, "extra_saved_bytes", None)
        if v is None or isinstance(m, PlainLoop):
            continue
        total += int(v() if callable(v) else v)
    return total


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes kept for backward by one forward (hooks + what stages report), params excluded."""
    params = trainable(model)
    return saved_tensor_bytes(model, x, exclude=params) + extra_saved_bytes(model)


def make_train_step(model: nn.Module, x: Tensor, lr: float = 1e-4):
    """One training step: zero grads, forward, mean-square loss, backward, SGD update."""
    params = trainable(model)

    def step() -> float:
        for p in params:
            p.grad = None
        y = model(x)
        loss = y.square().mean()
        loss.backward()
        with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: seconds)
            grads = [(p, p.grad) for p in params if p.grad is not None]
            torch._foreach_add_([p for p, _ in grads], [g for _, g in grads], alpha=-lr)
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------- workers
def _setup(cfg: dict[str, Any], depth: int, device: str, seed: int = 0):
    blocks = make_blocks(cfg, depth, seed=seed, device=device)
    x = make_input(cfg, device=device)
    return blocks, x


def timing_worker(
    cfg: dict[str, Any],
    depth: int,
    keys: list[str],
    device: str,
    warmup: int,
    reps: int,
    peak: bool = False,
) -> dict[str, Any]:
    """Step times of every method at one (workload, depth), interleaved round-robin in one
    process so that load changes hit all methods alike; then activation bytes per method."""
    torch.manual_seed(0)
    blocks, x = _setup(cfg, depth, device)
    models: dict[str, nn.Module] = {}
    out: dict[str, Any] = {}
    for k in keys:
        try:
            models[k] = build_method(METHOD_BY_KEY[k], blocks, cfg)
        except Unavailable as e:
            out[k] = {"status": str(e)}
    steps = {k: make_train_step(m, x) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(warmup + reps):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            _common.synchronize(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    for k, m in models.items():
        for p in trainable(m):
            p.grad = None
        act = activation_bytes(m, x)
        out[k] = {"status": "ok", "activation_bytes": act}
        if peak:  # CUDA: the caching allocator counts tensors exactly, no fresh process needed
            out[k].update(_peak_of_step(m, steps[k], x, device))
        if times[k]:
            out[k].update(times_s=times[k], time_s=_common.median(times[k]))
    del models, steps
    base = out.get("plain", {}).get("time_s")
    for v in out.values():
        if "time_s" in v and base:
            v["time_ratio"] = v["time_s"] / base
            paired = [a / b for a, b in zip(v["times_s"], out["plain"]["times_s"])]
            v["time_ratio_paired_median"] = _common.median(paired)
    return out


def _peak_of_step(model: nn.Module, step, x: Tensor, device: str) -> dict[str, int]:
    params = trainable(model)
    for p in params:
        p.grad = None
    with _common.PeakMemory(device) as pm:
        step()
    return {
        "peak_step_bytes": pm.peak_bytes,
        "held_before_bytes": pm.before_bytes,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_bytes": sum(
            p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None
        ),
        "state_bytes": x.numel() * x.element_size(),
    }


def memory_worker(cfg: dict[str, Any], depth: int, key: str, device: str) -> dict[str, Any]:
    """Peak memory of one training step (fresh process), minus what was held before it."""
    method = METHOD_BY_KEY[key]
    torch.manual_seed(0)
    blocks, x = _setup(cfg, depth, device)
    # warm up the libraries (thread pools, kernels, autograd engine) on a 2-block copy
    small = make_blocks(cfg, 2, seed=1, device=device)
    make_train_step(build_method(method, small, cfg), x)()
    del small
    model = build_method(method, blocks, cfg)
    return _peak_of_step(model, make_train_step(model, x), x, device)


def _flat_grads(named: list[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in named
    }


def gradient_worker(
    depth: int,
    smooth: bool,
    keys: list[str],
    device: str,
    seed: int = 0,
    cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Relative gradient error (all parameters) of each method against exact autograd of the
    same scheme, in float64: ``||g - g_exact|| / ||g_exact||``."""
    torch.manual_seed(seed)
    cfg = cfg or GRAD_CONFIG
    blocks = make_blocks(cfg, depth, seed=seed, smooth=smooth, dtype=torch.float64, device=device)
    x = make_input(cfg, seed=seed + 1, dtype=torch.float64, device=device)
    target = make_input(cfg, seed=seed + 2, dtype=torch.float64, device=device)
    ref_stack = resode.ResidualStack(list(blocks))
    names = [n for n, _ in ref_stack.named_parameters()]

    def grads(model: nn.Module) -> dict[str, Tensor]:
        named = list(model.named_parameters())
        for _, p in named:
            p.grad = None
        loss = 0.5 * (model(x) - target).square().sum() / cfg["batch"]
        loss.backward()
        g = _flat_grads(named)
        for _, p in named:
            p.grad = None
        return g

    def flat(model: nn.Module, g: dict[str, Tensor]) -> Tensor:
        if isinstance(model, (PlainLoop, TorchdiffeqAdjoint)):
            return torch.cat([p.reshape(-1) for p in g.values()])
        if not isinstance(model, resode.ResidualStack) and hasattr(model, "to_generic"):
            # fused layout -> generic layout: load the gradients as weights, convert, read back
            carrier = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in carrier.named_parameters():
                    p.copy_(g[n])
            # (built under the gradients' default dtype: to_generic() creates its blocks in
            # the default dtype before copying, which would round float64 to float32)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(next(iter(g.values())).dtype)
            try:
                generic = carrier.to_generic()
            finally:
                torch.set_default_dtype(previous)
            g = {n: p.detach() for n, p in generic.named_parameters()}
        missing = [n for n in names if n not in g]
        if missing:
            raise Unavailable(f"parameter names differ from the generic stack ({missing[0]!r})")
        return torch.cat([g[n].reshape(-1) for n in names])

    refs: dict[str, Tensor] = {}
    out: dict[str, Any] = {}
    for scheme in ("euler", "heun"):
        ref = resode.ResidualStack(list(blocks), scheme=scheme, backward="autograd")
        refs[scheme] = flat(ref, grads(ref))
    for k in keys:
        method = METHOD_BY_KEY[k]
        try:
            model = build_method(method, blocks, cfg)
            g = flat(model, grads(model))
        except Exception as e:  # noqa: BLE001 - a failing method is reported, not fatal
            out[k] = {"status": f"{type(e).__name__}: {e}"}
            continue
        r = refs[method.scheme]
        out[k] = {"status": "ok", "rel_error": float((g - r).norm() / r.norm())}
    return out


# --------------------------------------------------------------------------- driver
def _estimate(prev: dict[int, float], depth: int, power: float) -> float | None:
    """Extrapolate a per-step cost from the largest smaller depth measured: ``c * N^power``."""
    smaller = [d for d in prev if d < depth and math.isfinite(prev[d])]
    if not smaller:
        return None
    d0 = max(smaller)
    return prev[d0] * (depth / d0) ** power


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    keys = [m.key for m in METHODS if args.methods is None or m.key in args.methods]
    fstatus = fused_status(device)
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "peers",
        "command": " ".join(sys.argv),
        "machine": {
            **_common.machine_info(device),
            "torch_threads": args.threads or torch.get_num_threads(),
        },
        "fused": fstatus,
        "settings": {
            "workloads": {w: WORKLOADS[w] for w in args.workloads},
            "depths": {w: list(args.depths_of[w]) for w in args.workloads},
            "warmup": args.warmup,
            "time_depths": args.time_depths,
            "peak_depths": args.peak_depths,
            "reps": args.reps,
            "methods": keys,
            "torchdiffeq_step_limit_s": TORCHDIFFEQ_STEP_LIMIT_S,
            "max_activation_gib": args.max_activation_gib,
            "grad_config": GRAD_CONFIG,
            "grad_depths": list(args.grad_depths),
            "step": "grads=None + forward + loss=mean(y^2) + backward + SGD update (lr 1e-4)",
        },
        "points": {},
        "gradient_error": {},
        "skipped": [],
    }
    pool = _common.fresh_process_pool(PRELOAD)
    n_points = sum(len(args.depths_of[w]) for w in args.workloads)
    bar = _progress(n_points * (1 + len(keys)), "time+memory")
    for w in args.workloads:
        cfg = WORKLOADS[w]
        step_s: dict[str, dict[int, float]] = {k: {} for k in keys}
        act_b: dict[str, dict[int, float]] = {k: {} for k in keys}
        for depth in args.depths_of[w]:
            point: dict[str, Any] = {}
            run_keys = []
            for k in keys:
                m = METHOD_BY_KEY[k]
                if m.family == "fused" and fstatus != "available":
                    point[k] = {"status": fstatus}
                    continue
                if m.scheme == "heun" and depth < 2:
                    continue
                est_t = _estimate(step_s[k], depth, 2.0 if m.family == "torchdiffeq" else 1.0)
                if m.family == "torchdiffeq" and est_t and est_t > TORCHDIFFEQ_STEP_LIMIT_S:
                    msg = (
                        f"skipped: estimated step {est_t:.0f} s > "
                        f"{TORCHDIFFEQ_STEP_LIMIT_S:.0f} s (N^2 from the smaller depth)"
                    )
                    point[k] = {"status": msg}
                    result["skipped"].append(f"{w} depth {depth} {k}: {msg}")
                    continue
                est_a = _estimate(act_b[k], depth, 1.0)
                if est_a and est_a > args.max_activation_gib * 2**30:
                    msg = (
                        f"skipped: estimated activations {est_a / 2**30:.1f} GiB > "
                        f"--max-activation-gib {args.max_activation_gib}"
                    )
                    point[k] = {"status": msg}
                    result["skipped"].append(f"{w} depth {depth} {k}: {msg}")
                    continue
                run_keys.append(k)
            # (a workload with its own default depths, mlp-narrow, is measured in full there)
            own = w in DEFAULT_DEPTHS_OF and args.depths is None
            timed = own or args.time_depths is None or depth in args.time_depths
            peak = own or args.peak_depths is None or depth in args.peak_depths
            if bar:
                bar.set_postfix_str(f"{w} N={depth} " + ("timing" if timed else "activations"))
            try:
                timing = _common.run_in_child(
                    pool,
                    timing_worker,
                    cfg,
                    depth,
                    run_keys,
                    device,
                    args.warmup if timed else 0,
                    args.reps if timed else 0,
                    peak and device == "cuda",
                    threads=args.threads,
                )
            except RuntimeError as e:
                timing = {k: {"status": f"timing failed: {e}"} for k in run_keys}
            point.update(timing)
            if bar:
                bar.update(1)
            for k in keys:
                v = point.get(k, {})
                if v.get("status") != "ok":
                    if bar:
                        bar.update(1)
                    continue
                if timed:
                    step_s[k][depth] = v["time_s"]
                act_b[k][depth] = v["activation_bytes"]
                if not peak or device == "cuda":  # (CUDA: measured in the timing process)
                    if bar:
                        bar.update(1)
                    continue
                if bar:
                    bar.set_postfix_str(f"{w} N={depth} memory {k}")
                try:
                    v.update(
                        _common.run_in_child(
                            pool, memory_worker, cfg, depth, k, device, threads=args.threads
                        )
                    )
                except RuntimeError as e:
                    v["memory_status"] = f"failed: {e}"
                if bar:
                    bar.update(1)
            result["points"].setdefault(w, {})[str(depth)] = point
    if bar:
        bar.close()
    # gradient error, float64
    gkeys = [k for k in keys if k != "plain" and not k.endswith("-autograd")]
    bar = _progress(2 * len(args.grad_depths), "gradient error")
    for smooth in (False, True):
        label = "smooth" if smooth else "iid"
        per_depth: dict[str, Any] = {}
        for depth in args.grad_depths:
            if bar:
                bar.set_postfix_str(f"{label} N={depth}")
            try:
                per_depth[str(depth)] = _common.run_in_child(
                    pool,
                    gradient_worker,
                    depth,
                    smooth,
                    gkeys,
                    device,
                    0,
                    GRAD_CONFIG,
                    threads=args.threads,
                )
            except RuntimeError as e:
                per_depth[str(depth)] = {k: {"status": f"failed: {e}"} for k in gkeys}
            if bar:
                bar.update(1)
        slopes = {}
        for k in gkeys:
            pts = [
                (int(d), v[k]["rel_error"])
                for d, v in per_depth.items()
                if v.get(k, {}).get("status") == "ok"
            ]
            slopes[k] = _common.loglog_slope([p[0] for p in pts], [p[1] for p in pts])
        result["gradient_error"][label] = {"per_depth": per_depth, "slopes": slopes}
    if bar:
        bar.close()
    result["targets"] = evaluate_targets(result)
    result["elapsed_s"] = time.time() - started
    return result


# --------------------------------------------------------------------------- targets
def _series(result: dict[str, Any], w: str, k: str, field: str) -> dict[int, float]:
    out = {}
    for d, point in result["points"].get(w, {}).items():
        v = point.get(k, {})
        if v.get("status") == "ok" and field in v:
            out[int(d)] = v[field]
    return out


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured numbers and met / missed / not measured."""
    rows: list[dict[str, Any]] = []

    def add(target: str, ok: bool | None, measured: str) -> None:
        status = "not measured" if ok is None else ("met" if ok else "missed")
        rows.append({"target": target, "status": status, "measured": measured})

    for w in ("mlp", "conv"):
        for k in (
            "generic-euler-adjoint",
            "generic-heun-adjoint",
            "fused-euler-adjoint",
            "fused-heun-adjoint",
        ):
            a = _series(result, w, k, "activation_bytes")
            if len(a) < 2:
                add(f"{w}: {k} activation memory flat (min vs max depth within 5%)", None, "-")
                continue
            lo, hi = min(a), max(a)
            change = a[hi] / a[lo] - 1
            add(
                f"{w}: {k} activation memory flat (depth {lo} vs {hi} within 5%)",
                abs(change) <= 0.05,
                f"{_common.human_bytes(a[lo])} -> {_common.human_bytes(a[hi])} ({change:+.1%})",
            )
    a_plain = _series(result, "conv", "plain", "activation_bytes")
    a_adj = _series(result, "conv", "generic-euler-adjoint", "activation_bytes")
    if 1024 in a_plain and 1024 in a_adj:
        add(
            "conv depth 1024: autograd ~4 GiB of activations, resode adjoint ~1 MiB",
            a_adj[1024] <= 1.1 * 2**20,
            f"plain {_common.human_bytes(a_plain[1024])}, "
            f"generic-euler-adjoint {_common.human_bytes(a_adj[1024])}",
        )
    else:
        add(
            "conv depth 1024: autograd ~4 GiB of activations, resode adjoint ~1 MiB",
            None,
            "depth 1024 not run",
        )
    for w, limit in (("mlp", 1.5), ("conv", 1.25)):
        r = _series(result, w, "generic-euler-adjoint", "time_ratio")
        add(
            f"{w}: generic Euler adjoint step <= {limit}x plain autograd at every depth",
            (max(r.values()) <= limit) if r else None,
            ", ".join(f"N={d}: {v:.2f}x" for d, v in sorted(r.items())) or "-",
        )
    for w in ("mlp", "conv"):
        r = _series(result, w, "fused-euler-adjoint", "time_ratio")
        add(
            f"{w}: fused Euler adjoint step <= 1.2x plain autograd at every depth",
            (max(r.values()) <= 1.2) if r else None,
            ", ".join(f"N={d}: {v:.2f}x" for d, v in sorted(r.items())) or "not built / not run",
        )
    r = _series(result, "mlp-narrow", "fused-euler-adjoint", "time_ratio")
    add(
        "mlp-narrow (batch 128, dim 64, hidden 64, depth 256): fused Euler adjoint < 1.0x plain",
        (max(r.values()) < 1.0) if r else None,
        ", ".join(f"N={d}: {v:.2f}x" for d, v in sorted(r.items())) or "not built / not run",
    )
    for label, k, cond, text in (
        ("iid", "generic-euler-adjoint", lambda s: -1.6 <= s <= -0.7, "about -1"),
        ("smooth", "generic-euler-adjoint", lambda s: -1.6 <= s <= -0.7, "about -1"),
        ("smooth", "generic-heun-adjoint", lambda s: s <= -2.0, "<= -2"),
        ("smooth", "fused-heun-adjoint", lambda s: s <= -2.0, "<= -2"),
    ):
        s = result["gradient_error"].get(label, {}).get("slopes", {}).get(k, math.nan)
        add(
            f"gradient-error slope, {k}, {label} weights: {text}",
            cond(s) if math.isfinite(s) else None,
            f"{s:.2f}" if math.isfinite(s) else "-",
        )
    for label in ("iid", "smooth"):
        s = result["gradient_error"].get(label, {}).get("slopes", {}).get("torchdiffeq", math.nan)
        add(
            f"torchdiffeq continuous adjoint slope, {label} weights (shown, no target)",
            None if not math.isfinite(s) else True,
            f"{s:.2f}" if math.isfinite(s) else "-",
        )
        rows[-1]["status"] = "shown" if math.isfinite(s) else "not measured"
    return rows


# --------------------------------------------------------------------------- reports
def _fmt_ratio(v: dict[str, Any]) -> str:
    return f"{v['time_ratio']:.2f}" if "time_ratio" in v else "-"


def _cell(v: dict[str, Any] | None, field: str) -> str:
    if not v:
        return ""
    if v.get("status") != "ok":
        s = v.get("status", "")
        return "not built" if s.startswith("not built") else ("skipped" if "skip" in s else "n/a")
    if field == "time_ratio":
        return _fmt_ratio(v)
    if field == "time_s":
        return f"{v['time_s']:.3g}" if "time_s" in v else "-"
    return _common.human_bytes(v.get(field))


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# resode vs peers: memory, speed and gradient error vs depth",
        "",
        f"Machine: {m['cpu']}, {m.get('affinity') or m['cpu_count']} cores, torch "
        f"{m['torch']} ({m['torch_threads']} threads), device `{m['device']}`"
        + (f" ({m.get('gpu')})" if m.get("gpu") else "")
        + ".  ",
        f"Fused engine: {result['fused']}.  Run time: {result['elapsed_s'] / 60:.1f} min.  ",
        f"Command: `{result['command']}`.  Step: {result['settings']['step']}; time = median of "
        f"{result['settings']['reps']} steps after {result['settings']['warmup']} warm-ups, "
        "methods interleaved round-robin in one process.",
        "",
    ]
    tables = (
        ("Step time, ratio to plain autograd (same process)", "time_ratio"),
        ("Step time, seconds", "time_s"),
        ("Activation memory (bytes saved for backward)", "activation_bytes"),
        ("Peak memory of one step in a fresh process, minus memory held before", "peak_step_bytes"),
    )
    for w, pts in result["points"].items():
        depths = sorted(pts, key=int)
        cfg = result["settings"]["workloads"][w]
        lines += [f"## Workload `{w}`: {cfg}", ""]
        for title, field in tables:
            lines += [
                f"**{title}**",
                "",
                "| method | " + " | ".join(f"N={d}" for d in depths) + " |",
                "|---|" + "---:|" * len(depths),
            ]
            for k in result["settings"]["methods"]:
                cells = [_cell(pts[d].get(k), field) for d in depths]
                if any(cells):
                    lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
        pg = [
            f"N={d}: params {_common.human_bytes(pts[d].get('plain', {}).get('param_bytes'))}, "
            f"grads {_common.human_bytes(pts[d].get('plain', {}).get('grad_bytes'))}"
            for d in depths
            if pts[d].get("plain", {}).get("param_bytes")
        ]
        if pg:
            lines += [
                "Parameter and gradient bytes (not in the activation column; gradients are "
                "inside the peak): " + "; ".join(pg) + ".",
                "",
            ]
    ge = result["gradient_error"]
    if ge:
        lines += [
            "## Gradient relative error vs exact autograd "
            f"(float64, {result['settings']['grad_config']})",
            "",
            "`||g - g_exact|| / ||g_exact||` over all parameters; the exact reference is "
            "autograd of the same scheme. Slope = least-squares fit of log error vs log N.",
            "",
        ]
        for label, data in ge.items():
            depths = sorted(data["per_depth"], key=int)
            keys = list(data["slopes"])
            lines += [
                f"**{label} weights**",
                "",
                "| method | " + " | ".join(f"N={d}" for d in depths) + " | slope |",
                "|---|" + "---:|" * (len(depths) + 1),
            ]
            for k in keys:
                cells = []
                for d in depths:
                    v = data["per_depth"][d].get(k, {})
                    cells.append(
                        f"{v['rel_error']:.2e}"
                        if v.get("status") == "ok"
                        else ("not built" if "not built" in v.get("status", "") else "n/a")
                    )
                s = data["slopes"][k]
                lines.append(
                    f"| {k} | " + " | ".join(cells) + f" | {s:.2f} |"
                    if math.isfinite(s)
                    else f"| {k} | " + " | ".join(cells) + " | - |"
                )
            lines.append("")
    if result["skipped"]:
        lines += ["## Skipped points", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    lines += ["## Targets", "", "| target | status | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['status']} | {t['measured']} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    workloads = [w for w in result["points"] if len(result["points"][w]) > 1] or list(
        result["points"]
    )
    keys = result["settings"]["methods"]
    styles = {k: ("-" if "adjoint" in k or k == "torchdiffeq" else "--") for k in keys}
    colors = dict(zip(keys, plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]))

    def finish(fig, name: str) -> None:
        fig.tight_layout()
        for ext in ("png", "pdf"):
            p = out / f"{name}.{ext}"
            fig.savefig(p, dpi=130)
            written.append(p)
        plt.close(fig)

    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 8), squeeze=False)
    for j, w in enumerate(workloads):
        for i, (field, title) in enumerate(
            (("activation_bytes", "activation memory"), ("peak_step_bytes", "peak step memory"))
        ):
            ax = axes[i][j]
            for k in keys:
                s = _series(result, w, k, field)
                if s:
                    d = sorted(s)
                    ax.plot(
                        d,
                        [max(s[x], 1) for x in d],
                        styles[k],
                        color=colors[k],
                        marker="o",
                        label=k,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("depth N")
            ax.set_ylabel("bytes")
            ax.set_title(f"{w}: {title}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    finish(fig, "peers_memory")

    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for j, w in enumerate(workloads):
        ax = axes[0][j]
        for k in keys:
            s = _series(result, w, k, "time_ratio")
            if s:
                d = sorted(s)
                ax.plot(d, [s[x] for x in d], styles[k], color=colors[k], marker="o", label=k)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("depth N")
        ax.set_ylabel("step time / plain autograd")
        ax.set_title(f"{w}: time ratio")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    finish(fig, "peers_time")

    ge = result["gradient_error"]
    if ge:
        fig, axes = plt.subplots(1, len(ge), figsize=(5.5 * len(ge), 4), squeeze=False)
        for j, (label, data) in enumerate(ge.items()):
            ax = axes[0][j]
            for k, slope in data["slopes"].items():
                pts = sorted(
                    (int(d), v[k]["rel_error"])
                    for d, v in data["per_depth"].items()
                    if v.get(k, {}).get("status") == "ok" and v[k]["rel_error"] > 0
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{k} (slope {slope:.2f})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("depth N")
            ax.set_ylabel("relative gradient error")
            ax.set_title(f"{label} weights (float64)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        finish(fig, "peers_gradient_error")
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"depths {QUICK_DEPTHS}, gradient depths {QUICK_GRAD_DEPTHS}, 1 warm-up, "
        "3 steps (a smoke run, not for quoting)",
    )
    p.add_argument("--depths", type=int, nargs="+", help="depths for every workload")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None)
    p.add_argument(
        "--methods",
        nargs="+",
        choices=[m.key for m in METHODS],
        default=None,
        help="subset of methods ('plain' is always added: it is the time baseline)",
    )
    p.add_argument(
        "--time-depths",
        type=int,
        nargs="+",
        default=None,
        help="time steps only at these depths (default: all); the others get activations only",
    )
    p.add_argument(
        "--peak-depths",
        type=int,
        nargs="+",
        default=None,
        help="measure the peak step memory only at these depths (default: all)",
    )
    p.add_argument("--grad-depths", type=int, nargs="+", default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument(
        "--max-activation-gib",
        type=float,
        default=8.0,
        help="skip a point whose activations, extrapolated linearly in depth from the "
        "previous depth, exceed this (protects a shared machine's RAM)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per measuring process (default: torch's default); use "
        "1 on a machine shared with other jobs, where OpenMP spin-waiting makes "
        "2-thread timings meaningless",
    )
    p.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    a = p.parse_args(argv)
    if a.workloads is None:
        a.workloads = ["mlp", "conv"] if a.quick else list(DEFAULT_WORKLOADS)
    if a.methods is not None and "plain" not in a.methods:
        a.methods = ["plain", *a.methods]
    a.depths_of = {}
    for w in a.workloads:
        if a.depths:
            a.depths_of[w] = tuple(a.depths)
        elif a.quick:
            a.depths_of[w] = QUICK_DEPTHS
        else:
            a.depths_of[w] = DEFAULT_DEPTHS_OF.get(w, DEFAULT_DEPTHS)
    a.grad_depths = a.grad_depths or (QUICK_GRAD_DEPTHS if a.quick else GRAD_DEPTHS)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.reps = a.reps if a.reps is not None else (3 if a.quick else 5)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "peers.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (args.out / "peers.md").write_text(md)
    written = plot(result, args.out)
    print(md)
    print("wrote", args.out / "peers.json", args.out / "peers.md", *map(str, written))
    return result


if __name__ == "__main__":
    main()
