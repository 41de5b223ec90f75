"""Shared helpers for the benchmarks: provenance, step timing, peak memory, fresh processes.

Nothing here runs at import time; every helper is a plain function.

* :func:`machine_info` -- provenance (CPU model, cores, threads, torch version, GPU).
* :func:`time_calls` -- median wall time of a callable after warm-ups (CUDA-synchronised).
* :class:`PeakMemory` -- peak memory of a block of code minus what was held before it:
  ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set size
  (``VmHWM``), reset through ``/proc/self/clear_refs`` (Linux) before the block.
* :func:`fresh_process_pool` -- a ``multiprocessing`` context whose children are fresh processes
  forked from a server that has only imported the heavy modules (no allocation history), with
  glibc's mmap threshold pinned so that freed tensors go back to the OS and resident-set
  measurements follow the live tensors.
* :func:`loglog_slope` -- least-squares slope of ``log y`` against ``log x``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

#: glibc: allocations above this many bytes are mmap-ed and returned to the OS when freed
#: (fixing the threshold also turns off its dynamic growth). Used in memory-measuring children.
MMAP_THRESHOLD = 64 * 1024


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Provenance of a benchmark run."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(
    fn: Callable[[], Any], device: torch.device | str, warmup: int = 2, reps: int = 5
) -> list[float]:
    """Wall times (seconds) of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


# --------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak_reset_supported() -> bool:
    """Can the peak RSS be reset (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)?"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


class PeakMemory:
    """Peak memory of the code inside ``with PeakMemory(device) as pm:``, minus the memory held
    when the block started; ``pm.peak_bytes`` after the block.

    CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` (after
    ``reset_peak_memory_stats``): tensors only, the caching allocator's reserve excluded.
    CPU: ``VmHWM - VmRSS`` with ``VmHWM`` reset to the current RSS on entry through
    ``/proc/self/clear_refs``. This counts everything the process touches (tensors, allocator
    and library workspaces), at page granularity; run it in a fresh process (see
    :func:`fresh_process_pool`) so freed memory is returned to the OS and not reused silently.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.before_bytes = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before_bytes = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before_bytes = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self.before_bytes)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fresh_process_pool(preload: Sequence[str] = ("torch",)) -> mp.context.BaseContext:
    """A ``forkserver`` context for one-point-per-process measurements.

    The server imports ``preload`` once; each child is forked from it, so it starts fresh (no
    tensors, no allocator history) in milliseconds. The server is started with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` pinned to :data:`MMAP_THRESHOLD` (children inherit it), so large
    freed buffers leave the resident set at once. The calling process's environment is left
    unchanged. Falls back to ``spawn`` where ``forkserver`` is unavailable.
    """
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(list(preload))
    with _env(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)):
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return ctx


def _child(conn, fn, args, threads) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # report everything, the parent decides
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_in_child(
    ctx: mp.context.BaseContext,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    threads: int | None = None,
) -> Any:
    """Run ``fn(*args)`` in a new child of ``ctx`` (with ``threads`` intra-op threads if given);
    return its result or raise RuntimeError."""
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args, threads))
    p.start()
    child.close()
    try:
        if not parent.poll(timeout):
            p.kill()
            raise RuntimeError(f"timed out after {timeout} s")
        status, value = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"child died (exit code {p.exitcode})") from None
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(value)
    return value


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` vs ``log x`` over the finite, positive points."""
    pts = [
        (math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)
    ]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx if sxx > 0 else math.nan


def human_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None``/NaN -> ``'-'``."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"
