"""What ``peers.py`` runs inside its measuring processes (one call = one fresh process).

* :func:`measure_method` -- one (workload, depth, method): the peak memory of one training step,
  then the activation bytes. ``peers.py`` runs it in a fresh process per method
  (``--isolate method``, the CPU default) so that every method starts from an empty allocator
  and depth 1024 fits in memory.
* :func:`measure_point` -- every method of one (workload, depth) in turn, in one process
  (``--isolate point``, the CUDA default: the caching allocator's counters are exact per method).
* :func:`time_methods` -- the step times of every method at one (workload, depth), interleaved
  round-robin in one process (run in a process with glibc's default malloc settings).
* :func:`gradient_worker` -- relative gradient error of each method against exact autograd of
  the same scheme, in float64.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
from _common import load_average, median, synchronize
from _peers_methods import (
    METHOD_BY_KEY,
    PlainLoop,
    TorchdiffeqAdjoint,
    Unavailable,
    activation_bytes,
    build_method,
    make_blocks,
    make_input,
    make_train_step,
    trainable,
)
from torch import Tensor, nn

import resode
from resode.utils import PeakMemory


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def peak_of_step(model: nn.Module, step, x: Tensor, device: str) -> dict[str, Any]:
    """Peak memory of one call of ``step`` minus the memory held before it
    (:class:`resode.utils.PeakMemory`), with the step's wall time and the sizes next to it."""
    params = trainable(model)
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    with PeakMemory(device) as pm:
        step()
        synchronize(device)
    return {
        "peak_step_bytes": pm.peak_bytes,
        "held_before_bytes": pm.before_bytes,
        "first_step_s": time.perf_counter() - t0,
        "param_bytes": _nbytes(params),
        "grad_bytes": _nbytes(p.grad for p in params),
        "state_bytes": _nbytes([x]),
    }


def _process_info(load_start: list[float] | None, started: float) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time(),  # (all threads, since the process started)
    }


def measure_method(
    cfg: dict[str, Any], depth: int, key: str, device: str, peak: bool = True
) -> dict[str, Any]:
    """Memory of one (workload, depth, method), in this process.

    In order: with ``peak``, one warm-up step on a 2-block copy (thread pools, kernels) and the
    peak memory of the first training step of the full network; then the activation bytes of
    one forward. Returns ``{"status": "ok", ...}`` or ``{"status": <why not>}``.
    """
    started, load_start = time.perf_counter(), load_average()
    method = METHOD_BY_KEY[key]
    torch.manual_seed(0)
    try:
        blocks = make_blocks(cfg, depth, device=device)
        x = make_input(cfg, device=device)
        if peak:
            small = make_blocks(cfg, 2, seed=1, device=device)
            make_train_step(build_method(method, small, cfg), x)()
            del small
        model = build_method(method, blocks, cfg)
    except Unavailable as e:
        return {"status": str(e)}
    out: dict[str, Any] = {"status": "ok"}
    if peak:
        out.update(peak_of_step(model, make_train_step(model, x), x, device))
    for p in trainable(model):
        p.grad = None
    out["activation_bytes"] = activation_bytes(model, x)
    out["process"] = _process_info(load_start, started)
    return out


def measure_point(
    cfg: dict[str, Any], depth: int, jobs: dict[str, bool], device: str
) -> dict[str, Any]:
    """:func:`measure_method` for every method of ``jobs`` (``{key: peak}``), one after the
    other, in this process (the allocator's peak counters are reset per method: exact on
    CUDA; on CPU the peaks are not fresh-process figures)."""
    out = {}
    for k, peak in jobs.items():
        try:
            out[k] = measure_method(cfg, depth, k, device, peak)
        except Exception as e:  # noqa: BLE001 - a failing method is reported, not fatal
            out[k] = {"status": f"failed: {type(e).__name__}: {e}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def time_methods(
    cfg: dict[str, Any], depth: int, keys: list[str], device: str, warmup: int, reps: int
) -> dict[str, Any]:
    """Step times of every method of ``keys`` at one (workload, depth), in this process:
    ``warmup`` rounds, then ``reps`` timed rounds, each round one step of every method in turn
    (round-robin, so that a change of the machine's load hits every method alike). Returns
    ``{key: {"times_s", "time_s"}}`` and ``"process"``."""
    started, load_start = time.perf_counter(), load_average()
    torch.manual_seed(0)
    blocks = make_blocks(cfg, depth, device=device)
    x = make_input(cfg, device=device)
    out: dict[str, Any] = {}
    steps = {}
    for k in keys:
        try:
            steps[k] = make_train_step(build_method(METHOD_BY_KEY[k], blocks, cfg), x)
        except Unavailable as e:
            out[k] = {"status": str(e)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + reps):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            synchronize(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        out[k] = {"status": "ok", "times_s": ts, "time_s": median(ts)}
    out["process"] = _process_info(load_start, started)
    return out


# --------------------------------------------------------------------------- gradient error
def _loss_grads(model: nn.Module, x: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Gradients of ``0.5 ||model(x) - target||^2 / batch`` by parameter name."""
    named = list(model.named_parameters())
    for _, p in named:
        p.grad = None
    loss = 0.5 * (model(x) - target).square().sum() / x.shape[0]
    loss.backward()
    g = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in named
    }
    for _, p in named:
        p.grad = None
    return g


def _generic_layout(model: nn.Module, g: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradients of a fused stage in the generic layout (``blocks.{n}.0.weight``, ...): loaded
    as weights into a copy of the stage, converted with ``to_generic``, read back."""
    carrier = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in carrier.named_parameters():
            p.copy_(g[n])
    # (built under the gradients' dtype: to_generic() creates its blocks in the default dtype
    # before copying, which would round float64 to float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(next(iter(g.values())).dtype)
    try:
        generic = carrier.to_generic()
    finally:
        torch.set_default_dtype(previous)
    return {n: p.detach() for n, p in generic.named_parameters()}


def _flat(model: nn.Module, g: dict[str, Tensor], names: list[str]) -> Tensor:
    """All gradients as one vector, in the order of the generic stack's ``names``."""
    if isinstance(model, (PlainLoop, TorchdiffeqAdjoint)):
        return torch.cat([p.reshape(-1) for p in g.values()])
    if not isinstance(model, resode.ResidualStack) and hasattr(model, "to_generic"):
        g = _generic_layout(model, g)
    missing = [n for n in names if n not in g]
    if missing:
        raise Unavailable(f"parameter names differ from the generic stack ({missing[0]!r})")
    return torch.cat([g[n].reshape(-1) for n in names])


def gradient_worker(
    depth: int, smooth: bool, keys: list[str], device: str, seed: int, cfg: dict[str, Any]
) -> dict[str, Any]:
    """Relative gradient error (all parameters) of each method against exact autograd of the
    same scheme, in float64: ``||g - g_exact|| / ||g_exact||``."""
    started, load_start = time.perf_counter(), load_average()
    torch.manual_seed(seed)
    f64 = {"dtype": torch.float64, "device": device}
    blocks = make_blocks(cfg, depth, seed=seed, smooth=smooth, **f64)
    x = make_input(cfg, seed=seed + 1, **f64)
    target = make_input(cfg, seed=seed + 2, **f64)
    names = [n for n, _ in resode.ResidualStack(list(blocks)).named_parameters()]
    refs: dict[str, Tensor] = {}
    for scheme in ("euler", "heun"):
        ref = resode.ResidualStack(list(blocks), scheme=scheme, backward="autograd")
        refs[scheme] = _flat(ref, _loss_grads(ref, x, target), names)
    out: dict[str, Any] = {}
    for k in keys:
        method = METHOD_BY_KEY[k]
        try:
            model = build_method(method, blocks, cfg)
            g = _flat(model, _loss_grads(model, x, target), names)
        except Exception as e:  # noqa: BLE001 - a failing method is reported, not fatal
            out[k] = {"status": f"{type(e).__name__}: {e}"}
            continue
        r = refs[method.scheme]
        out[k] = {"status": "ok", "rel_error": float((g - r).norm() / r.norm())}
    out["process"] = _process_info(load_start, started)
    return out
