"""`resode run reconstruction ARGS` from a checkout (reverse-step reconstruction error)."""

from _entry import run

run(__file__)
