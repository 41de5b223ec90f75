"""Where a result came from: code version, command, machine, library versions, seeds, wall time.

Written to ``<out>/<id>/provenance.json`` by the runner (:mod:`resode.reproduce.experiment`).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """The commit of the checkout holding this package, if any (``+dirty`` when modified)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def extension_info() -> dict[str, Any]:
    """Whether the compiled extension ``resode._C`` is loaded (CPU / CUDA kernels)."""
    try:
        from resode._ext import extension_available
    except Exception as e:  # the extension module itself is missing
        return {"cpu": False, "cuda": False, "note": f"resode._ext unavailable: {e}"}
    try:
        st = extension_available()
        return {"cpu": bool(st.cpu), "cuda": bool(st.cuda), "source": st.source,
                "reason": st.reason}  # fmt: skip
    except Exception as e:  # report, never fail a run on provenance
        return {"cpu": False, "cuda": False, "note": f"{type(e).__name__}: {e}"}


def hardware() -> dict[str, Any]:
    """CPU model and count, torch threads, and the visible GPUs."""
    hw: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def provenance(
    experiment: str,
    preset: str,
    config: dict[str, Any],
    seeds: Sequence[int],
    device: str,
    wall_time_s: float,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance record of one experiment run (``extra`` keys are added as they are)."""
    import resode

    return {
        "experiment": experiment,
        "preset": preset,
        "config": config,
        "seeds": list(seeds),
        "device": device,
        "wall_time_s": round(wall_time_s, 3),
        "resode_version": getattr(resode, "__version__", None),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hardware": hardware(),
        "extension": extension_info(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
