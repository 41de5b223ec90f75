"""Finding, building and loading the compiled extension ``resode._C``, lazily and at most once.

This module only loads the library; the ops themselves (Python wrappers, fake kernels, autograd
formulas) are in :mod:`resode._ops`, the build recipe in :mod:`resode._build`.

Order of attempts on the first call of :func:`load` (nothing happens at import time):

1. ``RESODE_DISABLE_EXTENSION=1``: the extension is off (no warning; the status says why).
2. The prebuilt module ``resode._C`` (``pip install --no-build-isolation -e .`` or a wheel).
3. A JIT build of ``csrc/`` with :func:`torch.utils.cpp_extension.load` (ninja), cached under
   ``$RESODE_CACHE_DIR`` (default ``~/.cache/resode/torch_extensions``), when the sources are
   there (source checkout / editable install). The CUDA sources join the JIT build when a GPU, a
   CUDA toolkit and a CUDA torch are present (or ``RESODE_FORCE_CUDA=1``).
   ``RESODE_NO_JIT=1`` skips this step.
4. Otherwise the extension is unavailable, and one warning says why.

:func:`extension_available` reports what loaded; it is falsy when the extension is missing.
Models built with ``engine="auto"`` then use the generic engine; a fused stage raises a clear
error when it runs (see :mod:`resode.fused`). docs/design.md, "The extension".
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from pathlib import Path

import torch

from . import _build


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    """What :func:`extension_available` reports. ``bool(status)`` is ``status.cpu``.

    Attributes:
        cpu: the fused CPU kernels can run.
        cuda: the fused CUDA kernels can run (built with CUDA and a GPU is visible).
        source: ``"prebuilt"`` (``resode._C``), ``"jit"`` or ``None``.
        reason: why the extension (or its CUDA part) is unavailable, else ``None``.
        disabled: turned off on purpose (``RESODE_DISABLE_EXTENSION=1``): nothing warns.
    """

    cpu: bool
    cuda: bool
    source: str | None
    reason: str | None = None
    disabled: bool = False

    def __bool__(self) -> bool:
        return self.cpu

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _ops_registered() -> bool:
    try:
        torch.ops.resode.mlp_forward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    cache = os.environ.get(
        "RESODE_CACHE_DIR", str(Path.home() / ".cache" / "resode" / "torch_extensions")
    )
    options = _build.jit_options(cache, verbose=_build.env_on("RESODE_VERBOSE_BUILD"))
    cpp_extension.load(**options)


def _find_library() -> tuple[str | None, list[str]]:
    """Load the library (prebuilt, else JIT); returns its source and the failures on the way."""
    errors = []
    if _ops_registered():
        return "prebuilt", errors
    try:
        importlib.import_module("resode._C")
        return "prebuilt", errors
    except ImportError as e:
        errors.append(f"import resode._C failed ({e})")
    if _build.env_on("RESODE_NO_JIT"):
        errors.append("JIT build skipped (RESODE_NO_JIT=1)")
        return None, errors
    try:
        _jit_build()
        return "jit", errors
    except Exception as e:  # noqa: BLE001 - any build failure means: no extension
        errors.append(f"JIT build failed ({type(e).__name__}: {str(e).strip()[:500]})")
        return None, errors


@functools.cache
def _load() -> ExtensionStatus:
    if _build.env_on("RESODE_DISABLE_EXTENSION"):
        reason = "disabled by RESODE_DISABLE_EXTENSION=1"
        return ExtensionStatus(False, False, None, reason, disabled=True)
    source, errors = _find_library()
    if source is None or not _ops_registered():
        reason = "; ".join(errors) or "resode ops not registered"
        warnings.warn(
            f"resode: the fused C++/CUDA extension is unavailable ({reason}); fused stages "
            "cannot run and models built with engine='auto' use the generic engine (same "
            "numbers, slower). Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ExtensionStatus(False, False, None, reason)
    built_cuda = bool(torch.ops.resode.has_cuda())
    cuda = built_cuda and torch.cuda.is_available()
    reason = None
    if not built_cuda:
        reason = "built without CUDA (CPU kernels only)"
    elif not cuda:
        reason = "built with CUDA but no GPU is visible"
    return ExtensionStatus(True, cuda, source, reason)


# torch.compile: dynamo calls these at trace time and takes the status as a constant (instead
# of tracing into the loading code).
@torch.compiler.assume_constant_result
def load() -> ExtensionStatus:
    """Load the extension once (see the module docstring); returns its status."""
    return _load()


@torch.compiler.assume_constant_result
def extension_available() -> ExtensionStatus:
    """Is ``resode._C`` loaded, for CPU and for CUDA? Falsy when the generic engine must run.

    Loads the extension on first call (prebuilt, else JIT build), warning once if it cannot.
    """
    return _load()
