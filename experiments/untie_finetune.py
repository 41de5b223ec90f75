"""`resode run untie-finetune ARGS` from a checkout (Table 2, untie and fine-tune)."""

from _entry import run

run(__file__)
