"""Sweeps: run a function over a list of points, one result file per point, resumable.

:func:`run_sweep` writes ``<run_dir>/<key>.json`` for every point (``"complete": true`` last) and
skips a point whose file is complete and was made with the same arguments, so an interrupted
sweep resumes where it stopped. Points run in this process (``inline``), in submitit
subprocesses (``local``), on a Slurm cluster (``slurm``), or each under
``torchrun --nproc_per_node=<n>`` (``torchrun``: data-parallel training points, one process per
GPU; :func:`resode.train.train` joins the process group by itself, rank 0 writes the result).
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .files import read_complete, read_json, to_jsonable, write_json

LAUNCHERS: tuple[str, ...] = ("inline", "local", "slurm", "torchrun")

Job = dict[str, Any]


class SweepPointError(RuntimeError):
    """A point of a sweep failed; the message names the point and the folder of its files."""


class SweepResults(list):
    """The results of a sweep, in job order; ``ran`` points were computed now, ``reused`` read
    from the files of an earlier run."""

    def __init__(self, results: Sequence[dict[str, Any]], ran: int, reused: int) -> None:
        super().__init__(results)
        self.ran = ran
        self.reused = reused


def file_stamp(path: str | os.PathLike | None) -> float | None:
    """Modification time of ``path`` (``None`` if absent): put it in a sweep job that reads the
    file (e.g. a checkpoint), so the point reruns when the file is rewritten."""
    return os.path.getmtime(path) if path and os.path.exists(path) else None


def _run_job(fn: Callable[..., dict[str, Any]], path: str, job: Job) -> dict[str, Any]:
    """Run one sweep point and write its result file (``complete`` set last)."""
    t0 = time.time()
    try:
        result = dict(fn(**job))
    except Exception as e:
        folder = job.get("run_dir") or Path(path).parent
        raise SweepPointError(
            f"point {Path(path).stem} (files in {folder}) failed: {type(e).__name__}: {e}"
        ) from e
    result.setdefault("job", job)
    result["wall_time_s"] = round(time.time() - t0, 3)
    result["complete"] = True
    write_json(path, result)
    return result


def _stored(path: Path, job: Job, validate, desc: str) -> dict[str, Any] | None:
    """The finished result of ``job`` at ``path`` if it can be reused, else ``None``."""
    r = read_complete(path)
    if r is None or r.get("job") != to_jsonable(job):
        return None  # not run, interrupted, or run with other arguments
    why = validate(r) if validate is not None else None
    if why:
        print(f"[resode] {desc}: rerunning point {path.stem}: {why}", flush=True)
        return None
    return r


def _executor(launcher: str, run_dir: Path, parallel: int, slurm: dict[str, Any] | None):
    import submitit

    folder = run_dir / "submitit" / "%j"
    params: dict[str, Any] = {"timeout_min": 24 * 60}
    if launcher == "slurm":
        params["slurm_array_parallelism"] = max(parallel, 1)
    params.update(slurm or {})
    if launcher == "local":
        params = {"timeout_min": params["timeout_min"]}
    ex = submitit.AutoExecutor(folder=folder, cluster=launcher)
    ex.update_parameters(**params)
    return ex


def torchrun_nproc(device: str | None, nproc: int | None = None) -> int:
    """Processes per point under the ``torchrun`` launcher: ``nproc`` if given, else the number
    of visible GPUs for a CUDA ``device``, else 1."""
    if nproc is not None:
        if not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
        return nproc
    import torch

    cuda = str(device or "").startswith("cuda") and torch.cuda.is_available()
    return max(torch.cuda.device_count(), 1) if cuda else 1


_WORKER = (
    "import sys; from resode.reproduce.sweeps import torchrun_worker; "
    "sys.exit(torchrun_worker(sys.argv[1:]))"
)


def torchrun_worker(argv: Sequence[str]) -> int:
    """One process of a ``torchrun`` point: ``argv = [spec.pkl, result.json]``; runs the pickled
    ``fn(**job)`` (on GPU ``LOCAL_RANK`` for a CUDA job) and, on rank 0, writes its result."""
    import torch

    spec, out = argv
    with open(spec, "rb") as f:
        fn, job = pickle.load(f)
    if str(job.get("device", "")).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    result = fn(**job)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(out, to_jsonable(result))
    return 0


def _torchrun_call(fn: Callable[..., dict[str, Any]], log: str, nproc: int, **job: Any) -> dict:
    """``fn(**job)`` in ``nproc`` processes under ``torchrun --standalone``; its output goes to
    ``log``; a failure raises with the last lines of the log."""
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds the resode package
    with tempfile.TemporaryDirectory(prefix="resode-torchrun-") as tmp:
        spec, out = Path(tmp) / "job.pkl", Path(tmp) / "result.json"
        with open(spec, "wb") as f:
            pickle.dump((fn, job), f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "--no-python", sys.executable, "-c", _WORKER,
               str(spec), str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        result = read_json(out)
        if rc != 0 or result is None:
            tail = " | ".join(Path(log).read_text().strip().splitlines()[-3:])
            raise RuntimeError(f"torchrun ({nproc} processes) exited with status {rc}; log "
                               f"{log}: {tail}")  # fmt: skip
        return result


def _launch(fn, todo: list[tuple[int, str, Job]], launcher, run_dir, parallel, slurm, done,
            nproc: int | None = None):  # fmt: skip
    """Run the ``(index, path, job)`` points of ``todo``; call ``done(index, result)`` for each."""
    if launcher == "torchrun":
        for i, path, job in todo:
            n = torchrun_nproc(job.get("device"), nproc)
            log = str(Path(path).with_suffix(".torchrun.log"))
            call = fn if n == 1 else functools.partial(_torchrun_call, fn, log, n)
            done(i, _run_job(call, path, job))
        return
    if launcher == "inline":
        for i, path, job in todo:
            done(i, _run_job(fn, path, job))
        return
    ex = _executor(launcher, run_dir, parallel, slurm)
    if launcher == "slurm":
        with ex.batch():
            submitted = [(i, ex.submit(_run_job, fn, path, job)) for i, path, job in todo]
        for i, sj in submitted:
            done(i, sj.result())
        return
    step = max(parallel, 1)  # the local executor starts every submitted job at once: throttle
    for start in range(0, len(todo), step):
        running = [(i, ex.submit(_run_job, fn, p, j)) for i, p, j in todo[start : start + step]]
        for i, sj in running:
            done(i, sj.result())


def run_sweep(
    fn: Callable[..., dict[str, Any]],
    jobs: Sequence[Job],
    run_dir: str | os.PathLike,
    key: Callable[[Job], str],
    launcher: str = "inline",
    desc: str = "sweep",
    parallel: int = 1,
    slurm: dict[str, Any] | None = None,
    validate: Callable[[dict[str, Any]], str | None] | None = None,
    nproc: int | None = None,
) -> SweepResults:
    """Run ``fn(**job)`` for every job, skipping the ones already finished; return all results.

    Args:
        fn: a module-level function (picklable, for submitit) returning a JSON-able dict.
        jobs: the points of the sweep (keyword arguments of ``fn``).
        run_dir: where ``<key(job)>.json`` result files live.
        key: file name of a job's result (unique per job).
        launcher: ``"inline"`` (this process, in order), ``"local"`` (submitit's local
            executor: one subprocess per job, at most ``parallel`` at a time), ``"slurm"``
            (submitit on a Slurm cluster, ``slurm`` holds the executor parameters) or
            ``"torchrun"`` (each point, in order, in ``nproc`` processes under ``torchrun``:
            for functions that train with :func:`resode.train.train`, which runs data-parallel
            there; with one process the point runs inline).
        nproc: processes per point for ``torchrun`` (default :func:`torchrun_nproc`).
        parallel: concurrent jobs for the local/slurm launchers.
        validate: called on a finished result before it is reused; a returned reason (e.g.
            "its checkpoint is unreadable") reruns the point and is printed.

    A point whose file is complete and holds the same arguments is not run again; a failing
    point raises :class:`SweepPointError` naming it.
    """
    from tqdm.auto import tqdm

    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {list(LAUNCHERS)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = [run_dir / f"{key(j)}.json" for j in jobs]
    if len(set(paths)) != len(paths):
        raise ValueError("sweep keys are not unique")
    results = [_stored(p, j, validate, desc) for p, j in zip(paths, jobs)]
    todo = [(i, str(paths[i]), jobs[i]) for i, r in enumerate(results) if r is None]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, leave=False,
               dynamic_ncols=True)  # fmt: skip

    def done(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        bar.update(1)

    try:
        _launch(fn, todo, launcher, run_dir, parallel, slurm, done, nproc)
    finally:
        bar.close()
    return SweepResults(results, ran=len(todo), reused=len(jobs) - len(todo))
