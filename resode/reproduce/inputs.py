"""The inputs of the experiment commands: presets and launchers.

Each check raises :class:`UsageError` with one line that names the bad value and the fix.
"""

from __future__ import annotations

from .sweeps import LAUNCHERS

#: the settings every experiment declares (see :class:`resode.reproduce.experiment.Experiment`)
PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")


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
    """``inline`` (one process, fast, used by CI) for smoke/quick; submitit ``local`` for paper."""
    return "local" if preset == "paper" else "inline"
