"""``results/REPORT.md``: every figure, every table and, per claim of the paper, the measured
evidence and a verdict (reproduced / not reproduced / partial / not run). Failures are listed,
never hidden."""

from __future__ import annotations

import csv
import importlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import hardware, read_complete


def _cell(text: str) -> str:
    """Text for a markdown table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table_md(path: Path, max_rows: int = 40) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return "(empty table)\n"

    def fmt(v: str) -> str:
        try:
            x = float(v)
        except ValueError:
            return v
        if x.is_integer() and abs(x) < 1e9:
            return str(int(x))
        return f"{x:.4g}"

    head, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in body[:max_rows]:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    if len(body) > max_rows:
        lines.append(f"\n({len(body) - max_rows} more rows in `{path.name}`)")
    return "\n".join(lines) + "\n"


def write_report(
    out: str | os.PathLike,
    preset: str,
    ids: Sequence[str],
    statuses: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``<out>/REPORT.md`` from the experiments' ``summary.json`` files."""
    from . import EXPERIMENTS

    out = Path(out)
    statuses = statuses or {}
    hw = hardware()
    lines = [
        f"# resode reproduction report (preset `{preset}`)",
        "",
        "Sander, Ablin & Peyre, *Do Residual Neural Networks discretize Neural Ordinary "
        "Differential Equations?*, NeurIPS 2022 (arXiv 2205.14612).",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{hw.get('cpu_model', hw.get('machine'))} ({hw.get('cpu_count')} CPUs"
        + (f", GPUs: {', '.join(hw['gpus'])}" if hw.get("gpus") else "")
        + ").",
        "",
    ]
    if preset != "paper":
        lines += [
            f"The `{preset}` preset runs reduced settings (CPU, Fashion-MNIST or no data, few "
            "epochs, small depths): verdicts say whether the *qualitative* claim shows at this "
            "scale. `resode reproduce --preset paper` runs the paper's settings.",
            "",
        ]
    summaries: dict[str, dict[str, Any] | None] = {}
    for exp_id in ids:
        summaries[exp_id] = read_complete(out / exp_id / "summary.json")

    # claims table first
    lines += ["## Claims", "", "| experiment | claim | measured | verdict |", "|---|---|---|---|"]
    counts: dict[str, int] = {}
    for exp_id in ids:
        s = summaries[exp_id]
        if s is None:
            err = statuses.get(exp_id, {}).get("error")
            if err is None:
                ep = out / exp_id / "error.json"
                if ep.is_file():
                    err = json.loads(ep.read_text()).get("error")
            why = f"failed: {err}" if err else "no complete result"
            lines.append(f"| {exp_id} | (all claims) | {_cell(why)} | **not run** |")
            counts["not run"] = counts.get("not run", 0) + 1
            continue
        for c in s["claims"]:
            v = c["verdict"]
            counts[v] = counts.get(v, 0) + 1
            lines.append(f"| {exp_id} | {_cell(c['text'])} | {_cell(c['evidence'])} | **{v}** |")
    total = sum(s["wall_time_s"] for s in summaries.values() if s is not None)
    lines += [
        "",
        "Totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "",
        f"Sum of the experiments' wall times: {total / 60:.1f} min (a resumed run counts only "
        "the work it redid).",
        "",
    ]

    for exp_id in ids:
        mod = importlib.import_module(EXPERIMENTS[exp_id])
        lines += [f"## {exp_id}: {getattr(mod, 'TITLE', exp_id)}", ""]
        s = summaries[exp_id]
        st = statuses.get(exp_id, {})
        if s is None:
            lines += [f"**Not run / failed**: {st.get('error', 'no complete summary.json')}", ""]
            continue
        lines.append(f"Wall time {s['wall_time_s']:.0f} s. Provenance: `{exp_id}/provenance.json`.")
        lines.append("")
        for c in s["claims"]:
            lines.append(f"- {c['text']}: {c['evidence']} -> **{c['verdict']}**")
        lines.append("")
        for fig in s["figures"]:
            if fig.endswith(".png"):
                lines += [f"![{exp_id}]({exp_id}/{fig})", ""]
        for tab in s.get("tables", []):
            p = out / exp_id / tab
            if p.is_file() and p.suffix == ".csv":
                lines += [f"Table `{exp_id}/{tab}`:", "", _table_md(p)]
    path = out / "REPORT.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
