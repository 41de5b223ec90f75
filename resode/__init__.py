"""resode: residual networks as discretised Neural ODEs.

Residual stages run as Euler or Heun schemes, with an exact backward (autograd) or the
memory-free reconstruction adjoint, following Sander, Ablin & Peyre, "Do Residual Neural
Networks discretize Neural Ordinary Differential Equations?" (NeurIPS 2022).

Layout (docs/design.md, "Data flow"): ``schemes`` (step rules), ``stack`` (``Stage``, the generic
``ResidualStack``), ``_adjoint`` (the reconstruction adjoint), ``fused`` (C++/CUDA stages),
``models`` (registry), ``diagnostics``, ``data``, ``train``, ``utils``.
"""

from . import data, diagnostics, fused, models, schemes, train, utils
from ._ext import extension_available
from .models import ModelConfig
from .schemes import Scheme, get_scheme, list_schemes
from .stack import (
    BACKWARD_MODES,
    ResidualStack,
    Stage,
    backward_mode,
    set_backward,
    stages,
)
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "BACKWARD_MODES",
    "ModelConfig",
    "TrainConfig",
    "ResidualStack",
    "Scheme",
    "Stage",
    "backward_mode",
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
