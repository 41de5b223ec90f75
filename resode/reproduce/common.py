"""Shared infrastructure of the paper's experiments: presets, provenance, figures, sweeps, claims.

Every experiment (one module per id in :mod:`resode.reproduce`) writes ``<out>/<id>/``:

* ``summary.json`` -- the numbers, the claims with verdicts, and ``"complete": true`` last;
* ``provenance.json`` -- config, seeds, torch version, device, extension, wall time, git commit;
* figures as PNG and PDF (:func:`save_figure`);
* ``runs/<key>.json`` -- one file per point of a sweep, so an interrupted sweep resumes
  (:func:`run_sweep` skips points whose file is present and complete).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
LAUNCHERS: tuple[str, ...] = ("inline", "local", "slurm")
VERDICTS: tuple[str, ...] = ("reproduced", "not reproduced", "partial", "not run")
DEFAULT_OUT = "results"


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    return preset


def default_launcher(preset: str) -> str:
    """``inline`` (one process, fast, used by CI) for smoke/quick; submitit ``local`` for paper."""
    return "local" if preset == "paper" else "inline"


# ----------------------------------------------------------------------------- claims
@dataclasses.dataclass
class Claim:
    """One claim of the paper with the evidence measured here.

    Attributes:
        key: short id (unique inside an experiment).
        text: the paper's claim, in words.
        evidence: what was measured, with numbers (a sentence).
        value: the headline number (``None`` when not run).
        verdict: one of :data:`VERDICTS`.
    """

    key: str
    text: str
    evidence: str
    value: float | None
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.value is not None and not math.isfinite(float(self.value)):
            # a non-finite headline number can never be a reproduction
            self.value = float(self.value)
            if self.verdict == "reproduced":
                self.verdict = "not reproduced"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "not run"
    return "reproduced" if ok else "not reproduced"


# ----------------------------------------------------------------------------- files
def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (temp file + rename); NaN/inf are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_nan_to_none(obj), indent=2, default=_default, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return path


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def read_complete(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON at ``path`` if it exists, parses and says ``"complete": true``; else ``None``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("complete") is not True:
        return None
    return data


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows (dicts with the same keys) as CSV."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


# ----------------------------------------------------------------------------- provenance
def git_commit() -> str | None:
    """The commit of the checkout holding this package, if any (``+dirty`` when modified)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
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


# ----------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- figures
def save_figure(fig: Any, out_dir: str | os.PathLike, name: str) -> list[str]:
    """Save a matplotlib figure as ``<name>.png`` (150 dpi) and ``<name>.pdf``; close it."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig.tight_layout()
    for ext in ("png", "pdf"):
        p = out_dir / f"{name}.{ext}"
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p.name)
    plt.close(fig)
    return paths


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- fits
def loglog_slope(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (points with ``y <= 0`` dropped)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    pts = [(a, b) for a, b in pts if math.isfinite(b)]
    if len(pts) < 2:
        return math.nan
    a = np.array(pts)
    return float(np.polyfit(a[:, 0], a[:, 1], 1)[0])


# ----------------------------------------------------------------------------- sweeps
def _run_job(fn: Callable[..., dict[str, Any]], path: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one sweep point and write its result file (``complete`` set last)."""
    t0 = time.time()
    result = dict(fn(**job))
    result.setdefault("job", job)
    result["wall_time_s"] = round(time.time() - t0, 3)
    result["complete"] = True
    write_json(path, result)
    return result


def file_stamp(path: str | os.PathLike | None) -> float | None:
    """Modification time of ``path`` (``None`` if absent): put it in a sweep job that reads the
    file (e.g. a checkpoint), so the point reruns when the file is rewritten."""
    return os.path.getmtime(path) if path and os.path.exists(path) else None


def _same_job(stored: Any, job: dict[str, Any]) -> bool:
    return stored == json.loads(json.dumps(_nan_to_none(job), default=_default))


def run_sweep(
    fn: Callable[..., dict[str, Any]],
    jobs: Sequence[dict[str, Any]],
    run_dir: str | os.PathLike,
    key: Callable[[dict[str, Any]], str],
    launcher: str = "inline",
    desc: str = "sweep",
    parallel: int = 1,
    slurm: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn(**job)`` for every job, skipping the ones already finished; return all results.

    Args:
        fn: a module-level function (picklable, for submitit) returning a JSON-able dict.
        jobs: the points of the sweep (keyword arguments of ``fn``).
        run_dir: where ``<key(job)>.json`` result files live.
        key: file name of a job's result (unique per job).
        launcher: ``"inline"`` (this process, in order), ``"local"`` (submitit's local
            executor: one subprocess per job, at most ``parallel`` at a time) or ``"slurm"``
            (submitit on a Slurm cluster, ``slurm`` holds the executor parameters).
        parallel: concurrent jobs for the local/slurm launchers.

    A job whose file exists with ``"complete": true`` and the same arguments is not run again,
    so an interrupted sweep resumes where it stopped (changed arguments rerun the point).
    """
    from tqdm.auto import tqdm

    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {list(LAUNCHERS)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = [run_dir / f"{key(j)}.json" for j in jobs]
    if len(set(paths)) != len(paths):
        raise ValueError("sweep keys are not unique")
    # a finished point is reused only if it was run with exactly these arguments
    results: list[dict[str, Any] | None] = [
        r if r is not None and _same_job(r.get("job"), j) else None
        for r, j in zip((read_complete(p) for p in paths), jobs)
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    skipped = len(jobs) - len(todo)
    bar = tqdm(total=len(jobs), initial=skipped, desc=desc, leave=False, dynamic_ncols=True)
    if launcher == "inline":
        for i in todo:
            results[i] = _run_job(fn, str(paths[i]), jobs[i])
            bar.update(1)
    else:
        import submitit

        folder = run_dir / "submitit" / "%j"
        if launcher == "local":
            ex = submitit.AutoExecutor(folder=folder, cluster="local")
            ex.update_parameters(timeout_min=(slurm or {}).get("timeout_min", 24 * 60))
        else:
            ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
            params = {"timeout_min": 24 * 60, "slurm_array_parallelism": max(parallel, 1)}
            params.update(slurm or {})
            ex.update_parameters(**params)
        if launcher == "slurm":
            with ex.batch():
                submitted = [(i, ex.submit(_run_job, fn, str(paths[i]), jobs[i])) for i in todo]
            for i, job in submitted:
                results[i] = job.result()
                bar.update(1)
        else:
            # the local executor starts every submitted job at once: throttle to `parallel`
            pending = list(todo)
            while pending:
                chunk, pending = pending[: max(parallel, 1)], pending[max(parallel, 1) :]
                running = [(i, ex.submit(_run_job, fn, str(paths[i]), jobs[i])) for i in chunk]
                for i, job in running:
                    results[i] = job.result()
                    bar.update(1)
    bar.close()
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- summary
def finish(
    out_dir: Path,
    experiment: str,
    preset: str,
    config: dict[str, Any],
    seeds: Sequence[int],
    device: str,
    t0: float,
    numbers: dict[str, Any],
    claims: Sequence[Claim],
    figures: Sequence[str],
    tables: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``provenance.json`` and ``summary.json`` (``complete``: true); return the summary."""
    wall = time.time() - t0
    prov = provenance(experiment, preset, config, seeds, device, wall)
    write_json(out_dir / "provenance.json", prov)
    summary = {
        "experiment": experiment,
        "preset": preset,
        "numbers": numbers,
        "claims": [c.to_dict() for c in claims],
        "figures": list(figures),
        "tables": list(tables),
        "wall_time_s": round(wall, 3),
        "complete": True,
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
