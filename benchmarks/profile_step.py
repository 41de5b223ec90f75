"""Where the time of one train step goes: torch.profiler's table for one fused_vs_generic
configuration (fused and generic stage, one scheme and backward mode), top kernels by device time.

    python benchmarks/profile_step.py --config tiny_conv_b256_d64 --scheme euler \
        --backward adjoint --device cuda [--rows 15]

Prints, per engine, the wall time of the profiled steps and the operators / kernels sorted by
total device time (CPU time on a CPU run). Use it to see whether a stage is launch-bound
(many short kernels, device idle between them) or bound by a kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if (_HERE.parent / "resode" / "__init__.py").exists():  # run from a checkout
    sys.path.insert(1, str(_HERE.parent))

import torch  # noqa: E402
from _common import synchronize  # noqa: E402
from fused_vs_generic import CONFIGS, GPU_EXTRA, make_stage, time_step  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def profile_engine(stage, x, w, device: str, steps: int, rows: int) -> str:
    """The profiler table of ``steps`` train steps of ``stage`` (after the warm-up of
    :func:`time_step`)."""
    time_step(stage, x, w, warmup=3, steps=1, device=device)
    params = list(stage.parameters())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            for p in params:
                p.grad = None
            xi = x.detach().requires_grad_(True)
            (stage(xi) * w).sum().backward()
        synchronize(device)
        wall = (time.perf_counter() - t0) / steps
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    return f"wall {wall * 1e3:.2f} ms per step ({steps} profiled steps)\n{table}"


def main(argv=None) -> int:
    configs = dict(CONFIGS, **GPU_EXTRA)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(configs), default="tiny_conv_b256_d64")
    p.add_argument("--scheme", choices=("euler", "heun"), default="euler")
    p.add_argument("--backward", choices=("autograd", "adjoint", "auto"), default="adjoint")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    torch.manual_seed(0)
    cfg = configs[args.config]
    f, g, shape = make_stage(cfg, args.scheme, args.backward, args.device, torch.float32)
    dtype = next(f.parameters()).dtype
    x = torch.randn(*shape, device=args.device, dtype=dtype)
    w = torch.randn(*shape, device=args.device, dtype=dtype)
    plain = (
        g
        if args.backward == "autograd"
        else make_stage(cfg, args.scheme, "autograd", args.device, torch.float32)[1]
    )
    for name, stage in (("fused", f), (f"generic {args.backward}", g), ("plain autograd", plain)):
        if name == "plain autograd" and stage is g:
            continue
        print(f"==== {args.config} {args.scheme} {args.backward}: {name}")
        print(profile_engine(stage, x, w, args.device, args.steps, args.rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
