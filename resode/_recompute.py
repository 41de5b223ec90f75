"""The rules every recomputation of a residual stage follows (generic stage, adjoints, diagnostics).

* :func:`frozen_batchnorm_stats` -- training-mode BatchNorm recomputes with batch statistics but
  leaves its running statistics alone (they are updated once per forward evaluation, never by a
  backward or a diagnostic).
* :func:`seeded_rng` / :func:`mix_seed` -- random layers (dropout) replay the same numbers when a
  block evaluation is recomputed: each evaluation draws from its own stream, seeded from one
  per-forward seed, the step and the block index.

Imported by :mod:`resode.stack`, :mod:`resode._adjoint` and :mod:`resode.diagnostics`; imports
nothing of resode (see docs/design.md, "Data flow").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Training-mode BatchNorm uses batch statistics but leaves its running statistics alone.

    Used for every recomputation of the adjoint backward: running statistics are updated once per
    forward evaluation, never by the backward. ``.training`` is not touched; the BN layers only
    stop tracking for the duration.
    """
    frozen = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
                m.track_running_stats = False
                frozen.append(m)
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


def mix_seed(base: int, step: int, block: int) -> int:
    """The seed of block ``block``'s evaluation in step ``step`` of a forward seeded ``base``."""
    return (base * 1_000_003 + step * 65_537 + block * 257 + 1) % (2**63 - 1)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run under a forked RNG seeded with ``seed`` on ``device`` (the global stream is kept)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
