"""Which engine runs a model's residual stages: the generic ``ResidualStack`` or a fused stage.

Every model takes ``engine=``: ``"generic"`` (pure PyTorch, the reference), ``"fused"`` (the
C++/CUDA stage of :mod:`resode.fused`; an error when it cannot run or has no equivalent) or
``"auto"`` (fused when the extension runs here, else generic). The fused stage is always built
from the generic one (``from_generic``), so both engines start from the same weights for the
same seed. See docs/design.md, "Engines".
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import _ext
from ..stack import ResidualStack

#: the values of every model's ``engine`` keyword
ENGINES = ("auto", "generic", "fused")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    return engine


def fused_available() -> bool:
    """Can fused stages run wherever this model may go: the CPU, and CUDA too when a GPU is
    visible (a model is built on the CPU and may be moved to the GPU afterwards)."""
    # Lazy import: resode.fused imports resode.stack and the blocks of resode.models, so it
    # cannot be imported while resode.models initialises (an import cycle).
    from .. import fused

    ok = fused.available_for("cpu")
    if ok and torch.cuda.is_available():
        ok = fused.available_for("cuda")
    return ok


def _warn_generic_fallback() -> None:
    """``engine="auto"`` falls back to the generic engine: say so once, unless the extension was
    turned off on purpose (``RESODE_DISABLE_EXTENSION=1``). When the library failed to load,
    :func:`resode._ext.load` has already warned once, naming the cause."""
    status = _ext.load()
    if status.disabled or not status.cpu:
        return
    why = status.reason or "no kernels for a visible device"
    warnings.warn(
        "resode: engine='auto' builds generic stages (same numbers, slower): the fused "
        f"extension cannot run on every device of this machine ({why}). Build it "
        "with its CUDA kernels (`pip install --no-build-isolation -e .` with a CUDA toolkit), "
        "or pass engine='generic' to choose the generic engine on purpose.",
        RuntimeWarning,
        stacklevel=4,
    )


def select_engine(stack: ResidualStack, engine: str, fused_name: str) -> nn.Module:
    """``stack`` itself or the fused stage ``resode.fused.<fused_name>`` built from it.

    Args:
        stack: the generic stage (the reference, already initialised; its backward mode,
            ``refine``, ``tol`` and step carry over to the fused stage).
        engine: ``"generic"``, ``"fused"`` or ``"auto"`` (see the module docstring).
        fused_name: the fused stage class of :mod:`resode.fused` equivalent to ``stack``.

    Raises:
        RuntimeError: ``engine="fused"`` without a usable extension.

    With ``engine="auto"`` and no usable extension one warning says why the generic engine runs
    (none when ``RESODE_DISABLE_EXTENSION=1`` turned the extension off). Errors while building
    the fused stage are not hidden: they are bugs.
    """
    check_engine(engine)
    if engine == "generic":
        return stack
    if not fused_available():
        if engine == "fused":
            raise RuntimeError(
                "engine='fused' needs the compiled extension (resode._C), which is not available; "
                "build it (pip install -e .) or use engine='generic'"
            )
        _warn_generic_fallback()
        return stack
    from .. import fused  # lazy, see fused_available

    # The fused constructor initialises (then overwrites) its parameters: keep the global RNG
    # where the generic engine leaves it, so the layers built after this stage get the same
    # weights under both engines for the same seed.
    with torch.random.fork_rng(devices=[]):
        return getattr(fused, fused_name).from_generic(stack)


def no_fused_engine(engine: str, family: str) -> str:
    """For model families without a fused stage: ``"auto"`` means generic, ``"fused"`` is an
    error."""
    check_engine(engine)
    if engine == "fused":
        raise ValueError(
            f"engine='fused': the residual functions of {family} have no fused stage "
            "(resode.fused has the MLP block and the tiny ResNet's conv block); "
            "use engine='generic' or 'auto'"
        )
    return "generic"
