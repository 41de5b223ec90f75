"""`resode run adjoint-failure ARGS` from a checkout (Fig. 3b, adjoint on a non-ODE ResNet)."""

from _entry import run

run(__file__)
