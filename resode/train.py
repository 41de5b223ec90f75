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
* bfloat16 autocast on CUDA (``bf16``), ``torch.compile`` (``compile``).
* Every epoch: metrics appended to ``<out_dir>/metrics.jsonl`` and a checkpoint written
  atomically to ``<out_dir>/checkpoint.pt`` (model config + train config + model, optimizer,
  scheduler and RNG states). ``resume=True`` continues from it and ends in the same state as an
  uninterrupted run (bitwise on CPU).
* Under ``torchrun`` the model is wrapped in DistributedDataParallel, every rank takes a slice
  of each global batch (``batch_size`` is the global batch), rank 0 logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .data import Data, get_dataset
from .models import ModelConfig, create, get_config, unwrap
from .stack import Stage

log = logging.getLogger("resode.train")

SCHEDULES = ("cosine", "step", "multistep", "constant")
CHECKPOINT_FORMAT = "resode-checkpoint-v1"


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint.

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
        deterministic: ``torch.use_deterministic_algorithms(True)`` (process-wide setting).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        bf16: bfloat16 autocast (CUDA only).
        compile: ``torch.compile`` the model.
        out_dir: where ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` go
            (``None``: nothing is written).
        resume: continue from ``<out_dir>/checkpoint.pt`` if it exists.
        checkpoint: write a checkpoint every epoch (needs ``out_dir``).
        max_steps_per_epoch, max_eval_batches: cap the work per epoch (smoke runs).
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
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if isinstance(self.stage_lr_mult, str) and self.stage_lr_mult != "depth":
            raise ValueError(
                f"stage_lr_mult must be a number or 'depth', got {self.stage_lr_mult!r}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str, dist_info: D.DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist_info.local_rank if dist_info else 0)
    return dev


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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"
    except ImportError:  # pragma: no cover - not on Windows
        return 0, "unknown"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (on CPU)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a resode training checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model from a checkpoint alone (its stored config) and load its weights."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("model_config"):
        raise ValueError(f"{path} has no model config (the model was not built by the registry)")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = create(cfg.name, cfg.kwargs)
    model.load_state_dict(ckpt["model"])
    return model


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
    """Mean loss and accuracy of ``model`` over ``loader`` (summed over ranks)."""
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
        ``num_params``, ``model_config``, ``train_config``, ``out_dir``, ``checkpoint`` (path
        or ``None``) and ``model`` (the trained module, unwrapped; not JSON-serialisable).
    """
    want_cuda = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    dist_info = D.setup("cuda" if want_cuda else "cpu")
    try:
        return _train(config, model, data, dist_info)
    finally:
        D.teardown(dist_info)


def _train(config: TrainConfig, model, data, dist_info: D.DistInfo) -> dict[str, Any]:
    device = resolve_device(config.device, dist_info)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(config.seed)
    out_dir = Path(config.out_dir) if config.out_dir else None
    main = dist_info.is_main
    show = dist_info.is_main and (
        config.progress if config.progress is not None else sys.stderr.isatty()
    )

    if data is None:
        kw = dict(config.data_kwargs)
        if config.augment is not None:
            kw["augment"] = config.augment
        kw.setdefault("num_workers", config.num_workers)  # folder datasets only
        data = get_dataset(
            config.dataset, root=config.data_root, device=device, download=config.download, **kw
        )
    if model is None:
        model = build_model(config, data)
    model = unwrap(model).to(device)
    model_cfg = get_config(model)
    apply_trainable(model, config.trainable)
    num_params = sum(p.numel() for p in model.parameters())

    train_loader = data.loader(
        "train", config.batch_size, seed=config.seed, rank=dist_info.rank,
        world_size=dist_info.world_size,
    )  # fmt: skip
    test_bs = -(-config.test_batch_size // dist_info.world_size) * dist_info.world_size
    test_loader = data.loader(
        "test", test_bs, seed=config.seed, rank=dist_info.rank, world_size=dist_info.world_size
    )
    steps_per_epoch = len(train_loader)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set ({len(data.train)} samples) is smaller than one batch "
            f"({config.batch_size})"
        )

    optimizer = torch.optim.SGD(
        param_groups(model, config),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(config, it, steps_per_epoch)
    )

    start_epoch, history, best = 0, [], {"acc": -1.0, "epoch": 0}
    ckpt_path = out_dir / "checkpoint.pt" if out_dir else None
    if config.resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        saved_cfg = ckpt.get("model_config")
        if saved_cfg and model_cfg and ModelConfig.from_dict(saved_cfg) != model_cfg:
            raise ValueError(
                f"incompatible checkpoint {ckpt_path}: it holds model {saved_cfg}, this run "
                f"builds {model_cfg.to_dict()}; use another out_dir or resume=False"
            )
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"incompatible checkpoint {ckpt_path}: {e}") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        if main:
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif dist_info.enabled:
        D.broadcast_parameters(model, dist_info)

    net: nn.Module = model
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        net = torch.compile(net)
    bf16 = config.bf16 and device.type == "cuda"

    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"train_config": config.to_dict(), "model_config": _cfg_dict(model_cfg)}
        (out_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        # metrics.jsonl holds exactly the epochs of the checkpoint (drops a partial epoch)
        with open(out_dir / "metrics.jsonl", "w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")

    t_run = time.perf_counter()
    last_epoch = config.epochs
    if config.stop_after_epoch is not None:
        last_epoch = min(last_epoch, config.stop_after_epoch)
    for epoch in range(start_epoch, last_epoch):
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        net.train()
        train_loader.set_epoch(epoch)
        if dist_info.enabled:  # per-rank random streams (dropout), a function of (seed, epoch)
            torch.manual_seed(config.seed * 1_000_003 + 7919 * (epoch + 1) + dist_info.rank)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        bar = _progress(train_loader, steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", show)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                sums[0] += loss.detach().double() * len(y)
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += len(y)
            if show and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}")
        D.all_reduce_sum(sums, dist_info)
        train_time = time.perf_counter() - t0
        test = evaluate(model, test_loader, device, dist_info, bf16, config.max_eval_batches, show)
        n = max(sums[2].item(), 1.0)
        peak, peak_kind = _peak_memory(device)
        rec = {
            "epoch": epoch + 1,
            "train_loss": sums[0].item() / n,
            "train_acc": sums[1].item() / n,
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "test_error": 1.0 - test["acc"],
            # base learning rate at the end of the epoch (group multipliers divided out)
            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"],
            "steps": steps_per_epoch,
            "train_time_s": train_time,
            "epoch_time_s": time.perf_counter() - t0,
            "samples_per_s": n / max(train_time, 1e-9),
            "peak_mem_bytes": peak,
            "peak_mem_kind": peak_kind,
            "world_size": dist_info.world_size,
        }
        if rec["test_acc"] > best["acc"]:
            best = {"acc": rec["test_acc"], "epoch": epoch + 1}
        history.append(rec)
        if main:
            log.info(
                "epoch %d/%d train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
                epoch + 1, config.epochs, rec["train_loss"], rec["train_acc"], rec["test_loss"],
                rec["test_acc"], rec["epoch_time_s"],
            )  # fmt: skip
        if out_dir is not None and main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if config.checkpoint:
                _atomic_save(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "model_config": _cfg_dict(model_cfg),
                        "train_config": config.to_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                        "history": history,
                        "best": best,
                        "torch_version": torch.__version__,
                    },
                    ckpt_path,
                )
        D.barrier(dist_info)

    return {
        "history": history,
        "final": history[-1] if history else None,
        "best_test_acc": best["acc"] if history else None,
        "best_test_error": 1.0 - best["acc"] if history else None,
        "best_epoch": best["epoch"] if history else None,
        "epochs_done": len(history),
        "num_params": num_params,
        "model_config": _cfg_dict(model_cfg),
        "train_config": config.to_dict(),
        "out_dir": str(out_dir) if out_dir else None,
        "checkpoint": str(ckpt_path) if ckpt_path and config.checkpoint else None,
        "wall_time_s": time.perf_counter() - t_run,
        "model": model,
    }


def _cfg_dict(cfg: ModelConfig | None) -> dict[str, Any] | None:
    return cfg.to_dict() if cfg is not None else None
