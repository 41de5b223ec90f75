"""How ``resode._C`` is built: sources, compiler flags, CUDA toolkit discovery.

One module for both builds: ``setup.py`` (ahead-of-time, ``pip install --no-build-isolation -e
.``) and the JIT loader :mod:`resode._ext` (``torch.utils.cpp_extension.load``). ``setup.py`` runs
before the package is installed and imports this file by path, so it imports neither the
``resode`` package nor anything else of it, and has no import-time side effects.

Environment (``1``/``true``/``yes``/``on``):

* ``RESODE_NO_CUDA``: CPU kernels only.
* ``RESODE_FORCE_CUDA``: compile the CUDA sources even without a GPU (CI does).
* ``RESODE_REQUIRE_CUDA_BUILD``: ``setup.py`` fails when the CUDA sources would be skipped.
* ``TORCH_CUDA_ARCH_LIST`` (default ``"9.0"``: H100 / H200), ``MAX_JOBS``: as for torch.

See docs/design.md, "The extension".
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

#: the C++ sources, relative to the repository root
CSRC = "csrc"
CPU_SOURCES = ("ops.cpp", "blocks.cpp", "graphs.cpp", "kernels.cpp", "kernels_cpu.cpp")
CUDA_SOURCES = ("kernels_cuda.cu", "mlp_persistent.cu")
#: ``omp simd`` pragmas only: -fopenmp-simd needs no OpenMP runtime (torch brings its own)
CXX_FLAGS = ("-O3", "-fopenmp-simd")
NVCC_FLAGS = ("-O3",)
DEFAULT_CUDA_ARCH = "9.0"


def repo_root() -> Path:
    """The source checkout this file belongs to (``csrc/`` lives there)."""
    return Path(__file__).resolve().parent.parent


def env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sources(with_cuda: bool, root: Path | None = None) -> list[str]:
    """Source paths: relative to the repository root (``root=None``, for setup.py) or absolute."""
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    base = Path(CSRC) if root is None else root / CSRC
    return [str(base / n) for n in names]


def cuda_home() -> str | None:
    """The CUDA toolkit root (with bin/nvcc and lib*/libcudart.so*).

    torch guesses it from ``which nvcc``, which is wrong for a wrapper script such as
    /usr/local/bin/nvcc (it would give /usr/local).
    """
    from torch.utils import cpp_extension

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


def want_cuda(need_gpu: bool) -> bool:
    """Build the CUDA sources? ``RESODE_NO_CUDA`` / ``RESODE_FORCE_CUDA`` decide first; else a
    CUDA torch and a toolkit are needed (and a visible GPU when ``need_gpu``: the JIT build)."""
    import torch
    from torch.utils import cpp_extension

    if env_on("RESODE_NO_CUDA"):
        return False
    if env_on("RESODE_FORCE_CUDA"):
        return True
    found = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    return found and (torch.cuda.is_available() or not need_gpu)


def nvidia_include_dirs() -> list[str]:
    """Header folders of the pip CUDA wheels (cuBLAS, cuSPARSE, ... in nvidia/cu13/include):
    torch's CUDA headers include cuBLAS headers that a bare nvcc toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = [str(p) for root in nvidia.__path__ for p in sorted(Path(root).glob("cu[0-9]*/include"))]
    return [d for d in dirs if os.path.isdir(d)]


def prepare_cuda() -> str | None:
    """Point torch's extension builder at the toolkit (CUDA_HOME, default arch list)."""
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH)
    home = cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home  # read by CUDAExtension / load() for nvcc and -L<home>/lib64
    return home


def setup_extension():
    """The ``resode._C`` extension for ``setup.py`` (CPU, plus CUDA when :func:`want_cuda`)."""
    from torch.utils import cpp_extension

    with_cuda = want_cuda(need_gpu=False)
    if env_on("RESODE_REQUIRE_CUDA_BUILD") and not with_cuda:
        raise RuntimeError(
            "RESODE_REQUIRE_CUDA_BUILD=1 but the CUDA sources would not be built: set CUDA_HOME "
            "to a CUDA toolkit (with nvcc) or RESODE_FORCE_CUDA=1, and unset RESODE_NO_CUDA"
        )
    include = [str(repo_root() / CSRC)]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "resode._C",
            sources(False),
            include_dirs=include,
            extra_compile_args={"cxx": list(CXX_FLAGS)},
        )
    home = prepare_cuda()
    libs = [os.path.join(home, d) for d in ("lib64", "lib")] if home else []
    return cpp_extension.CUDAExtension(
        "resode._C",
        sources(True),
        include_dirs=include + nvidia_include_dirs(),
        library_dirs=[d for d in libs if os.path.isdir(d)],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
    )


def jit_options(build_directory: str | os.PathLike, verbose: bool = False) -> dict:
    """Keyword arguments of ``torch.utils.cpp_extension.load`` for the JIT build of ``csrc/``."""
    import torch

    root = repo_root()
    missing = [s for s in sources(False, root) if not os.path.exists(s)]
    if missing:
        raise RuntimeError(f"no C++ sources to JIT-build resode._C: {missing[0]} is missing")
    with_cuda = want_cuda(need_gpu=True)
    if with_cuda:
        prepare_cuda()
    define = ["-DWITH_CUDA"] if with_cuda else []
    tag = "cuda" if with_cuda else "cpu"
    build_dir = Path(build_directory) / f"torch{torch.__version__.replace('+', '_')}_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        name=f"resode_C_{tag}",
        sources=sources(with_cuda, root),
        extra_cflags=list(CXX_FLAGS) + define,
        extra_cuda_cflags=list(NVCC_FLAGS) + define,
        extra_include_paths=[str(root / CSRC)] + (nvidia_include_dirs() if with_cuda else []),
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
