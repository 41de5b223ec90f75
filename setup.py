"""Build resode._C (fused residual stages) with torch.utils.cpp_extension.

The build logic (sources, flags, CUDA toolkit discovery, environment variables) lives in
resode/_build.py, shared with the JIT loader; it is imported here by path, because the package
is not installed yet. C++ (CPU) always; CUDA as well when a CUDA toolkit and a CUDA-enabled torch
are present, or with RESODE_FORCE_CUDA=1 (compiles the CUDA sources without a GPU).

    pip install --no-build-isolation -e .
"""

import importlib.util
import os

from setuptools import setup

try:
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - build-time message
    raise RuntimeError(
        "building resode._C needs torch installed first; use "
        "`pip install --no-build-isolation -e .`"
    ) from e

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    path = os.path.join(HERE, "resode", "_build.py")
    spec = importlib.util.spec_from_file_location("resode_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup(
    ext_modules=[_load_build_module().setup_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
