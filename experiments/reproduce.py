"""Run every experiment and write ``results/REPORT.md`` (same as ``resode reproduce``).

python experiments/reproduce.py --preset quick
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from resode.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
