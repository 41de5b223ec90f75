"""The ``resode`` command: run the paper's experiments and the reproduce-all report.

    resode list
    resode run <id> --preset smoke|quick|paper [--out DIR] [--device cpu|cuda]
                    [--seeds 0 1 2] [--data-root DIR] [--launcher inline|local|slurm]
    resode reproduce --preset quick [--out DIR] [--only id ...]     # writes DIR/REPORT.md

The experiments live in :mod:`resode.reproduce` (one module per id); ``experiments/<id>.py`` in
the repository are the same commands for one experiment (``python experiments/memory.py
--preset quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .reproduce import EXPERIMENTS, PRESETS, get_experiment, reproduce, run_experiment
from .reproduce.sweeps import LAUNCHERS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="quick", help="settings (default quick)")
    p.add_argument("--out", default="results", help="results root (default ./results)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds")
    p.add_argument("--data-root", default=None, help="dataset root (default: per dataset)")
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=None,
        help="sweep launcher: inline (this process), local (submitit subprocesses), slurm "
        "(default: inline for smoke/quick, local for paper)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resode",
        description="Reproduce Sander, Ablin & Peyre (NeurIPS 2022) with resode.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run one experiment")
    r.add_argument("experiment", choices=list(EXPERIMENTS))
    _common(r)
    a = sub.add_parser("reproduce", help="run every experiment and write REPORT.md")
    _common(a)
    a.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for exp_id in EXPERIMENTS:
            print(f"{exp_id:16s} {get_experiment(exp_id).title}")
        return 0
    from .utils import resolve_device

    device = str(resolve_device(args.device))
    t0 = time.time()
    if args.command == "run":
        s = run_experiment(
            args.experiment,
            args.preset,
            args.out,
            args.seeds,
            device,
            args.data_root,
            args.launcher,
        )
        print(f"{args.experiment}: wrote {args.out}/{args.experiment}/ in {time.time() - t0:.0f} s")
        for c in s["claims"]:
            print(f"  [{c['verdict']}] {c['text']}: {c['evidence']}")
        return 0
    path = reproduce(
        args.preset, args.out, args.only, device, args.data_root, args.launcher, args.seeds
    )
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0


def experiment_main(exp_id: str, argv: Sequence[str] | None = None) -> int:
    """``python experiments/<id>.py [--preset ...]``: the ``resode run <id>`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["run", exp_id, *argv])


if __name__ == "__main__":
    sys.exit(main())
