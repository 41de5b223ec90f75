"""`resode run memory ARGS` from a checkout (activation memory vs depth)."""

from _entry import run

run(__file__)
