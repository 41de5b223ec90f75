"""Small helpers used across resode, its experiments, benchmarks and tests (one place each).

* :func:`seed_everything` -- seed python, numpy and torch (CPU and CUDA).
* :func:`resolve_device` -- a device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) checked
  against what this machine has.
* :func:`loglog_slope` -- least-squares slope of ``log y`` against ``log x`` (convergence orders).
* :class:`PeakMemory` -- peak memory of a block of code (CUDA allocator, or the process's
  resident set on CPU); :func:`peak_memory` -- the peak since the process (or the last CUDA
  reset) started; :func:`fresh_process_pool` / :func:`run_in_child` -- one measurement per
  fresh process.
* :func:`environ` -- environment variables set for a block, restored after.

Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

#: glibc: allocations above this many bytes are mmap-ed and returned to the OS when freed
#: (fixing the threshold also turns off its dynamic growth). Used in memory-measuring children.
MMAP_THRESHOLD = 64 * 1024


# ----------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- devices
def resolve_device(name: str | torch.device | None = "auto", local_rank: int | None = None):
    """The ``torch.device`` for ``name``.

    ``"auto"`` (or ``None``) is CUDA when a GPU is visible, else the CPU. A CUDA device without
    an index gets ``local_rank`` (the process's GPU under ``torchrun``), else 0. Raises
    ``RuntimeError`` when CUDA is asked for and no GPU is visible.
    """
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(name)!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if local_rank is not None else 0)
    return dev


# ----------------------------------------------------------------------------- fits
def loglog_slope(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` over the finite, positive points
    (``nan`` when fewer than two remain)."""
    pts = [
        (math.log(x), math.log(y))
        for x, y in zip(xs, ys)
        if x is not None and y is not None and x > 0 and y > 0 and math.isfinite(y)
    ]
    if len(pts) < 2:
        return math.nan
    a = np.array(pts)
    if np.ptp(a[:, 0]) == 0:
        return math.nan
    return float(np.polyfit(a[:, 0], a[:, 1], 1)[0])


# ----------------------------------------------------------------------------- memory
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


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """``(bytes, kind)``: the CUDA allocator's peak (since the last reset) on CUDA, else the
    process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"
    except ImportError:  # pragma: no cover - not on Windows
        return 0, "unknown"


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
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block, restoring (or removing) them after."""
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


def fresh_process_pool(
    preload: Sequence[str] = ("torch",), pin_mmap_threshold: bool = True
) -> mp.context.BaseContext:
    """A ``forkserver`` context for one-point-per-process measurements.

    The server imports ``preload`` once; each child is forked from it, so it starts fresh (no
    tensors, no allocator history) in milliseconds. With ``pin_mmap_threshold`` the server is
    started with glibc's ``MALLOC_MMAP_THRESHOLD_`` pinned to :data:`MMAP_THRESHOLD` (children
    inherit it), so large freed buffers leave the resident set at once. The calling process's
    environment is left unchanged. Python has one forkserver per process: when it is already
    running with the other mmap setting, it is restarted with the one asked for. Falls back to
    ``spawn`` where ``forkserver`` is unavailable.
    """
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    from multiprocessing import forkserver

    want = str(MMAP_THRESHOLD) if pin_mmap_threshold else os.environ.get("MALLOC_MMAP_THRESHOLD_")
    ctx.set_forkserver_preload(list(preload))
    server = forkserver._forkserver
    if server._forkserver_pid is not None and run_in_child(ctx, _mmap_threshold_env) != want:
        server._stop()  # started earlier with the other setting (its children inherit it)
    env = {"MALLOC_MMAP_THRESHOLD_": want} if pin_mmap_threshold else {}
    with environ(**env):
        forkserver.ensure_running()
    return ctx


def _mmap_threshold_env() -> str | None:
    """``MALLOC_MMAP_THRESHOLD_`` as a child of the forkserver sees it."""
    return os.environ.get("MALLOC_MMAP_THRESHOLD_")


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
