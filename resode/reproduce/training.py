"""Training runs for the experiments: thin wrappers over :func:`resode.train.train`.

No training loop lives here: every classifier is trained by :mod:`resode.train`. This module only
turns a sweep point (plain keyword arguments, so submitit can pickle it) into a
:class:`~resode.train.TrainConfig`, keeps the dataset in memory between inline runs, and returns a
JSON-able result. Each run writes its checkpoint and ``metrics.jsonl`` in its own directory and
resumes from it (``resume=True``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@functools.lru_cache(maxsize=4)
def load_data(dataset: str, data_root: str | None, device: str, data_kwargs: str = "{}"):
    """The dataset (cached per process; ``data_kwargs`` is a JSON string so it hashes)."""
    import json

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
    import json

    data = load_data(dataset, data_root, "cpu", json.dumps(data_kwargs, sort_keys=True))
    return next(iter(data.loader(split, batch, seed=seed)))


def dataset_for(preset: str, data_root: str | None, paper: str = "cifar10") -> tuple[str, dict]:
    """Dataset of a preset: synthetic for smoke, Fashion-MNIST for quick, ``paper`` for paper."""
    if preset == "smoke":
        return "synthetic", dict(
            num_train=512, num_test=256, in_channels=1, image_size=16, noise=2.0
        )
    if preset == "quick":
        return "fashion_mnist", {}
    return paper, {}


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
        run_dir: the run's directory (checkpoint, metrics; resumed if present).
        model, model_kwargs: registry name and arguments.
        init_checkpoint: start from the weights of this checkpoint (its model rebuilt from the
            checkpoint's config), optionally passed through ``transform`` (``"untie"``).
        **train_kwargs: other :class:`~resode.train.TrainConfig` fields (epochs, lr, ...).
    """
    import json

    from resode.train import TrainConfig, model_from_checkpoint, train

    # a run directory left by different arguments is started afresh (never resumed)
    args = dict(model=model, model_kwargs=model_kwargs, dataset=dataset, data_kwargs=data_kwargs,
                seed=seed, init_checkpoint=init_checkpoint, transform=transform,
                residual_init=residual_init, **train_kwargs)  # fmt: skip
    stamp = Path(run_dir) / "run_args.json"
    text = json.dumps(args, sort_keys=True, default=str)
    if stamp.is_file() and stamp.read_text() != text:
        for name in ("checkpoint.pt", "metrics.jsonl", "config.json"):
            (Path(run_dir) / name).unlink(missing_ok=True)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)
    data = load_data(dataset, data_root, device, json.dumps(data_kwargs, sort_keys=True))
    net: nn.Module | None = None
    if init_checkpoint is not None:
        net = model_from_checkpoint(init_checkpoint)
        if transform == "untie":
            from resode.models import untie

            net = untie(net)
        elif transform is not None:
            raise ValueError(f"unknown transform {transform!r}")
        if "backward" in model_kwargs:
            import resode

            resode.set_backward(net, model_kwargs["backward"])
    if residual_init not in ("zero", "standard"):
        raise ValueError(f"residual_init must be 'zero' or 'standard', got {residual_init!r}")
    cfg = TrainConfig(
        model=model,
        model_kwargs=dict(model_kwargs),
        dataset=dataset,
        data_root=data_root,
        data_kwargs=dict(data_kwargs),
        seed=seed,
        device=device,
        out_dir=run_dir,
        resume=True,
        progress=False,
        **train_kwargs,
    )
    if residual_init == "standard" and net is None:
        from resode.train import build_model

        from .common import seed_everything

        seed_everything(seed)
        net = build_model(cfg, data)
        standard_residual_init(net)
    res = train(cfg, model=net, data=data)
    res.pop("model", None)
    return {
        "best_test_error": res["best_test_error"],
        "best_test_acc": res["best_test_acc"],
        "best_epoch": res["best_epoch"],
        "final_test_acc": res["final"]["test_acc"] if res["final"] else None,
        "final_train_loss": res["final"]["train_loss"] if res["final"] else None,
        "history": res["history"],
        "num_params": res["num_params"],
        "checkpoint": res["checkpoint"],
        "train_time_s": sum(h["train_time_s"] for h in res["history"]),
    }


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


@torch.no_grad()
def accuracy(model: nn.Module, data, device: str, max_batches: int | None = None) -> float:
    """Test accuracy of ``model`` (eval mode) on ``data``'s test split."""
    from resode.train import evaluate

    loader = data.loader("test", 1000)
    return evaluate(model, loader, torch.device(device), max_batches=max_batches)["acc"]


def ckpt(run_dir: str | Path) -> str:
    return str(Path(run_dir) / "checkpoint.pt")
