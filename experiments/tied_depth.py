"""`resode run tied-depth ARGS` from a checkout (Fig. 3a, tied ResNets vs depth)."""

from _entry import run

run(__file__)
