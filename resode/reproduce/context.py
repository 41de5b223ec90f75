"""The settings of one experiment run, handed to every hook of an experiment."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .files import write_csv
from .sweeps import Job, SweepResults, run_sweep


@dataclasses.dataclass
class Context:
    """One run of one experiment (made by :meth:`Experiment.context`).

    Attributes:
        experiment, preset: ids.
        cfg: the preset's settings merged with the caller's overrides (recorded in provenance).
        seeds: the seeds to run (command line, else the preset's, else the experiment's).
        out_dir: ``<out>/<id>``.
        device: where the experiment runs; ``device_requested`` what was asked for, and
            ``device_note`` why they differ (``None`` when they do not).
        data_root, dataset, data_kwargs: the data (``dataset`` is ``None`` without data).
        launcher: the sweep launcher (see :func:`resode.reproduce.sweeps.run_sweep`); with
            ``torchrun`` only training sweeps run under torchrun, the others inline.
        nproc: processes per training point under ``torchrun`` (``None``: one per GPU).
        train_overrides: training settings applied over every training section of the preset
            (e.g. ``{"max_steps_per_epoch": 2}`` to prove a preset runs end to end).
        max_steps: set by ``--max-steps N`` (``None`` otherwise): the run only proves that the
            preset starts, checkpoints and resumes (one epoch of ``N`` steps per training run,
            sweeps cut); experiments with loops of their own cap them too.
        figures, tables: files written so far (the tables listed in the report).
        points_computed, points_reused: sweep points run now / reused from an earlier run.
    """

    experiment: str
    preset: str
    cfg: dict[str, Any]
    seeds: list[int]
    out_dir: Path
    device: str
    device_requested: str
    device_note: str | None
    data_root: str | None
    launcher: str
    dataset: str | None
    data_kwargs: dict[str, Any]
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_steps: int | None = None
    nproc: int | None = None
    figures: list[str] = dataclasses.field(default_factory=list)
    tables: list[str] = dataclasses.field(default_factory=list)
    points_computed: int = 0
    points_reused: int = 0

    @property
    def seed(self) -> int:
        """The first seed (experiments that run one seed)."""
        return self.seeds[0]

    @property
    def data(self) -> dict[str, Any]:
        """``dataset``, ``data_kwargs`` and ``data_root`` as keyword arguments of a sweep job."""
        return dict(dataset=self.dataset, data_kwargs=self.data_kwargs, data_root=self.data_root)

    def sweep(
        self,
        fn: Callable[..., dict[str, Any]],
        jobs: Sequence[Job],
        key: Callable[[Job], str],
        folder: str = "runs",
        desc: str | None = None,
        launcher: str | None = None,
        validate: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> SweepResults:
        """:func:`run_sweep` of ``fn`` over ``jobs`` with result files in ``out_dir/folder``
        (launcher: ``launcher``, else the run's, ``inline`` for ``torchrun``)."""
        if launcher is None:
            launcher = "inline" if self.launcher == "torchrun" else self.launcher
        res = run_sweep(
            fn, jobs, self.out_dir / folder, key=key, launcher=launcher,
            desc=self.experiment + (f": {desc}" if desc else ""), validate=validate,
            nproc=self.nproc,
        )  # fmt: skip
        self.points_computed += res.ran
        self.points_reused += res.reused
        return res

    def training(self, settings: dict[str, Any]) -> dict[str, Any]:
        """A training section of the preset with :attr:`train_overrides` applied."""
        return {**settings, **self.train_overrides}

    def train_job(
        self,
        name: str,
        model: str,
        model_kwargs: dict[str, Any],
        settings: dict[str, Any],
        seed: int,
        folder: str = "runs",
        **extra: Any,
    ) -> Job:
        """A point of a training sweep (:func:`resode.reproduce.training.train_run`) that trains
        in ``out_dir/folder/name`` with the training ``settings`` of the preset."""
        return dict(run_dir=str(self.out_dir / folder / name), model=model,
                    model_kwargs=model_kwargs, **self.data, device=self.device, seed=seed,
                    **extra, **self.training(settings))  # fmt: skip

    def train_sweep(
        self, jobs: Sequence[Job], folder: str = "runs", desc: str | None = None, fn=None
    ) -> SweepResults:
        """Run training jobs (:meth:`train_job`; data-parallel under the ``torchrun``
        launcher); a finished run whose checkpoint cannot be read is trained again (the folder
        is named)."""
        from .training import checkpoint_problem, train_run

        return self.sweep(fn or train_run, jobs, key=lambda j: Path(j["run_dir"]).name,
                          folder=folder, desc=desc, validate=checkpoint_problem,
                          launcher=self.launcher)  # fmt: skip

    def write_table(self, name: str, rows: Sequence[dict[str, Any]], report: bool = True) -> None:
        """Write ``out_dir/name`` as CSV; ``report``: list it in the summary and the report."""
        write_csv(self.out_dir / name, rows)
        if report:
            self.tables.append(name)
