"""Training runs for the experiments: thin wrappers over :func:`resode.train.train`.

No training loop lives here: every classifier is trained by :mod:`resode.train`. This module only
turns a sweep point (plain keyword arguments, so submitit can pickle it) into a
:class:`~resode.train.TrainConfig`, keeps the dataset in memory between inline runs, and returns a
JSON-able result. Each run writes its checkpoint and ``metrics.jsonl`` in its own directory and
resumes from it (``resume=True``).
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@functools.lru_cache(maxsize=4)
def load_data(dataset: str, data_root: str | None, device: str, data_kwargs: str = "{}"):
    """The dataset (cached per process; ``data_kwargs`` is a JSON string so it hashes)."""
    from resode.data import get_dataset

    return get_dataset(dataset, root=data_root, device=device, **json.loads(data_kwargs))


def one_batch(
    dataset: str,
    data_root: str | None,
    data_kwargs: dict,
    batch: int,
    seed: int,
    split: str = "train",
):
    """One ``(x, y)`` batch of ``split`` on the CPU, drawn in the order given by ``seed``."""
    data = load_data(dataset, data_root, "cpu", json.dumps(data_kwargs, sort_keys=True))
    return next(iter(data.loader(split, batch, seed=seed)))


#: what reading a damaged checkpoint raises (torch.load of an empty, truncated or garbage
#: file: EOFError, RuntimeError, UnpicklingError, OSError; a foreign file: ValueError)
CHECKPOINT_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError,
)  # fmt: skip


class CheckpointUnreadable(RuntimeError):
    """A checkpoint a sweep point needs cannot be read; the message names the run folder."""


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:  # the checkpoint module of the library, where it exists
        from resode.checkpoint import load_checkpoint
    except ImportError:
        from resode.train import load_checkpoint
    return load_checkpoint(path)


def checkpoint_problem(result: dict[str, Any]) -> str | None:
    """Why the checkpoint of a finished training point cannot be used (``None``: it can)."""
    path = result.get("checkpoint")
    if not path:
        return None
    if not Path(path).is_file():
        return f"its checkpoint {path} is missing; training {Path(path).parent} again"
    try:
        _load_checkpoint(path)
    except CHECKPOINT_READ_ERRORS as e:
        return (f"its checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                f"training {Path(path).parent} again")  # fmt: skip
    return None


def load_model(path: str | Path) -> nn.Module:
    """The model of a training checkpoint; a damaged file raises :class:`CheckpointUnreadable`
    naming the run folder to delete."""
    from resode.train import model_from_checkpoint

    try:
        return model_from_checkpoint(path)
    except CHECKPOINT_READ_ERRORS as e:
        raise CheckpointUnreadable(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete the run "
            f"folder {Path(path).parent} and rerun"
        ) from e


def _prepare_run_dir(run_dir: str, args: dict[str, Any]) -> None:
    """Start ``run_dir`` afresh when it was left by other arguments or holds a damaged
    checkpoint (never resume from either); record the arguments."""
    run = Path(run_dir)
    stamp = run / "run_args.json"
    text = json.dumps(args, sort_keys=True, default=str)
    fresh = stamp.is_file() and stamp.read_text() != text
    ckpt = run / "checkpoint.pt"
    if not fresh and ckpt.is_file():
        why = checkpoint_problem({"checkpoint": str(ckpt)})
        if why:
            print(f"[resode] {run}: {why.replace('its checkpoint', 'checkpoint')}", flush=True)
            fresh = True
    if fresh:
        for name in ("checkpoint.pt", "metrics.jsonl", "config.json"):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)


def _initial_model(
    init_checkpoint: str | None, transform: str | None, model_kwargs: dict[str, Any]
) -> nn.Module | None:
    """The starting model of a run that begins from a checkpoint (``None`` otherwise)."""
    if init_checkpoint is None:
        return None
    net = load_model(init_checkpoint)
    if transform == "untie":
        from resode.models import untie

        net = untie(net)
    elif transform is not None:
        raise ValueError(f"unknown transform {transform!r}")
    if "backward" in model_kwargs:
        import resode

        resode.set_backward(net, model_kwargs["backward"])
    return net


def _result(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of :func:`resode.train.train`'s result that the experiments use."""
    final = res["final"]
    return {
        "best_test_error": res["best_test_error"],
        "best_test_acc": res["best_test_acc"],
        "best_epoch": res["best_epoch"],
        "final_test_acc": final["test_acc"] if final else None,
        "final_train_loss": final["train_loss"] if final else None,
        "history": res["history"],
        "num_params": res["num_params"],
        "checkpoint": res["checkpoint"],
        "train_time_s": sum(h["train_time_s"] for h in res["history"]),
    }


def train_run(
    run_dir: str,
    model: str,
    model_kwargs: dict[str, Any],
    dataset: str,
    data_kwargs: dict[str, Any],
    data_root: str | None,
    device: str,
    seed: int,
    init_checkpoint: str | None = None,
    transform: str | None = None,
    residual_init: str = "zero",
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train one model with :func:`resode.train.train`; returns JSON-able results.

    Args:
        run_dir: the run's directory (checkpoint, metrics; resumed if present and made with
            the same arguments, started afresh otherwise or when its checkpoint is damaged).
        model, model_kwargs: registry name and arguments.
        init_checkpoint: start from the weights of this checkpoint (its model rebuilt from the
            checkpoint's config), optionally passed through ``transform`` (``"untie"``).
        residual_init: ``"zero"`` (the models' default) or ``"standard"``
            (:func:`standard_residual_init`).
        **train_kwargs: other :class:`~resode.train.TrainConfig` fields (epochs, lr, ...).
    """
    from resode.train import TrainConfig, build_model, train
    from resode.utils import seed_everything

    if residual_init not in ("zero", "standard"):
        raise ValueError(f"residual_init must be 'zero' or 'standard', got {residual_init!r}")
    _prepare_run_dir(run_dir, dict(model=model, model_kwargs=model_kwargs, dataset=dataset,
                     data_kwargs=data_kwargs, seed=seed, init_checkpoint=init_checkpoint,
                     transform=transform, residual_init=residual_init, **train_kwargs))  # fmt: skip
    data = load_data(dataset, data_root, device, json.dumps(data_kwargs, sort_keys=True))
    net = _initial_model(init_checkpoint, transform, model_kwargs)
    cfg = TrainConfig(model=model, model_kwargs=dict(model_kwargs), dataset=dataset,
                      data_root=data_root, data_kwargs=dict(data_kwargs), seed=seed,
                      device=device, out_dir=run_dir, resume=True, progress=False,
                      **train_kwargs)  # fmt: skip
    if residual_init == "standard" and net is None:
        seed_everything(seed)
        net = standard_residual_init(build_model(cfg, data))
    res = train(cfg, model=net, data=data)
    res.pop("model", None)
    return _result(res)


@torch.no_grad()
def standard_residual_init(model: nn.Module) -> nn.Module:
    """Set the last BatchNorm weight of every residual function to 1 (in place)."""
    from resode.stack import ResidualStack, stages

    for st in stages(model):
        if not isinstance(st, ResidualStack):
            raise NotImplementedError(f"standard_residual_init on a {type(st).__name__}")
        for n in range(st.depth):
            bns = [m for m in st.block(n).modules() if isinstance(m, _BatchNorm)]
            if bns:
                nn.init.ones_(bns[-1].weight)
    return model
