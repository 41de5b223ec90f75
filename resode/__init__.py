"""resode: residual networks as discretised Neural ODEs.

Residual stages run as Euler or Heun schemes, with an exact backward (autograd) or the
memory-free reconstruction adjoint, following Sander, Ablin & Peyre, "Do Residual Neural
Networks discretize Neural Ordinary Differential Equations?" (NeurIPS 2022).
"""

from . import diagnostics, schemes
from .schemes import Scheme, get_scheme, list_schemes
from .stack import (
    BACKWARD_MODES,
    ResidualStack,
    Stage,
    backward_mode,
    set_backward,
    stages,
)

__version__ = "0.1.0"

__all__ = [
    "BACKWARD_MODES",
    "ResidualStack",
    "Scheme",
    "Stage",
    "backward_mode",
    "diagnostics",
    "get_scheme",
    "list_schemes",
    "schemes",
    "set_backward",
    "stages",
]
