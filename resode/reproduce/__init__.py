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
from .inputs import PRESETS, UsageError, check_launcher, check_preset, default_launcher

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

    ``overrides`` replace preset settings (``train_overrides={...}`` applies to every training
    section).
    """
    check_preset(preset)
    check_launcher(launcher)
    return get_experiment(exp_id).run(
        preset=preset, out=out, seeds=list(seeds) if seeds else None, device=device,
        data_root=data_root, launcher=launcher or default_launcher(preset), **overrides,
    )  # fmt: skip


def reproduce(
    preset: str = "quick",
    out: str | os.PathLike = "results",
    only: Sequence[str] | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    launcher: str | None = None,
    seeds: Sequence[int] | None = None,
) -> Path:
    """Run every experiment (or ``only`` those) and write ``<out>/REPORT.md``.

    A failing experiment does not stop the others: its error is written to
    ``<out>/<id>/error.json`` and every claim of it is reported as ``not run``.
    """
    from .report import write_report

    check_preset(preset)
    ids = list(only) if only else list_experiments()
    statuses: dict[str, dict[str, Any]] = {}
    for exp_id in ids:
        t0 = time.time()
        err_path = Path(out) / exp_id / "error.json"
        try:
            run_experiment(exp_id, preset, out, seeds, device, data_root, launcher)
            err_path.unlink(missing_ok=True)
            statuses[exp_id] = {"ok": True, "wall_time_s": round(time.time() - t0, 1)}
        except Exception as e:  # report it, never hide it
            tb = traceback.format_exc()
            write_json(err_path, {"error": f"{type(e).__name__}: {e}", "traceback": tb})
            statuses[exp_id] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "wall_time_s": round(time.time() - t0, 1)}  # fmt: skip
            print(f"[resode reproduce] {exp_id} FAILED: {type(e).__name__}: {e}", flush=True)
    return write_report(out, preset, ids, statuses)
