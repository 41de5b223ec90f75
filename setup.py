"""Build resode._C (fused residual stages) with torch.utils.cpp_extension.

C++ (CPU) always. CUDA as well when a CUDA toolkit (CUDA_HOME / nvcc) and a CUDA-enabled torch
are present, or when RESODE_FORCE_CUDA=1 (compiles the CUDA sources without a GPU).
RESODE_NO_CUDA=1 forces a CPU-only build; RESODE_REQUIRE_CUDA_BUILD=1 (CI) fails when
the CUDA sources would be skipped. TORCH_CUDA_ARCH_LIST picks the GPU architectures
(default "9.0": H100 / H200). MAX_JOBS limits the parallel compile jobs.

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - build-time message
    raise RuntimeError(
        "building resode._C needs torch installed first; use "
        "`pip install --no-build-isolation -e .`"
    ) from e

HERE = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home():
    """The CUDA toolkit root (with bin/nvcc and lib64/libcudart.so). torch guesses it from
    `which nvcc`, which is wrong for a wrapper such as /usr/local/bin/nvcc (-> /usr/local)."""
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
            libs = glob.glob(os.path.join(c, "lib*", "libcudart.so*"))
            if libs:
                return c
    return next((c for c in candidates if c), None)


def _want_cuda():
    if os.environ.get("RESODE_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("RESODE_FORCE_CUDA", "0") == "1":
        return True
    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def _nvidia_include_dirs():
    """Header dirs of the pip-installed CUDA wheels (cuBLAS, cuSPARSE, ... in nvidia/cu13/include):
    torch's CUDA headers include cuBLAS headers that a bare nvcc toolkit may lack."""
    dirs = []
    try:
        import nvidia

        for root in list(nvidia.__path__):
            dirs += sorted(glob.glob(os.path.join(root, "cu[0-9]*", "include")))
    except ImportError:
        pass
    return [d for d in dirs if os.path.isdir(d)]


def extensions():
    # Keep in sync with resode/_ext.py (JIT build).
    if os.environ.get("RESODE_REQUIRE_CUDA_BUILD", "0") == "1" and not _want_cuda():
        raise RuntimeError(
            "RESODE_REQUIRE_CUDA_BUILD=1 but the CUDA sources would not be built: set CUDA_HOME "
            "to a CUDA toolkit (with nvcc) or RESODE_FORCE_CUDA=1, and unset RESODE_NO_CUDA"
        )
    sources = [os.path.join("csrc", "stack_ops.cpp"), os.path.join("csrc", "kernels_cpu.cpp")]
    # `omp simd` pragmas only: -fopenmp-simd needs no OpenMP runtime (torch brings its own).
    cxx = ["-O3", "-fopenmp-simd"]
    ldflags = []
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cuda_home = _resolve_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
            cpp_extension.CUDA_HOME = cuda_home  # read by CUDAExtension / BuildExtension
        sources.append(os.path.join("csrc", "kernels_cuda.cu"))
        return [
            cpp_extension.CUDAExtension(
                "resode._C",
                sources,
                include_dirs=[os.path.join(HERE, "csrc")] + _nvidia_include_dirs(),
                library_dirs=[
                    d
                    for d in (
                        os.path.join(cuda_home or "", "lib64"),
                        os.path.join(cuda_home or "", "lib"),
                    )
                    if cuda_home and os.path.isdir(d)
                ],
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                extra_link_args=ldflags,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "resode._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
