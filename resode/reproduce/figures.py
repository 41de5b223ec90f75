"""Figures of the experiments: matplotlib with the non-interactive Agg backend, saved as PNG
(for the report) and PDF (for print)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_dir: str | os.PathLike, name: str) -> list[str]:
    """Save ``fig`` as ``<name>.png`` (150 dpi) and ``<name>.pdf`` in ``out_dir``, close it and
    return the two file names."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"{name}.{ext}", dpi=150, bbox_inches="tight")
        paths.append(f"{name}.{ext}")
    plt.close(fig)
    return paths
