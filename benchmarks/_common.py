"""Helpers shared by the benchmark scripts: provenance, step timing, formatting, output files.

Peak memory, fresh measuring processes and log-log slopes are library helpers
(:mod:`resode.utils`: ``PeakMemory``, ``fresh_process_pool``, ``run_in_child``,
``loglog_slope``); this module only holds what is specific to the benchmarks. Nothing here runs
at import time.

* :func:`machine_info` -- provenance (CPU model, cores, threads, load, torch version, GPU).
* :func:`time_calls` -- wall times of a callable after warm-ups (CUDA-synchronised).
* :func:`human_bytes` -- ``1536 -> '1.5 KiB'``.
* :func:`progress` -- a tqdm bar on stderr (``None`` without tqdm).
* :func:`write_json_md` -- ``<stem>.json`` and ``<stem>.md`` in an output folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (``None`` where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Provenance of a benchmark run."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "loadavg_at_start": load_average(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
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
    """The median (``nan`` for no values)."""
    return float(statistics.median(xs)) if xs else math.nan


def human_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None``/NaN -> ``'-'``."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def progress(total: int, desc: str):
    """A tqdm progress bar on stderr, or ``None`` when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def write_json_md(out: Path, stem: str, data: dict[str, Any], md: str) -> list[Path]:
    """Write ``out/<stem>.json`` (``data``) and ``out/<stem>.md`` (``md``); return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(data, indent=1))
    paths[1].write_text(md)
    return paths
