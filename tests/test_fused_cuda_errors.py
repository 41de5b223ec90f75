"""Every op of resode._C called with a bad argument on CUDA tensors raises a Python exception
naming the problem (issue 11 item 4: on one GPU machine a failing TORCH_CHECK once segfaulted the
process). Runs in a child process, so a crash fails the test instead of killing pytest. Skipped
without a GPU; run by benchmarks/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch
from test_fused import _BAD_CALLS, _run_child

from resode import _ext

pytestmark = pytest.mark.cuda


def test_every_op_raises_on_a_bad_argument_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    if not _ext.extension_available().cuda:
        pytest.skip("resode._C CUDA kernels unavailable")
    cpu = "d = dict(dtype=torch.float64)"
    assert cpu in _BAD_CALLS
    out = _run_child(_BAD_CALLS.replace(cpu, "d = dict(dtype=torch.float64, device='cuda')"))
    assert out.count("ok ") == 18, out
