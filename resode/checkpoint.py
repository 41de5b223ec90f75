"""Training checkpoints: one file per run, written atomically, read with a format check.

    from resode.checkpoint import load_checkpoint, model_from_checkpoint, CheckpointError
    ckpt = load_checkpoint("runs/x/checkpoint.pt")       # dict, on the CPU
    model = model_from_checkpoint("runs/x/checkpoint.pt")  # rebuilt from its ModelConfig

A checkpoint written by :func:`resode.train.train` is a dict with ``format`` (
:data:`CHECKPOINT_FORMAT`), ``epoch``, ``model`` (state dict), ``model_config`` (the
:class:`~resode.models.ModelConfig` as a dict, so the file alone rebuilds the model),
``train_config``, ``optimizer``, ``scheduler``, ``rng`` (:func:`rng_state`), ``history``,
``best``, ``resumes`` and ``torch_version``. See docs/design.md, "Models and training".

Every way a checkpoint can be unreadable (missing, empty, truncated, garbage, another format)
raises :class:`CheckpointError`, a ``ValueError`` that names the file and says what to do.
Sweeps catch it to rerun the point whose checkpoint is bad.
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

#: Entries every training checkpoint has (``resumes`` was added later and is optional).
REQUIRED_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, empty, truncated, not a resode checkpoint.

    The message names the file and what to do (delete it, or start the run afresh with
    ``resume=False``). ``path`` holds the file.
    """

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None) -> None:
        self.path = Path(path)
        if hint is None:
            hint = (
                f"Delete it (or its run folder {self.path.parent}) and run again, or start the "
                "run afresh with resume=False."
            )
        super().__init__(f"unreadable checkpoint {self.path}: {problem}. {hint}")


class ResumeMismatchError(ValueError):
    """A run cannot resume from its checkpoint: the new config (or model) changes what the
    checkpoint's run was. The message lists each difference and what to do (another
    ``out_dir``, or start afresh with ``resume=False``). The checkpoint itself is fine."""


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


def read_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of ``path`` on the CPU, every failure a :class:`CheckpointError` naming the
    file (missing, empty, truncated, garbage). No check of what the file holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            path, "no such file", "Check the path: a run writes <out_dir>/checkpoint.pt after "
            "each epoch."
        )  # fmt: skip
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (a write was interrupted?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, unpickling errors, ...
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch's first sentence
        raise CheckpointError(
            path, f"torch.load failed ({type(e).__name__}: {first}); the file is truncated or "
            "not a checkpoint"
        ) from e  # fmt: skip


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`resode.train.train` (tensors on the CPU).

    Raises:
        CheckpointError: the file is missing, empty, truncated or garbage, is not a resode
            training checkpoint, or lacks one of :data:`REQUIRED_KEYS`.
    """
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a resode training checkpoint ({CHECKPOINT_FORMAT})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"entries {missing} are missing")
    return ckpt


def model_from_checkpoint(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model from a checkpoint alone (its stored :class:`ModelConfig`) and load its
    weights.

    Raises:
        CheckpointError: unreadable file, no model config (the model was not built by the
            registry), or weights that do not fit the rebuilt model.
    """
    ckpt = load_checkpoint(path)
    if not ckpt.get("model_config"):
        raise CheckpointError(path, "no model config (the model was not built by the registry)")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = create(cfg.name, cfg.kwargs)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(path, f"its weights do not fit {cfg!r}: {e}") from None
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
