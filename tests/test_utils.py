"""resode.utils: the fresh-process pool keeps the malloc setting each caller asks for."""

import os

from resode.utils import MMAP_THRESHOLD, fresh_process_pool, run_in_child


def _child_mmap_env():
    return os.environ.get("MALLOC_MMAP_THRESHOLD_")


def test_fresh_process_pool_switches_the_mmap_setting_of_its_children():
    # Python keeps one forkserver per process: a pool asked for the other setting must restart
    # it, or a measurement meant for glibc's defaults silently runs pinned (and vice versa)
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    for pin in (True, False, True, False):
        ctx = fresh_process_pool(("torch",), pin_mmap_threshold=pin)
        assert run_in_child(ctx, _child_mmap_env) == (str(MMAP_THRESHOLD) if pin else env), pin
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_") == env  # the caller's environment untouched
