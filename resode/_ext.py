"""Loading the compiled extension ``resode._C`` (fused stages), lazily and at most once.

Order of attempts on the first call of :func:`load` (nothing happens at import time):

1. ``RESODE_DISABLE_EXTENSION=1``: the extension is off; the generic engine runs (no warning).
2. The prebuilt module ``resode._C`` (``pip install --no-build-isolation -e .`` or a wheel).
3. A JIT build of ``csrc/`` with :func:`torch.utils.cpp_extension.load` (ninja), cached under
   ``$RESODE_CACHE_DIR`` (default ``~/.cache/resode/torch_extensions``), when the sources are
   there (source checkout / editable install). The CUDA sources join the JIT build when a GPU, a
   CUDA toolkit and a CUDA torch are present (or ``RESODE_FORCE_CUDA=1``).
   ``RESODE_NO_JIT=1`` skips this step.
4. Otherwise the generic engine runs, and one warning says why.

:func:`extension_available` reports what loaded; it is falsy when the extension is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES_CPU = ("stack_ops.cpp", "kernels_cpu.cpp")
_SOURCES_CUDA = ("kernels_cuda.cu",)


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    """What :func:`extension_available` reports. ``bool(status)`` is ``status.cpu``.

    Attributes:
        cpu: the fused CPU kernels can run.
        cuda: the fused CUDA kernels can run (built with CUDA and a GPU is visible).
        source: ``"prebuilt"`` (``resode._C``), ``"jit"`` or ``None``.
        reason: why the extension (or its CUDA part) is unavailable, else ``None``.
    """

    cpu: bool
    cuda: bool
    source: str | None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.cpu

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _ops_registered() -> bool:
    try:
        torch.ops.resode.mlp_forward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _cuda_wheel_include_dirs() -> list[str]:
    """cuBLAS & co. headers of the pip CUDA wheels (nvidia/cu13/include), as in setup.py."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(str(p) for root in nvidia.__path__ for p in Path(root).glob("cu[0-9]*/include"))


def _cuda_home(cpp_extension) -> str | None:
    """Toolkit root with bin/nvcc and libcudart (torch's guess from `which nvcc` is wrong for
    wrapper scripts such as /usr/local/bin/nvcc); same rule as setup.py."""
    import glob
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
        "/usr/local/cuda",
        cpp_extension.CUDA_HOME,
    ]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")):
            if glob.glob(os.path.join(c, "lib*", "libcudart.so*")):
                return c
    return next((c for c in candidates if c), None)


def _jit_build() -> None:
    from torch.utils import cpp_extension

    if not all((_CSRC / s).exists() for s in _SOURCES_CPU):
        raise RuntimeError(f"no prebuilt resode._C and no C++ sources under {_CSRC} to JIT-build")
    with_cuda = _env_on("RESODE_FORCE_CUDA") or (
        torch.cuda.is_available()
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    sources = [str(_CSRC / s) for s in _SOURCES_CPU]
    if with_cuda:
        sources += [str(_CSRC / s) for s in _SOURCES_CUDA]
        home = _cuda_home(cpp_extension)
        if home:
            cpp_extension.CUDA_HOME = home  # read by load() for nvcc and -L<home>/lib64
    cache = Path(
        os.environ.get("RESODE_CACHE_DIR", Path.home() / ".cache" / "resode" / "torch_extensions")
    )
    tag = f"torch{torch.__version__.replace('+', '_')}_{'cuda' if with_cuda else 'cpu'}"
    build_dir = cache / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="resode_C_" + ("cuda" if with_cuda else "cpu"),
        sources=sources,
        extra_cflags=["-O3", "-fopenmp-simd"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
        extra_ldflags=[],
        extra_include_paths=[str(_CSRC)] + (_cuda_wheel_include_dirs() if with_cuda else []),
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=_env_on("RESODE_VERBOSE_BUILD"),
    )


@functools.cache
def _load() -> ExtensionStatus:
    if _env_on("RESODE_DISABLE_EXTENSION"):
        return ExtensionStatus(False, False, None, "disabled by RESODE_DISABLE_EXTENSION=1")
    source = None
    errors = []
    if _ops_registered():
        source = "prebuilt"
    else:
        try:
            importlib.import_module("resode._C")
            source = "prebuilt"
        except ImportError as e:
            errors.append(f"import resode._C failed ({e})")
    if source is None and not _env_on("RESODE_NO_JIT"):
        try:
            _jit_build()
            source = "jit"
        except Exception as e:  # noqa: BLE001 - any build failure means: run the generic engine
            errors.append(f"JIT build failed ({type(e).__name__}: {str(e).strip()[:500]})")
    elif source is None:
        errors.append("JIT build skipped (RESODE_NO_JIT=1)")
    if source is None or not _ops_registered():
        reason = "; ".join(errors) or "resode ops not registered"
        warnings.warn(
            f"resode: the fused C++/CUDA extension is unavailable, the generic engine runs "
            f"instead (same numbers, slower). Reason: {reason}. Build it with "
            f"`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ExtensionStatus(False, False, None, reason)
    _register_fakes()
    built_cuda = bool(torch.ops.resode.has_cuda())
    cuda = built_cuda and torch.cuda.is_available()
    reason = None
    if not built_cuda:
        reason = "built without CUDA (CPU kernels only)"
    elif not cuda:
        reason = "built with CUDA but no GPU is visible"
    return ExtensionStatus(True, cuda, source, reason)


def load() -> ExtensionStatus:
    """Load the extension once (see the module docstring); returns its status."""
    return _load()


def extension_available() -> ExtensionStatus:
    """Is ``resode._C`` loaded, for CPU and for CUDA? Falsy when the generic engine must run.

    Loads the extension on first call (prebuilt, else JIT build), warning once if it cannot.
    """
    return _load()


def ops():
    """``torch.ops.resode``, raising a clear error when the extension is unavailable."""
    status = _load()
    if not status.cpu:
        raise RuntimeError(
            f"resode fused stages need the compiled extension resode._C: {status.reason}. "
            "Build it with `pip install --no-build-isolation -e .`, or use the generic engine "
            "(stage.to_generic() / resode.ResidualStack)."
        )
    return torch.ops.resode


def _register_fakes() -> None:
    """Fake (meta) kernels: output shapes of the ops, for tracing (torch.compile, FakeTensor)."""
    lib = torch.library

    def _evals(scheme: int, depth: int) -> int:
        return depth if scheme == 0 else 2 * (depth - 1)

    def mlp_forward(x, w1, b1, w2, b2, act, scheme, h, depth, save):
        out = torch.empty_like(x)
        if not save:
            return out, []
        e, (b, d), hid = _evals(scheme, depth), x.shape, w1.shape[1]
        kinds = 3 if act == 2 else 2  # inputs, activations [, pre-activations]
        saved = [x.new_empty(b, d) for _ in range(e)]
        return out, saved + [x.new_empty(b, hid) for _ in range((kinds - 1) * e)]

    def mlp_backward(grad, out, saved, w1, b1, w2, b2, act, scheme, h, depth, mode):
        none = grad.new_empty(0)
        return [
            torch.empty_like(grad),
            torch.empty_like(w1),
            torch.empty_like(b1) if b1 is not None else none,
            torch.empty_like(w2),
            torch.empty_like(b2) if b2 is not None else none,
        ]

    def conv_forward(x, params, running, scheme, h, depth, training, update, mom, eps, save):
        out = torch.empty_like(x)
        counts = torch.empty(params[0].shape[0], dtype=torch.long)
        if not save:
            return out, [], counts
        e, c = _evals(scheme, depth), x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        big = [torch.empty_like(x) for _ in range(4 * e)]
        return out, big + [x.new_empty(e, c, dtype=acc), x.new_empty(e, c, dtype=acc)], counts

    def conv_backward(grad, out, saved, params, running, scheme, h, depth, training, eps, mode):
        return [torch.empty_like(grad)] + [torch.empty_like(p) for p in params]

    for name, fn in (
        ("mlp_forward", mlp_forward),
        ("mlp_backward", mlp_backward),
        ("conv_forward", conv_forward),
        ("conv_backward", conv_backward),
    ):
        try:
            lib.register_fake(f"resode::{name}")(fn)
        except RuntimeError:  # already registered (e.g. module reloaded)
            pass
