"""Sweeps: run a function over a list of points, one result file per point, resumable.

:func:`run_sweep` writes ``<run_dir>/<key>.json`` for every point (``"complete": true`` last) and
skips a point whose file is complete and was made with the same arguments, so an interrupted
sweep resumes where it stopped. Points run in this process (``inline``), in submitit
subprocesses (``local``) or on a Slurm cluster (``slurm``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .files import read_complete, to_jsonable, write_json

LAUNCHERS: tuple[str, ...] = ("inline", "local", "slurm")

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


def _launch(fn, todo: list[tuple[int, str, Job]], launcher, run_dir, parallel, slurm, done):
    """Run the ``(index, path, job)`` points of ``todo``; call ``done(index, result)`` for each."""
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
) -> SweepResults:
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
        _launch(fn, todo, launcher, run_dir, parallel, slurm, done)
    finally:
        bar.close()
    return SweepResults(results, ran=len(todo), reused=len(jobs) - len(todo))
