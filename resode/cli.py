"""The ``resode`` command: run the paper's experiments and the reproduce-all report.

    resode list
    resode run <id> --preset smoke|quick|paper|gpu [--out DIR] [--device auto|cpu|cuda|cuda:1]
                    [--seeds 0 1 2] [--data-root DIR] [--launcher inline|local|slurm|torchrun]
                    [--nproc-per-node N] [--max-steps N] [--debug]
    resode reproduce --preset quick [--out DIR] [--only id ...]     # writes DIR/REPORT.md
    resode check MODEL [--checkpoint F] [--dataset D | --shape C H W] [--json]  # resode.check

Exit status: 0 when everything asked for ran, 1 when an experiment failed, 2 for a bad input
(checked before anything runs). Errors are one line that says what failed and how to fix it;
``--debug`` (or ``RESODE_DEBUG=1``) prints the Python traceback too. The experiments live in
:mod:`resode.reproduce`; ``experiments/<id>.py`` in the repository are the same commands for one
experiment (``python experiments/memory.py --preset quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .reproduce import EXPERIMENTS, PRESETS, UsageError, get_experiment
from .reproduce.sweeps import LAUNCHERS

DEBUG_ENV = "RESODE_DEBUG"


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
        help="sweep launcher: inline (this process), local (submitit subprocesses), slurm, "
        "torchrun (each training point data-parallel under torchrun, one process per GPU) "
        "(default: inline for smoke/quick, local for paper, torchrun for gpu when several GPUs "
        "are visible)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="processes per training point under --launcher torchrun (default: visible GPUs)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="only check that the preset runs: every training run does one epoch of N steps "
        "(one test batch), sweeps are cut; the report marks it",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help=f"print Python tracebacks of failures (also: {DEBUG_ENV}=1)",
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
    from .check import add_parser as add_check

    add_check(sub)
    return p


def _say(msg: str) -> None:
    print(f"resode: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _where(args: argparse.Namespace, exp_id: str) -> str:
    path = Path(args.out) / exp_id / "error.json"
    return f"the traceback is in {path}" if path.is_file() else "--debug prints the traceback"


def _options(args: argparse.Namespace) -> dict:
    """``max_steps`` and ``nproc`` of the command, when given."""
    opts = {"max_steps": args.max_steps, "nproc": args.nproc_per_node}
    return {k: v for k, v in opts.items() if v is not None}


def _run(args: argparse.Namespace, debug: bool) -> int:
    from .reproduce import run_experiment

    t0 = time.time()
    exp_id = args.experiment
    try:
        s = run_experiment(exp_id, args.preset, args.out, args.seeds, args.device,
                           args.data_root, args.launcher, **_options(args))  # fmt: skip
    except UsageError:
        raise
    except Exception as e:
        if debug:
            traceback.print_exc()
        _say(f"{exp_id} failed: {_one_line(e)} ({_where(args, exp_id)})")
        return 1
    print(f"{exp_id}: wrote {args.out}/{exp_id}/ in {time.time() - t0:.0f} s")
    for c in s["claims"]:
        print(f"  [{c['verdict']}] {c['text']}: {c['evidence']}")
    return 0


def _reproduce(args: argparse.Namespace, debug: bool) -> int:
    from .reproduce import reproduce

    def on_failure(exp_id: str, e: Exception) -> None:
        if debug:
            traceback.print_exception(e)
        _say(f"{exp_id} FAILED: {_one_line(e)} ({_where(args, exp_id)})")

    t0 = time.time()
    res = reproduce(args.preset, args.out, args.only, args.device, args.data_root,
                    args.launcher, args.seeds, on_failure=on_failure,
                    **_options(args))  # fmt: skip
    print(f"wrote {res.path} in {time.time() - t0:.0f} s")
    if res.failed:
        _say(f"{len(res.failed)} of {len(res.statuses)} experiments failed "
             f"({', '.join(res.failed)}); the report marks them; fix the cause above and rerun "
             f"them with --only {' '.join(res.failed)}")  # fmt: skip
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    """``resode check``: :func:`resode.check.main` (a table, or JSON; its input errors are one
    line and exit 2); any other failure is one line too, with the traceback under
    ``RESODE_DEBUG=1``."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        _say(f"check failed: {_one_line(e)} (rerun with {DEBUG_ENV}=1 for the traceback)")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The ``resode`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for exp_id in EXPERIMENTS:
            print(f"{exp_id:16s} {get_experiment(exp_id).title}")
        return 0
    if args.command == "check":
        return _check(args)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return (_run if args.command == "run" else _reproduce)(args, debug)
    except UsageError as e:
        _say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume (finished points are kept)")
        return 130
    except Exception as e:  # never a bare traceback: one line, the traceback on request
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(e)} (rerun with --debug for the traceback)")
        return 1


def experiment_main(exp_id: str, argv: Sequence[str] | None = None) -> int:
    """``python experiments/<id>.py [--preset ...]``: the ``resode run <id>`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["run", exp_id, *argv])


if __name__ == "__main__":
    sys.exit(main())
