"""The skeleton of an experiment and the runner that every experiment shares.

An experiment module (``resode/reproduce/<id>.py``) declares what is particular to it and ends
with one :class:`Experiment`::

    PRESETS = {"smoke": dict(depths=[2, 4], seeds=[0], ...), "quick": ..., "paper": ...}

    def collect(ctx):            # run the sweeps: ctx.sweep(...) / ctx.train_sweep(...)
    def aggregate(ctx, results): # numbers for summary.json; write tables with ctx.write_table
    def figure(ctx, numbers):    # a matplotlib figure (or {name: figure})
    def claims(ctx, numbers):    # [Claim(...)], each with its verdict and rule

    EXPERIMENT = Experiment("tied-depth", "Fig. 3a: ...", PRESETS, collect, aggregate, figure,
                            claims, figure_name="tied_depth", paper_dataset="cifar10")

The runner (:meth:`Experiment.run`) does the rest, the same way for every experiment: checks
the preset, merges the overrides into the preset, picks the seeds, the output folder, the
dataset and the device, calls the four hooks, saves the figure, and writes ``provenance.json``
and ``summary.json`` (``complete: true`` last). Keys of ``numbers`` that start with ``_`` are
passed to ``figure`` and ``claims`` but not written. See docs/design.md, "Experiments".
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .claims import Claim
from .context import Context
from .figures import save_figure
from .files import read_json, to_jsonable, write_json
from .inputs import UsageError, check_preset
from .provenance import provenance

#: dataset of each preset when the preset does not name one (``paper``: the experiment's own)
PRESET_DATA: dict[str, tuple[str, dict[str, Any]]] = {
    "smoke": (
        "synthetic",
        dict(num_train=512, num_test=256, in_channels=1, image_size=16, noise=2.0),
    ),  # fmt: skip
    "quick": ("fashion_mnist", {}),
    "gpu": ("fashion_mnist", {}),  # offline data: GPU machines often have no network
}
#: under ``max_steps``: every training section runs one epoch of that many steps
MAX_STEPS_TRAINING = dict(epochs=1, max_eval_batches=1)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment of the paper: its settings and its four hooks.

    Attributes:
        id, title: as listed by ``resode list``.
        presets: preset name -> settings (``seeds`` optional; ``dataset`` and ``data_kwargs``
            optional, else :data:`PRESET_DATA` / ``paper_dataset``).
        collect: ``collect(ctx) -> results``: runs the sweeps.
        aggregate: ``aggregate(ctx, results) -> numbers`` (JSON-able dict; ``_`` keys private).
        figure: ``figure(ctx, numbers) -> Figure | {name: Figure}``.
        claims: ``claims(ctx, numbers) -> list[Claim]``.
        figure_name: file name (no suffix) of a single figure.
        paper_dataset: the dataset of the paper preset; ``None`` for experiments without data.
        devices: device types the experiment can run on; on another one it runs on the CPU and
            says so.
        default_seeds: seeds when neither the command nor the preset gives them.
        sweep_keys: settings that are sweep lists, cut to their first two entries under
            ``max_steps`` (an experiment that needs another cut reads ``ctx.max_steps``).

    A preset the experiment does not declare but the command knows (``gpu``) runs the
    experiment's ``quick`` settings, and the summary says so.
    """

    id: str
    title: str
    presets: dict[str, dict[str, Any]]
    collect: Callable[[Context], Any]
    aggregate: Callable[[Context, Any], dict[str, Any]]
    figure: Callable[[Context, dict[str, Any]], Any]
    claims: Callable[[Context, dict[str, Any]], list[Claim]]
    figure_name: str
    paper_dataset: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    default_seeds: tuple[int, ...] = (0,)
    sweep_keys: tuple[str, ...] = ("depths",)

    def context(
        self,
        preset: str,
        out: str | os.PathLike,
        seeds: Sequence[int] | None,
        device: str,
        data_root: str | None,
        launcher: str,
        train_overrides: dict[str, Any] | None = None,
        max_steps: int | None = None,
        nproc: int | None = None,
        **overrides: Any,
    ) -> Context:
        """The settings of one run: preset merged with ``overrides``, seeds, folder, data;
        ``max_steps``: a run that only proves the preset works (see :class:`Context`)."""
        settings, notes = self._settings(preset)
        cfg = {**settings, **overrides}
        run_device = device
        if device.split(":")[0] not in self.devices:
            run_device = "cpu"
            notes.append(f"{self.id} runs on {'/'.join(self.devices)} only: --device {device} "
                         "not used")  # fmt: skip
        seeds = list(seeds or cfg.get("seeds") or self.default_seeds)
        train_overrides = dict(train_overrides or {})
        if max_steps is not None:
            cfg, seeds = self._cut(cfg), seeds[:1]
            cfg["max_steps"] = max_steps
            train_overrides = {**MAX_STEPS_TRAINING, "max_steps_per_epoch": max_steps,
                               **train_overrides}  # fmt: skip
            notes.append(
                f"--max-steps {max_steps}: a check that the preset runs (one epoch of "
                f"{max_steps} steps per training run, sweeps cut), not a result"
            )
        dataset, data_kwargs = None, {}
        if self.paper_dataset is not None:
            default = PRESET_DATA.get(preset, (self.paper_dataset, {}))
            dataset = cfg.get("dataset", default[0])
            data_kwargs = dict(cfg.get("data_kwargs", default[1]))
            cfg["dataset"] = dataset
        return Context(
            experiment=self.id, preset=preset, cfg=cfg, seeds=seeds,
            out_dir=Path(out) / self.id, device=run_device, device_requested=device,
            device_note="; ".join(notes) or None, data_root=data_root, launcher=launcher,
            dataset=dataset, data_kwargs=data_kwargs, train_overrides=train_overrides,
            max_steps=max_steps, nproc=nproc,
        )  # fmt: skip

    def _settings(self, preset: str) -> tuple[dict[str, Any], list[str]]:
        """The preset's settings and notes (``gpu`` falls back to ``quick``)."""
        check_preset(preset)
        if preset in self.presets:
            return dict(self.presets[preset]), []
        if preset == "gpu" and "quick" in self.presets:
            return dict(self.presets["quick"]), [f"{self.id} has no gpu settings: its quick "
                                                 "settings run on the device"]  # fmt: skip
        raise UsageError(f"{self.id} has no {preset!r} settings; choose one of "
                         f"{list(self.presets)}")  # fmt: skip

    def _cut(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` with each sweep list of :attr:`sweep_keys` cut to its first two entries."""
        return {k: (v[:2] if k in self.sweep_keys and isinstance(v, list) else v)
                for k, v in cfg.items()}  # fmt: skip

    def run(
        self,
        preset: str = "quick",
        out: str | os.PathLike = "results",
        seeds: Sequence[int] | None = None,
        device: str = "cpu",
        data_root: str | None = None,
        launcher: str = "inline",
        **overrides: Any,
    ) -> dict[str, Any]:
        """Run the experiment into ``<out>/<id>/``; return its summary (``overrides``: preset
        settings, and ``train_overrides``, ``max_steps``, ``nproc`` of :meth:`context`)."""
        t0 = time.time()
        ctx = self.context(preset, out, seeds, device, data_root, launcher, **overrides)
        if ctx.device_note:
            print(f"[resode] note: {ctx.device_note}", flush=True)
        results = self.collect(ctx)
        numbers = self.aggregate(ctx, results)
        figs = self.figure(ctx, numbers)
        for name, fig in (figs if isinstance(figs, dict) else {self.figure_name: figs}).items():
            ctx.figures += save_figure(fig, ctx.out_dir, name)
        claims = self.claims(ctx, numbers)
        public = {k: v for k, v in numbers.items() if not k.startswith("_")}
        return finish(ctx, t0, public, claims)


def _provenance_record(ctx: Context, wall: float) -> tuple[dict[str, Any], bool]:
    """``(record, kept)``: the provenance to write; ``kept`` when it is the earlier record
    because this run computed nothing new."""
    old = read_json(ctx.out_dir / "provenance.json")
    rec = provenance(
        ctx.experiment, ctx.preset, ctx.cfg, ctx.seeds, ctx.device, wall,
        device_requested=ctx.device_requested, points_computed=ctx.points_computed,
        points_reused=ctx.points_reused,
    )  # fmt: skip
    same = old is not None and all(
        to_jsonable(old.get(k)) == to_jsonable(rec[k])
        for k in ("experiment", "preset", "config", "seeds", "device")
    )
    if same and ctx.points_computed == 0 and ctx.points_reused > 0:
        return old, True  # every result was reused: keep the record of the run that made them
    if old is not None and ctx.points_reused > 0:
        keep = ("command", "git_commit", "date_utc", "wall_time_s")
        rec["reused_from"] = old.get("reused_from") or {k: old.get(k) for k in keep}
    return rec, False


def finish(ctx: Context, t0: float, numbers: dict[str, Any], claims: Sequence[Claim]) -> dict:
    """Write ``provenance.json`` and ``summary.json`` (``complete``: true); return the summary.

    A rerun that reused every sweep point keeps the earlier provenance and wall time (they
    describe the run that computed the results); a partial rerun names the earlier run under
    ``reused_from``.
    """
    prov, kept = _provenance_record(ctx, time.time() - t0)
    write_json(ctx.out_dir / "provenance.json", prov)
    summary = {
        "experiment": ctx.experiment,
        "preset": ctx.preset,
        "device": ctx.device,
        "numbers": numbers,
        "claims": [c.to_dict() for c in claims],
        "figures": list(ctx.figures),
        "tables": list(ctx.tables),
        "wall_time_s": prov["wall_time_s"],
        "complete": True,
    }
    if kept:
        summary["reused"] = True
    if ctx.device_note:
        summary["device_note"] = ctx.device_note
    if ctx.max_steps is not None:
        summary["max_steps"] = ctx.max_steps
    write_json(ctx.out_dir / "summary.json", summary)
    return summary
