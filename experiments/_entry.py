"""What every script in this folder does: ``python experiments/<id>.py ARGS`` is
``resode run <id> ARGS`` (``reproduce.py``: ``resode reproduce ARGS``), from a checkout that is
not installed. The experiments themselves live in :mod:`resode.reproduce` (docs/design.md,
"Experiments")."""

import sys
from pathlib import Path


def run(script: str) -> None:
    """Run the command of ``script`` (its file name is the experiment id) and exit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's resode
    from resode.cli import experiment_main, main

    name, argv = Path(script).stem, sys.argv[1:]
    sys.exit(main(["reproduce", *argv]) if name == "reproduce" else
             experiment_main(name.replace("_", "-"), argv))  # fmt: skip
