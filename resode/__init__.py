"""resode: residual networks as discretised Neural ODEs.

Residual stages run as Euler or Heun schemes, with an exact backward (autograd) or the
memory-free reconstruction adjoint, following Sander, Ablin & Peyre, "Do Residual Neural
Networks discretize Neural Ordinary Differential Equations?" (NeurIPS 2022).

Layout (docs/design.md, "Data flow"): ``schemes`` (step rules), ``stack`` (``Stage``, the generic
``ResidualStack``), ``_adjoint`` (the reconstruction adjoint and its ``BackwardReport``),
``_auto`` (``backward="auto"``), ``fused`` (C++/CUDA stages), ``models`` (registry),
``diagnostics``, ``check`` (the ``resode check`` command), ``data``, ``train``, ``utils``.
"""

from . import data, diagnostics, fused, models, schemes, train, utils
from ._ext import extension_available
from .models import ModelConfig
from .schemes import Scheme, get_scheme, list_schemes
from .stack import (
    BACKWARD_MODES,
    BackwardReport,
    ResidualStack,
    Stage,
    backward_mode,
    backward_reports,
    set_backward,
    stages,
)
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "BACKWARD_MODES",
    "BackwardReport",
    "ModelConfig",
    "TrainConfig",
    "ResidualStack",
    "Scheme",
    "Stage",
    "backward_mode",
    "backward_reports",
    "data",
    "diagnostics",
    "extension_available",
    "fused",
    "get_scheme",
    "list_schemes",
    "models",
    "schemes",
    "set_backward",
    "stages",
    "train",
    "utils",
]
