"""`resode reproduce ARGS` from a checkout (every experiment, REPORT.md)."""

from _entry import run

run(__file__)
