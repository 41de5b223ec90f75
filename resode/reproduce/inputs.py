"""The inputs of the experiment commands, checked once before anything runs.

Each check raises :class:`UsageError` with one line that names the bad value and the fix; the
``resode`` command prints it and exits with status 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .sweeps import LAUNCHERS

#: the settings the commands know: every experiment declares smoke, quick and paper; ``gpu``
#: (one GPU, minutes) falls back to an experiment's quick settings where it has none
#: (see :class:`resode.reproduce.experiment.Experiment`)
PRESETS: tuple[str, ...] = ("smoke", "quick", "paper", "gpu")


class UsageError(ValueError):
    """A bad input to an experiment command; the message says how to fix it."""


def check_preset(preset: str, available: tuple[str, ...] | list[str] = PRESETS) -> str:
    if preset not in available:
        raise UsageError(f"unknown preset {preset!r}; choose one of {list(available)}")
    return preset


def check_launcher(launcher: str | None) -> str | None:
    if launcher is not None and launcher not in LAUNCHERS:
        raise UsageError(f"unknown launcher {launcher!r}; choose one of {list(LAUNCHERS)}")
    return launcher


def default_launcher(preset: str) -> str:
    """``inline`` (one process, fast, used by CI) for smoke/quick; submitit ``local`` for paper;
    for gpu ``torchrun`` (data-parallel training points) when several GPUs are visible, else
    ``inline``."""
    if preset == "paper":
        return "local"
    if preset == "gpu" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return "torchrun"
    return "inline"


def check_preset_device(preset: str, device: str | None) -> None:
    """The ``gpu`` preset with ``--device auto`` needs a visible GPU (``--device cpu`` forces the
    CPU, e.g. to test it)."""
    if preset == "gpu" and device in (None, "auto") and not torch.cuda.is_available():
        raise UsageError(
            "--preset gpu needs a CUDA GPU and none is visible here; use --preset quick on the "
            "CPU (or --device cpu to run the gpu settings on the CPU anyway)"
        )


def check_max_steps(max_steps: int | None) -> int | None:
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise UsageError(f"--max-steps must be a positive number of steps, got {max_steps!r}")
    return max_steps


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, then ``cuda:0``... and ``mps`` if present."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


def check_device(name: str | None) -> str:
    """The device ``name`` (``auto``: CUDA when a GPU is visible, else ``cpu``), checked against
    :func:`available_devices`. A CUDA name without an index is kept as given (``cuda``), so
    ``torchrun`` can place each process on its own GPU."""
    avail = available_devices()
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {name!r} is not a device name; available here: {', '.join(avail)}"
        ) from None
    ok = dev.type == "cpu" or (
        f"{dev.type}:{dev.index or 0}" in avail if dev.type == "cuda" else dev.type in avail
    )
    if not ok:
        raise UsageError(
            f"--device {name!r} is not available on this machine; available: {', '.join(avail)}"
            + ("" if torch.cuda.is_available() else " (no GPU visible: use --device cpu)")
        )
    return str(name)


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` as a directory that exists (created if needed) and can be written to."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UsageError(
            f"--out {str(out)!r} cannot be written ({why}); choose a writable directory"
        ) from None
    return path


def check_data_root(data_root: str | os.PathLike | None) -> str | None:
    """``data_root`` if it is an existing directory (``None`` passes: use the defaults)."""
    if data_root is None:
        return None
    path = Path(data_root).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise UsageError(
            f"--data-root {str(data_root)!r} {what}; give the folder that holds the datasets "
            "(or leave it out to use $RESODE_DATA and the default locations)"
        )
    return str(data_root)
