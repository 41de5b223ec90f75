"""The paper's experiments, one module per id, and the reproduce-all report.

Sander, Ablin & Peyre, "Do Residual Neural Networks discretize Neural Ordinary Differential
Equations?", NeurIPS 2022. Each experiment module ends with an
:class:`~resode.reproduce.experiment.Experiment` (``EXPERIMENT``) that declares its presets,
sweeps, aggregation, figure and claims; the shared runner writes ``<out>/<id>/`` (figures as
PNG+PDF, numbers as JSON/CSV, ``provenance.json``, ``summary.json`` with the claims and their
verdicts). The logic lives here, in the package, so that the ``resode`` command works from an
installed wheel; ``experiments/<id>.py`` in the repository are one-line entries over it. See
docs/design.md, "Experiments".

Modules: :mod:`.experiment` (skeleton and runner), :mod:`.context` (settings of a run),
:mod:`.sweeps` (resumable sweeps and launchers), :mod:`.training` (training points),
:mod:`.claims`, :mod:`.figures`, :mod:`.files` (atomic JSON/CSV), :mod:`.provenance`,
:mod:`.inputs` (checks of the command's inputs), :mod:`.report` (REPORT.md).
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .claims import VERDICTS, Claim
from .experiment import Experiment
from .files import write_json
from .inputs import (
    PRESETS,
    UsageError,
    check_data_root,
    check_device,
    check_launcher,
    check_max_steps,
    check_out_dir,
    check_preset,
    check_preset_device,
    default_launcher,
)

#: experiment id -> module (in the order of the report)
EXPERIMENTS: dict[str, str] = {
    "linear-weights": "resode.reproduce.linear_weights",
    "memory": "resode.reproduce.memory",
    "reconstruction": "resode.reproduce.reconstruction",
    "tied-depth": "resode.reproduce.tied_depth",
    "adjoint-failure": "resode.reproduce.adjoint_failure",
    "heun-depth": "resode.reproduce.heun_depth",
    "gradient-error": "resode.reproduce.gradient_error",
    "untie-finetune": "resode.reproduce.untie_finetune",
}

__all__ = [
    "EXPERIMENTS",
    "PRESETS",
    "VERDICTS",
    "Claim",
    "Experiment",
    "ReproduceResult",
    "UsageError",
    "get_experiment",
    "list_experiments",
    "reproduce",
    "run_experiment",
]


def list_experiments() -> list[str]:
    return list(EXPERIMENTS)


def get_experiment(exp_id: str) -> Experiment:
    """The :class:`Experiment` of ``exp_id`` (ids as in :data:`EXPERIMENTS`)."""
    if exp_id not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {exp_id!r}; choose one of {list_experiments()}")
    return importlib.import_module(EXPERIMENTS[exp_id]).EXPERIMENT


def _check_inputs(preset, out, device, data_root, launcher, options=None):
    """Check every input once; return the device and launcher to use."""
    options = options or {}
    check_preset(preset)
    check_launcher(launcher)
    check_max_steps(options.get("max_steps"))
    nproc = options.get("nproc")
    if nproc is not None and (not isinstance(nproc, int) or nproc < 1):
        raise UsageError(f"--nproc-per-node must be a positive integer, got {nproc!r}")
    check_preset_device(preset, device)
    device = check_device(device)
    check_data_root(data_root)
    check_out_dir(out)
    return device, launcher or default_launcher(preset)


def _run_one(exp_id: str, preset: str, out, seeds, device, data_root, launcher, **kw) -> dict:
    """Run one experiment; record a failure in ``<out>/<id>/error.json`` and re-raise it."""
    err_path = Path(out) / exp_id / "error.json"
    try:
        summary = get_experiment(exp_id).run(
            preset=preset, out=out, seeds=seeds, device=device, data_root=data_root,
            launcher=launcher, **kw,
        )  # fmt: skip
    except Exception as e:
        try:
            write_json(err_path, {"preset": preset, "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()})  # fmt: skip
        except OSError:
            pass  # the folder itself cannot be written: the caller reports the error
        raise
    err_path.unlink(missing_ok=True)
    return summary


def run_experiment(
    exp_id: str,
    preset: str = "quick",
    out: str | os.PathLike = "results",
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    launcher: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run one experiment; returns its summary (also written to ``<out>/<id>/summary.json``).

    Bad inputs raise :class:`UsageError` before anything runs; ``overrides`` replace preset
    settings (``train_overrides={...}`` applies to every training section; ``max_steps=N``
    only checks that the preset runs: one epoch of ``N`` steps per training run, sweeps cut;
    ``nproc``: processes per training point under the ``torchrun`` launcher).
    """
    get_experiment(exp_id)
    device, launcher = _check_inputs(preset, out, device, data_root, launcher, overrides)
    return _run_one(exp_id, preset, out, list(seeds) if seeds else None, device, data_root,
                    launcher, **overrides)  # fmt: skip


class ReproduceResult(os.PathLike):
    """What :func:`reproduce` did: ``path`` of REPORT.md (``os.fspath`` gives it) and
    ``statuses`` (id -> ``{"ok", "wall_time_s", "error"}``); ``failed`` lists the failures."""

    def __init__(self, path: Path, statuses: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.statuses = statuses

    @property
    def failed(self) -> list[str]:
        return [e for e, s in self.statuses.items() if not s["ok"]]

    def __fspath__(self) -> str:
        return str(self.path)


def reproduce(
    preset: str = "quick",
    out: str | os.PathLike = "results",
    only: Sequence[str] | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    launcher: str | None = None,
    seeds: Sequence[int] | None = None,
    on_failure: Any = None,
    **run_options: Any,
) -> ReproduceResult:
    """Run every experiment (or ``only`` those) and write ``<out>/REPORT.md``.

    A failing experiment does not stop the others: its error goes to ``<out>/<id>/error.json``,
    ``on_failure(exp_id, exc)`` is called, and the report marks it failed. With ``only``, the
    other experiments keep their earlier sections (results of the same preset only).
    ``run_options``: ``max_steps``, ``nproc``, ``train_overrides`` (see :func:`run_experiment`).
    """
    from .report import write_report

    ids = list(only) if only else list_experiments()
    for e in ids:
        get_experiment(e)
    device, launcher = _check_inputs(preset, out, device, data_root, launcher, run_options)
    statuses: dict[str, dict[str, Any]] = {}
    for exp_id in ids:
        t0 = time.time()
        try:
            _run_one(exp_id, preset, out, list(seeds) if seeds else None, device, data_root,
                     launcher, **run_options)  # fmt: skip
            statuses[exp_id] = {"ok": True, "wall_time_s": round(time.time() - t0, 1)}
        except Exception as e:  # report it, never hide it
            statuses[exp_id] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "wall_time_s": round(time.time() - t0, 1)}  # fmt: skip
            if on_failure is not None:
                on_failure(exp_id, e)
    return ReproduceResult(write_report(out, preset, statuses), statuses)
