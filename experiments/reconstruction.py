"""`reconstruction`: one command for this experiment of Sander, Ablin & Peyre (NeurIPS 2022).

    python experiments/reconstruction.py --preset quick [--out DIR] [--seeds 0 1]

Same as `resode run reconstruction ...`;
the logic lives in `resode.reproduce` (DESIGN.md section 5).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from resode.cli import experiment_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(experiment_main("reconstruction"))
