"""Training checkpoints: one file per run, written atomically, read with a format check.

    from resode.checkpoint import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint("runs/x/checkpoint.pt")       # dict, on the CPU
    model = model_from_checkpoint("runs/x/checkpoint.pt")  # rebuilt from its ModelConfig

A checkpoint written by :func:`resode.train.train` is a dict with ``format`` (
:data:`CHECKPOINT_FORMAT`), ``epoch``, ``model`` (state dict), ``model_config`` (the
:class:`~resode.models.ModelConfig` as a dict, so the file alone rebuilds the model),
``train_config``, ``optimizer``, ``scheduler``, ``rng`` (:func:`rng_state`), ``history``,
``best`` and ``torch_version``. See docs/design.md, "Models and training".
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import ModelConfig, create

CHECKPOINT_FORMAT = "resode-checkpoint-v1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` so that ``path`` holds either the old or the new file, never a
    partial one: written to a temporary file in the same folder, flushed to disk, renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`resode.train.train` (tensors on the CPU)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a resode training checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model from a checkpoint alone (its stored :class:`ModelConfig`) and load its
    weights."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("model_config"):
        raise ValueError(f"{path} has no model config (the model was not built by the registry)")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = create(cfg.name, cfg.kwargs)
    model.load_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """The state of python's ``random``, numpy's global generator, torch's CPU generator and,
    once CUDA is initialised, every CUDA generator."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state from :func:`rng_state` (the CUDA part only where CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
