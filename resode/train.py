"""One training loop for every experiment: single process, or data-parallel under ``torchrun``.

    from resode.train import TrainConfig, train
    result = train(TrainConfig(model="tiny_resnet", model_kwargs=dict(depth=16),
                               dataset="fashion_mnist", epochs=1, out_dir="results/x"))
    result["best_test_acc"]

* SGD with momentum and weight decay; a learning-rate multiplier for the parameters of the
  residual stages (``stage_lr_mult``; ``"depth"`` scales each stage by its number of residual
  functions, the paper's "adaptive" option); schedules ``cosine``, ``step`` (x ``gamma`` every
  ``step_size`` epochs), ``multistep`` (x ``gamma`` at each of ``milestones``) and
  ``constant``, with optional linear warm-up; all applied per iteration.
* ``trainable``: train only some modules (e.g. ``["layer3"]`` for Table 2's fine-tuning).
* Seeding of python, numpy, torch and CUDA; the data order is a function of (seed, epoch).
  The same config gives bitwise-identical results twice on the CPU, in one process or in two,
  when the number of intra-op threads is the same (``num_threads`` fixes it for the run).
* bfloat16 autocast on CUDA (``bf16``), ``torch.compile`` (``compile``).
* Every epoch: metrics (losses, accuracies, time, peak memory, and for stages with a
  reconstruction backward the worst drift ``worst_drift`` and the number of ``backward="auto"``
  fallbacks ``auto_fallbacks``) appended to ``<out_dir>/metrics.jsonl`` and a checkpoint written
  atomically to ``<out_dir>/checkpoint.pt`` (:mod:`resode.checkpoint`: model config + train
  config + model, optimizer, scheduler and RNG states). ``resume=True`` continues from it and
  ends in the same state as an uninterrupted run (bitwise on CPU). A resume whose config changes
  the run (model, data, seed, optimiser, schedule...) is refused; see :func:`resume_changes`.
* Under ``torchrun`` the model is wrapped in DistributedDataParallel, every rank takes a slice
  of each global batch (``batch_size`` is the global batch), rank 0 logs and checkpoints.

The loop (:class:`_Run`): setup (data, model, loaders, optimiser), resume (or broadcast the
initial weights), then one loop over epochs, each followed by its record and checkpoint. See
docs/design.md, "Models and training".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    ResumeMismatchError,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    rng_state,
    set_rng_state,
)
from .data import Data, get_dataset
from .models import ModelConfig, create, get_config, unwrap
from .stack import Stage, stages
from .utils import peak_memory, resolve_device, seed_everything

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHANGEABLE_FIELDS",
    "CheckpointError",
    "RUN_FIELDS",
    "ResumeMismatchError",
    "TrainConfig",
    "apply_trainable",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "model_from_checkpoint",
    "param_groups",
    "resume_changes",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "train",
]

log = logging.getLogger("resode.train")

SCHEDULES = ("cosine", "step", "multistep", "constant")


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint.

    Every field is checked when the config is made: a value that cannot work raises
    ``ValueError`` with one line per problem. Whether a CUDA device is present is checked when
    :func:`train` starts (a config may be written on one machine and run on another).

    Attributes:
        model, model_kwargs: registry name and arguments (``resode.models.create``). When a
            built model is passed to :func:`train`, its own config is stored instead.
            ``num_classes`` / ``in_channels`` default to the dataset's.
        dataset, data_root, data_kwargs, download: see :func:`resode.data.get_dataset`.
        augment: override the dataset's default training augmentation (``None``: default).
        epochs, batch_size (global, over all processes), test_batch_size.
        lr, momentum, nesterov, weight_decay: SGD.
        schedule: ``cosine`` | ``step`` | ``multistep`` | ``constant``; ``step_size``,
            ``milestones`` (epochs) and ``gamma`` for the step schedules; ``warmup_epochs``
            (fractional allowed) of linear warm-up.
        stage_lr_mult: learning-rate multiplier for parameters inside residual stages
            (``resode.Stage``): a number, or ``"depth"`` for each stage's depth ``N``.
        trainable: module names (prefixes of parameter names, e.g. ``["layer3"]``) to train;
            the other parameters are frozen. ``None`` trains everything.
        label_smoothing: of the cross-entropy loss.
        seed: seeds python, numpy, torch (CPU and CUDA) and the data order.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` and no
            cuDNN benchmarking during the run (restored afterwards); on CUDA it also sets
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set (PyTorch needs it, before the first
            cuBLAS call of the process, for deterministic matrix products). Not needed on the
            CPU, where runs are reproducible without it (see ``num_threads``).
        num_threads: intra-op CPU threads (``torch.set_num_threads``) during the run, restored
            afterwards; ``None`` keeps the process's setting. CPU results are bitwise
            reproducible for a fixed thread count; another count may change the order of
            reductions and so the last bits.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        bf16: bfloat16 autocast (CUDA only).
        compile: ``torch.compile`` the model.
        out_dir: where ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` go
            (``None``: nothing is written).
        resume: continue from ``<out_dir>/checkpoint.pt`` if it exists (needs ``out_dir``);
            refused when the config changes the run (:func:`resume_changes`).
        checkpoint: write a checkpoint every epoch (needs ``out_dir``).
        max_steps_per_epoch, max_eval_batches: cap the work per epoch (smoke runs; positive,
            or ``None`` for the whole split).
        stop_after_epoch: return after this epoch even if ``epochs`` is larger (preemption
            tests; the schedule still spans ``epochs``).
        num_workers: DataLoader workers (folder datasets only).
        progress: tqdm bars; ``None``: only when stderr is a terminal.
    """

    model: str = "tiny_resnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    download: bool = True
    augment: bool | None = None
    epochs: int = 1
    batch_size: int = 128
    test_batch_size: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 30
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    stage_lr_mult: float | str = 1.0
    trainable: list[str] | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False
    num_threads: int | None = None
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    out_dir: str | None = None
    resume: bool = False
    checkpoint: bool = True
    max_steps_per_epoch: int | None = None
    max_eval_batches: int | None = None
    stop_after_epoch: int | None = None
    num_workers: int = 4
    progress: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        problems = _config_problems(self)
        if len(problems) == 1:
            raise ValueError(f"TrainConfig: {problems[0]}")
        if problems:
            raise ValueError("TrainConfig:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:  # numpy integers count, booleans do not
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


#: Optional positive integers: what the number counts, and what ``None`` means.
_OPTIONAL_COUNTS = {
    "max_steps_per_epoch": ("number of steps", "the whole training set"),
    "max_eval_batches": ("number of test batches", "the whole test set"),
    "stop_after_epoch": ("epoch number", "run to `epochs`"),
    "num_threads": ("number of threads", "keep the process's setting"),
}
#: Numbers with their admissible range: (low, low included, high, high included).
_RANGES = {
    "lr": (0.0, False, math.inf, False),
    "momentum": (0.0, True, 1.0, False),
    "weight_decay": (0.0, True, math.inf, False),
    "gamma": (0.0, False, math.inf, False),
    "warmup_epochs": (0.0, True, math.inf, False),
    "label_smoothing": (0.0, True, 1.0, True),
}


def _range_text(lo: float, lo_in: bool, hi: float, hi_in: bool) -> str:
    if hi == math.inf:
        return f"a finite number {'>=' if lo_in else '>'} {lo:g}"
    return f"a number in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _device_problem(device: Any) -> str | None:
    msg = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    if device == "auto":
        return None
    if not isinstance(device, str):
        return msg
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return msg
    return None if dev.type in ("cpu", "cuda") else msg


def _config_problems(c: TrainConfig) -> list[str]:
    """One line for each field of ``c`` whose value cannot work."""
    p = []
    for name in ("model", "dataset"):
        if not isinstance(getattr(c, name), str) or not getattr(c, name):
            p.append(f"{name} must be a registry name (a string), got {getattr(c, name)!r}")
    for name in ("model_kwargs", "data_kwargs"):
        if not isinstance(getattr(c, name), dict):
            p.append(f"{name} must be a dict, got {getattr(c, name)!r}")
    for name in ("epochs", "batch_size", "test_batch_size", "step_size"):
        v = getattr(c, name)
        if not _is_int(v) or v < 1:
            p.append(f"{name} must be an integer >= 1, got {v!r}")
    for name, (what, none) in _OPTIONAL_COUNTS.items():
        v = getattr(c, name)
        if v is not None and (not _is_int(v) or v < 1):
            p.append(f"{name} must be a positive {what}, or None for {none}; got {v!r}")
    for name, (lo, lo_in, hi, hi_in) in _RANGES.items():
        v = getattr(c, name)
        ok = _is_number(v) and (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)
        if not ok:
            p.append(f"{name} must be {_range_text(lo, lo_in, hi, hi_in)}, got {v!r}")
    if c.nesterov and _is_number(c.momentum) and c.momentum == 0:
        p.append("nesterov=True needs momentum > 0")
    if c.schedule not in SCHEDULES:
        p.append(f"unknown schedule {c.schedule!r}; choose one of {SCHEDULES}")
    if not isinstance(c.milestones, (list, tuple)) or not all(
        _is_int(m) and m >= 0 for m in c.milestones
    ):
        p.append(f"milestones must be a list of epochs (integers >= 0), got {c.milestones!r}")
    if c.stage_lr_mult != "depth" and not (_is_number(c.stage_lr_mult) and c.stage_lr_mult >= 0):
        p.append(f"stage_lr_mult must be a number >= 0 or 'depth', got {c.stage_lr_mult!r}")
    if c.trainable is not None and (
        not isinstance(c.trainable, (list, tuple))
        or not all(isinstance(t, str) for t in c.trainable)
    ):
        p.append(f"trainable must be a list of module names (e.g. ['layer3']) or None, got "
                 f"{c.trainable!r}")  # fmt: skip
    if not _is_int(c.seed):
        p.append(f"seed must be an integer, got {c.seed!r}")
    if not _is_int(c.num_workers) or c.num_workers < 0:
        p.append(f"num_workers must be an integer >= 0, got {c.num_workers!r}")
    if (msg := _device_problem(c.device)) is not None:
        p.append(msg)
    if c.resume and c.out_dir is None:
        p.append("resume=True needs an out_dir (the folder that holds checkpoint.pt)")
    return p


# ----------------------------------------------------------------------------- resume policy
#: Fields that define the run: resuming with another value is refused (:func:`resume_changes`).
RUN_FIELDS = (
    "model", "model_kwargs", "dataset", "data_kwargs", "augment", "seed", "batch_size",
    "max_steps_per_epoch", "lr", "momentum", "nesterov", "weight_decay", "schedule",
    "step_size", "milestones", "gamma", "warmup_epochs", "stage_lr_mult", "trainable",
    "label_smoothing",
)  # fmt: skip
#: Fields a resume may change; each change (but of ``resume`` itself) is recorded (``resumes``
#: in the checkpoint, in ``config.json`` and in the result of :func:`train`).
CHANGEABLE_FIELDS = (
    "epochs", "stop_after_epoch", "data_root", "download", "test_batch_size",
    "max_eval_batches", "device", "bf16", "compile", "deterministic", "num_threads",
    "num_workers", "progress", "out_dir", "resume", "checkpoint",
)  # fmt: skip


def _canonical(v: Any) -> Any:
    """``v`` as JSON would give it back (tuples become lists), so equal settings compare equal."""
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def resume_changes(
    saved: dict[str, Any], config: TrainConfig
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Compare the train config stored in a checkpoint with the config of a resume.

    Returns ``(refused, allowed)``: ``{field: (checkpoint value, new value)}`` for the fields
    that differ, split by policy. A field missing from ``saved`` (an older checkpoint) counts
    as its default. The policy, field by field:

    ======================================  ==========  ==========================================
    field                                   on resume   why
    ======================================  ==========  ==========================================
    model, model_kwargs                     must match  the network (its ModelConfig is compared
                                                        too, also when a built model is passed)
    dataset, data_kwargs, augment           must match  the data the run learns from
    seed                                    must match  initialisation and data order
    batch_size, max_steps_per_epoch         must match  the steps of an epoch (the schedule counts
                                                        iterations)
    lr, momentum, nesterov, weight_decay    must match  the optimiser
    schedule, step_size, milestones,        must match  the learning-rate schedule (compared even
    gamma, warmup_epochs                                when the schedule does not use them)
    stage_lr_mult, trainable                must match  the parameter groups of the optimiser
    label_smoothing                         must match  the loss
    epochs                                  may change  see below; fewer than the epochs already
                                                        done is refused
    stop_after_epoch                        may change  where this invocation stops
    data_root, download                     may change  where the files are (same dataset)
    test_batch_size, max_eval_batches       may change  evaluation only: later epochs' test metrics
                                                        may cover another part of the test set
    device, bf16, compile, deterministic,   may change  how the same run is computed (to move a
    num_threads, num_workers                            run to another machine); the resumed run
                                                        is bitwise equal to an uninterrupted one
                                                        only with the same values
    progress, out_dir, checkpoint           may change  bookkeeping
    resume                                  ignored     it is True on every resume
    ======================================  ==========  ==========================================

    A changed ``epochs`` means "continue with the schedule of the new total": the epochs done
    keep the learning rates they had, and the remaining iterations follow the schedule as if
    the run had been configured with the new ``epochs`` from the start. ``step``,
    ``multistep``, ``constant`` and the warm-up do not depend on ``epochs``, so there more
    epochs simply continue the run. The cosine schedule does: its learning rate jumps at the
    resume point from the old curve to the new one (e.g. 2 -> 4 epochs, resumed after epoch 2:
    from ``0`` to ``0.5 * lr``), a warm restart; the result is not the run a 4-epoch config
    would have given.
    """
    defaults = TrainConfig().to_dict()
    new = config.to_dict()
    refused: dict[str, tuple[Any, Any]] = {}
    allowed: dict[str, tuple[Any, Any]] = {}
    for name in RUN_FIELDS + CHANGEABLE_FIELDS:
        if name == "resume":
            continue
        old = saved.get(name, defaults[name])
        if _canonical(old) != _canonical(new[name]):
            (refused if name in RUN_FIELDS else allowed)[name] = (old, new[name])
    return refused, allowed


def _mismatch(path: Path, differences: list[str]) -> ResumeMismatchError:
    lines = "\n".join(f"  {d}" for d in differences)
    return ResumeMismatchError(
        f"cannot resume from {path}: incompatible checkpoint, the run it holds differs from "
        f"this one in\n{lines}\nUse another out_dir for the new run, or start afresh in "
        f"{path.parent} with resume=False (which overwrites the checkpoint)."
    )


# ----------------------------------------------------------------------------- helpers
def lr_factor(config: TrainConfig, it: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at iteration ``it`` (0-based) of the run."""
    epoch = it / steps_per_epoch
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
    elif config.schedule == "step":
        f = config.gamma ** math.floor(epoch / config.step_size)
    elif config.schedule == "multistep":
        f = config.gamma ** sum(math.floor(epoch) >= m for m in config.milestones)
    else:
        f = 1.0
    if config.warmup_epochs > 0 and epoch < config.warmup_epochs:
        f *= (it + 1) / (config.warmup_epochs * steps_per_epoch)
    return f


def apply_trainable(model: nn.Module, trainable: list[str] | None) -> None:
    """Freeze every parameter outside the modules named in ``trainable``."""
    if trainable is None:
        return
    names = dict(model.named_modules())
    missing = [t for t in trainable if t not in names]
    if missing:
        top = [n for n in names if n and "." not in n]
        raise ValueError(f"trainable: no module named {missing}; top-level modules: {top}")
    for n, p in model.named_parameters():
        p.requires_grad_(any(n == t or n.startswith(t + ".") for t in trainable))


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Parameter groups: residual-stage parameters get ``stage_lr_mult`` (per stage for
    ``"depth"``), the others multiplier 1. Frozen parameters are left out."""
    owner: dict[int, Stage] = {}
    for m in model.modules():
        if isinstance(m, Stage):
            for p in m.parameters():
                owner.setdefault(id(p), m)
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        stage = owner.get(id(p))
        if stage is None:
            mult = 1.0
        elif config.stage_lr_mult == "depth":
            mult = float(stage.depth)
        else:
            mult = float(config.stage_lr_mult)
        groups.setdefault(mult, []).append(p)
    if not groups:
        raise ValueError("no trainable parameters (check `trainable`)")
    return [{"params": ps, "lr": config.lr * m, "lr_mult": m} for m, ps in sorted(groups.items())]


def build_model(config: TrainConfig, data: Data | None = None) -> nn.Module:
    """The model of ``config`` (``num_classes``/``in_channels`` default to the dataset's)."""
    kw = dict(config.model_kwargs)
    if data is not None:
        kw.setdefault("num_classes", data.num_classes)
        kw.setdefault("in_channels", data.in_channels)
        if config.model == "mlp_resnet":
            kw.setdefault("image_size", data.image_size)
    return create(config.model, kw)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    dist_info: D.DistInfo | None = None,
    bf16: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (summed over ranks); at most
    ``max_batches`` batches (positive, or ``None`` for all)."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive or None (all batches), got {max_batches}")
    dist_info = dist_info or D.DistInfo()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    with torch.no_grad():
        for i, (x, y) in enumerate(_progress(loader, total, "eval", progress)):
            if i >= total:
                break
            if len(y) == 0:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
    model.train(was_training)
    D.all_reduce_sum(sums, dist_info)
    n = max(sums[2].item(), 1.0)
    return {"loss": sums[0].item() / n, "acc": sums[1].item() / n}


@contextlib.contextmanager
def _execution_settings(config: TrainConfig, cuda: bool) -> Iterator[None]:
    """``num_threads`` and ``deterministic`` for the duration of a run, restored afterwards."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    bench = torch.backends.cudnn.benchmark
    set_cublas = config.deterministic and cuda and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if config.deterministic:
            if set_cublas:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        if config.num_threads is not None:
            torch.set_num_threads(threads)
        if config.deterministic:
            torch.use_deterministic_algorithms(det, warn_only=det_warn)
            torch.backends.cudnn.benchmark = bench
            if set_cublas:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ----------------------------------------------------------------------------- the loop
def train(
    config: TrainConfig, model: nn.Module | None = None, data: Data | None = None
) -> dict[str, Any]:
    """Train (or resume) and return a result dict.

    Args:
        config: the run's :class:`TrainConfig`.
        model: an already built model (e.g. an untied model to fine-tune); ``None`` builds
            ``config.model``. Its ``config`` (if built by the registry) goes in checkpoints.
        data: an already loaded :class:`~resode.data.Data`; ``None`` loads ``config.dataset``.

    Returns:
        dict with ``history`` (one metrics dict per epoch), ``final`` (the last one),
        ``best_test_acc``, ``best_test_error``, ``best_epoch`` (1-based), ``epochs_done``,
        ``num_params``, ``model_config``, ``train_config``, ``resumes`` (one record per resume:
        the epoch it started from and the allowed changes), ``data_dir`` (the folder the data
        was read from, :attr:`resode.data.Data.root`), ``out_dir``, ``checkpoint`` (path or
        ``None``), ``wall_time_s`` and ``model`` (the trained module, unwrapped; not
        JSON-serialisable).

    Raises:
        resode.checkpoint.CheckpointError: ``resume=True`` and the checkpoint is unreadable.
        resode.checkpoint.ResumeMismatchError: ``resume=True`` and the config (or model)
            changes the run the checkpoint holds (:func:`resume_changes`).
    """
    want_cuda = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    dist_info = D.setup("cuda" if want_cuda else "cpu")
    try:
        with _execution_settings(config, want_cuda):
            run = _Run(config, dist_info)
            run.setup(model, data)
            run.resume_or_broadcast()
            run.wrap()
            run.open_logs()
            t_run = time.perf_counter()
            for epoch in range(run.start_epoch, run.last_epoch):
                run.end_epoch(run.train_epoch(epoch))
            return run.result(time.perf_counter() - t_run)
    finally:
        D.teardown(dist_info)


class _Run:
    """One training run: what its epochs share, and the steps :func:`train` takes in order."""

    def __init__(self, config: TrainConfig, dist_info: D.DistInfo) -> None:
        self.config, self.dist = config, dist_info
        self.device = resolve_device(config.device, dist_info.local_rank)
        self.main = dist_info.is_main
        self.show = self.main and (
            config.progress if config.progress is not None else sys.stderr.isatty()
        )
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.ckpt_path = self.out_dir / "checkpoint.pt" if self.out_dir else None
        self.start_epoch, self.history, self.resumes = 0, [], []
        self.best: dict[str, Any] = {"acc": -1.0, "epoch": 0}
        self.last_epoch = config.epochs
        if config.stop_after_epoch is not None:
            self.last_epoch = min(self.last_epoch, config.stop_after_epoch)

    # -- setup: data, model, loaders, optimiser (the order fixes the RNG stream)
    def setup(self, model: nn.Module | None, data: Data | None) -> None:
        cfg = self.config
        seed_everything(cfg.seed)
        self.data = data if data is not None else self._load_data()
        if model is None:
            model = build_model(cfg, self.data)
        self.model = unwrap(model).to(self.device)
        self.model_cfg = get_config(self.model)
        self.backward_log = _BackwardLog(self.model)
        apply_trainable(self.model, cfg.trainable)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self._make_loaders()
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, cfg),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(cfg, it, self.steps_per_epoch)
        )

    def _load_data(self) -> Data:
        cfg = self.config
        kw = dict(cfg.data_kwargs)
        if cfg.augment is not None:
            kw["augment"] = cfg.augment
        kw.setdefault("num_workers", cfg.num_workers)  # folder datasets only
        return get_dataset(
            cfg.dataset, root=cfg.data_root, device=self.device, download=cfg.download, **kw
        )

    def _make_loaders(self) -> None:
        cfg, rank, ws = self.config, self.dist.rank, self.dist.world_size
        self.train_loader = self.data.loader(
            "train", cfg.batch_size, seed=cfg.seed, rank=rank, world_size=ws
        )
        test_bs = -(-cfg.test_batch_size // ws) * ws
        self.test_loader = self.data.loader(
            "test", test_bs, seed=cfg.seed, rank=rank, world_size=ws
        )
        steps = len(self.train_loader)
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        if steps < 1:
            raise ValueError(
                f"the training set ({len(self.data.train)} samples) is smaller than one batch "
                f"({cfg.batch_size})"
            )
        self.steps_per_epoch = steps

    # -- resume (or, fresh under DDP, give every rank rank 0's initial weights)
    def resume_or_broadcast(self) -> None:
        if self.config.resume and self.ckpt_path is not None and self.ckpt_path.is_file():
            self._resume(load_checkpoint(self.ckpt_path))
        elif self.dist.enabled:
            D.broadcast_parameters(self.model, self.dist)

    def _resume(self, ckpt: dict[str, Any]) -> None:
        cfg, path = self.config, self.ckpt_path
        refused, allowed = resume_changes(ckpt.get("train_config") or {}, cfg)
        diffs = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items()]
        saved_model = ckpt.get("model_config")
        if saved_model and self.model_cfg and ModelConfig.from_dict(saved_model) != self.model_cfg:
            diffs.append(f"model config: {saved_model} -> {self.model_cfg.to_dict()}")
        if cfg.epochs < ckpt["epoch"]:
            diffs.append(f"epochs: {cfg.epochs} is fewer than the {ckpt['epoch']} already done")
        if diffs:
            raise _mismatch(path, diffs)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise _mismatch(path, [f"model or optimiser state: {e}"]) from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "epochs" in allowed:  # the next step's learning rate follows the new schedule
            it = self.scheduler.last_epoch
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                g["lr"] = base * lr_factor(cfg, it, self.steps_per_epoch)
        set_rng_state(ckpt["rng"])
        self.start_epoch, self.history, self.best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        changes = {k: [old, new] for k, (old, new) in allowed.items()}
        self.resumes = [*ckpt.get("resumes", []), {"epoch": self.start_epoch, "changes": changes}]
        if self.main:
            log.info("resumed from %s at epoch %d; changes: %s", path, self.start_epoch, changes)
            if "epochs" in allowed and cfg.schedule == "cosine":
                old, new = allowed["epochs"]
                msg = "epochs %s -> %s: the cosine schedule jumps to its new curve at epoch %d"
                log.warning(msg, old, new, self.start_epoch)

    def wrap(self) -> None:
        """The module the steps call: DDP under ``torchrun``, compiled with ``compile``."""
        net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.config.compile:
            net = torch.compile(net)
        self.net = net
        self.bf16 = self.config.bf16 and self.device.type == "cuda"

    def open_logs(self) -> None:
        """``config.json``, and ``metrics.jsonl`` cut to the checkpoint's epochs (a partly
        written epoch is dropped)."""
        if self.out_dir is None or not self.main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "train_config": self.config.to_dict(),
            "model_config": _cfg_dict(self.model_cfg),
            "data_dir": getattr(self.data, "root", None),
            "resumes": self.resumes,
        }
        (self.out_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        with open(self.out_dir / "metrics.jsonl", "w") as f:
            for h in self.history:
                f.write(json.dumps(h) + "\n")

    # -- one epoch
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, evaluate, and return its metrics record."""
        cfg, dev = self.config, self.device
        t0 = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.net.train()
        self.train_loader.set_epoch(epoch)
        if self.dist.enabled:  # per-rank random streams (dropout), a function of (seed, epoch)
            torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (epoch + 1) + self.dist.rank)
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss, correct, count
        self.backward_log.reset()
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        bar = _progress(self.train_loader, self.steps_per_epoch, desc, self.show)
        for step, (x, y) in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            out, loss = self._step(x, y)
            with torch.no_grad():
                sums[0] += loss.detach().double() * len(y)
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += len(y)
            if self.show and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}")
        D.all_reduce_sum(sums, self.dist)
        backward = self.backward_log.read(self.dist, dev)
        train_time = time.perf_counter() - t0
        test = evaluate(
            self.model, self.test_loader, dev, self.dist, self.bf16, cfg.max_eval_batches, self.show
        )
        return {**self._record(epoch, sums, test, t0, train_time), **backward}

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x)  # (B, num_classes)
            loss = F.cross_entropy(out.float(), y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.backward_log.after_backward()
        self.optimizer.step()
        self.scheduler.step()
        return out, loss

    def _record(self, epoch: int, sums, test, t0: float, train_time: float) -> dict[str, Any]:
        n = max(sums[2].item(), 1.0)
        peak, peak_kind = peak_memory(self.device)
        group = self.optimizer.param_groups[0]
        return {
            "epoch": epoch + 1,
            "train_loss": sums[0].item() / n,
            "train_acc": sums[1].item() / n,
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "test_error": 1.0 - test["acc"],
            # base learning rate at the end of the epoch (group multipliers divided out)
            "lr": group["lr"] / group["lr_mult"],
            "steps": self.steps_per_epoch,
            "train_time_s": train_time,
            "epoch_time_s": time.perf_counter() - t0,
            "samples_per_s": n / max(train_time, 1e-9),
            "peak_mem_bytes": peak,
            "peak_mem_kind": peak_kind,
            "world_size": self.dist.world_size,
        }

    # -- after each epoch: best, log, metrics line, checkpoint
    def end_epoch(self, rec: dict[str, Any]) -> None:
        epoch = rec["epoch"]
        if rec["test_acc"] > self.best["acc"]:
            self.best = {"acc": rec["test_acc"], "epoch": epoch}
        self.history.append(rec)
        if self.main:
            log.info(
                "epoch %d/%d train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
                epoch, self.config.epochs, rec["train_loss"], rec["train_acc"], rec["test_loss"],
                rec["test_acc"], rec["epoch_time_s"],
            )  # fmt: skip
        if self.out_dir is not None and self.main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.config.checkpoint:
                self.save_checkpoint(epoch)
        D.barrier(self.dist)

    def save_checkpoint(self, epoch: int) -> None:
        """The state after ``epoch`` epochs, atomically to ``<out_dir>/checkpoint.pt``."""
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "model": self.model.state_dict(),
                "model_config": _cfg_dict(self.model_cfg),
                "train_config": self.config.to_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "history": self.history,
                "best": self.best,
                "resumes": self.resumes,
                "torch_version": torch.__version__,
            },
            self.ckpt_path,
        )

    def result(self, wall_time_s: float) -> dict[str, Any]:
        h, best = self.history, self.best
        ckpt = str(self.ckpt_path) if self.ckpt_path and self.config.checkpoint else None
        return {
            "history": h,
            "final": h[-1] if h else None,
            "best_test_acc": best["acc"] if h else None,
            "best_test_error": 1.0 - best["acc"] if h else None,
            "best_epoch": best["epoch"] if h else None,
            "epochs_done": len(h),
            "num_params": self.num_params,
            "model_config": _cfg_dict(self.model_cfg),
            "train_config": self.config.to_dict(),
            "resumes": self.resumes,
            "data_dir": getattr(self.data, "root", None),
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "checkpoint": ckpt,
            "wall_time_s": wall_time_s,
            "model": self.model,
        }


class _BackwardLog:
    """The worst adjoint drift and the number of ``backward="auto"`` fallbacks over an epoch.

    After each backward it reads every stage's new ``last_backward`` report
    (:func:`resode.backward_reports`): the drift ``||x^_0 - x_0|| / ||x_0||`` of stages whose
    backward rebuilt activations (any mode but ``"autograd"``) is kept as a running maximum on
    the device, so no step waits for the device; :meth:`read` reads it once per epoch (NaN, a
    diverged reconstruction, wins). Under DDP the maximum and the count are taken over ranks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.stages = stages(model)
        self.seen: dict[Stage, Any] = {}  # the report of each stage read last (skip stale ones)
        self.reset()

    def reset(self) -> None:
        self.worst: torch.Tensor | None = None
        self.fallbacks = 0

    def after_backward(self) -> None:
        for st in self.stages:
            r = st.last_backward
            if r is None or r is self.seen.get(st):
                continue
            self.seen[st] = r
            if r.mode == "autograd":
                continue
            d = r.drift_tensor.double()  # a detached tensor on the run's device (not autograd)
            self.worst = d if self.worst is None else torch.maximum(self.worst, d)
            self.fallbacks += int(r.fell_back)

    def read(self, dist_info: D.DistInfo, device: torch.device) -> dict[str, Any]:
        """``{"worst_drift": float | None, "auto_fallbacks": int}`` of the epoch (``None``: no
        stage ran an adjoint backward)."""
        none = torch.tensor(-1.0, dtype=torch.float64)
        worst = (self.worst if self.worst is not None else none).to(device)
        count = torch.tensor(float(self.fallbacks), dtype=torch.float64, device=device)
        D.all_reduce_max(worst, dist_info)
        D.all_reduce_sum(count, dist_info)
        w = worst.item()
        return {"worst_drift": w if (math.isnan(w) or w >= 0) else None,
                "auto_fallbacks": int(count.item())}  # fmt: skip


def _cfg_dict(cfg: ModelConfig | None) -> dict[str, Any] | None:
    return cfg.to_dict() if cfg is not None else None
