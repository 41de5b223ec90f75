"""`resode run heun-depth ARGS` from a checkout (Fig. 3c, Euler/Heun x autograd/adjoint)."""

from _entry import run

run(__file__)
