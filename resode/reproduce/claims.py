"""Claims of the paper, the evidence measured for them, and their verdicts.

A :class:`Claim` carries the paper's statement, a sentence of evidence with numbers, a headline
number, a verdict (one of :data:`VERDICTS`), the rule that turned the numbers into the verdict
and, for an effect measured over several seeds, its spread. :func:`seed_stats` and
:func:`verdict_above_noise` judge such an effect against its spread (the one rule every training
claim uses); :func:`above_noise` gives the verdict, the rule and the spread as keyword arguments
of :class:`Claim`, so the report shows ``mean +- std (n seeds)`` beside the verdict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

VERDICTS: tuple[str, ...] = ("reproduced", "not reproduced", "inconclusive", "partial", "not run")


@dataclasses.dataclass
class Claim:
    """One claim of the paper with the evidence measured here.

    Attributes:
        key: short id (unique inside an experiment).
        text: the paper's claim, in words.
        evidence: what was measured, with numbers (a sentence).
        value: the headline number (``None`` when not run).
        verdict: one of :data:`VERDICTS`; a non-finite ``value`` is never ``"reproduced"``.
        rule: how the verdict follows from the numbers, in words.
        spread: :func:`seed_stats` of the effect the verdict judges, when it was measured over
            seeds (``None`` for a single measurement); the report shows mean +- std.
    """

    key: str
    text: str
    evidence: str
    value: float | None
    verdict: str
    rule: str = ""
    spread: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.value is not None and not math.isfinite(float(self.value)):
            self.value = float(self.value)
            if self.verdict == "reproduced":
                self.verdict = "not reproduced"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verdict(ok: bool | None) -> str:
    """``"reproduced"`` / ``"not reproduced"`` for a yes/no rule, ``"not run"`` for ``None``."""
    if ok is None:
        return "not run"
    return "reproduced" if ok else "not reproduced"


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count over seeds."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("seed_stats needs at least one value")
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}  # fmt: skip


def verdict_above_noise(effects: Sequence[float], k: float = 1.0) -> tuple[str, str]:
    """Verdict on an effect measured once per seed (positive = the paper's claim holds).

    ``reproduced`` when ``mean > k * std``, ``not reproduced`` when ``mean < -k * std``,
    ``inconclusive`` otherwise and whenever fewer than two seeds were run (no spread to compare
    with). Returns ``(verdict, rule)``, the rule in words for the report.
    """
    st = seed_stats(effects)
    rule = (f"effect mean {st['mean']:+.3g} vs {k:g} x seed std {st['std']:.3g} over "
            f"{st['n']} seeds: above = reproduced, below minus = not reproduced, else "
            "inconclusive")  # fmt: skip
    if st["n"] < 2:
        return "inconclusive", rule + " (one seed: no spread to compare with)"
    if st["mean"] > k * st["std"]:
        return "reproduced", rule
    if st["mean"] < -k * st["std"]:
        return "not reproduced", rule
    return "inconclusive", rule


def above_noise(effects: Sequence[float], k: float = 1.0, prefix: str = "") -> dict[str, Any]:
    """``{"verdict", "rule", "spread"}`` of :func:`verdict_above_noise` and :func:`seed_stats`
    for the per-seed ``effects`` (``prefix`` says what the effect is, before the rule):
    ``Claim(key=..., text=..., evidence=..., value=..., **above_noise(effects, prefix=...))``."""
    v, rule = verdict_above_noise(effects, k)
    return {"verdict": v, "rule": prefix + rule, "spread": seed_stats(effects)}


def spread_text(spread: dict[str, float] | None) -> str:
    """``"+0.012 +- 0.004 (3 seeds)"`` of a :func:`seed_stats` dict; ``"-"`` for ``None``."""
    if not spread:
        return "-"
    n = int(spread["n"])
    return f"{spread['mean']:+.3g} +- {spread['std']:.2g} ({n} seed{'s' if n != 1 else ''})"
