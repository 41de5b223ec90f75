"""`resode run linear-weights ARGS` from a checkout (Fig. 2, weights smooth in depth)."""

from _entry import run

run(__file__)
