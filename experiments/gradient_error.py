"""`resode run gradient-error ARGS` from a checkout (Fig. 4, adjoint gradient error)."""

from _entry import run

run(__file__)
