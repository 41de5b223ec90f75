"""``<out>/REPORT.md``: every figure, every table and, per claim of the paper, the measured
evidence, a verdict and its rule. It is rebuilt from the ``summary.json`` files of one preset:
an experiment that failed, did not run, or holds results of another preset is marked so, never
hidden and never mixed in."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .claims import spread_text
from .files import read_complete, read_json, write_text
from .provenance import hardware

MARKS: tuple[str, ...] = ("failed", "not run")  # the claim-table verdicts of missing results


def _cell(text: str) -> str:
    """Text for a markdown table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v: str) -> str:
    try:
        x = float(v)
    except ValueError:
        return v
    if x.is_integer() and abs(x) < 1e9:
        return str(int(x))
    return f"{x:.4g}"


def _table_md(path: Path, max_rows: int = 40) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return "(empty table)\n"
    head, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in body[:max_rows]]
    if len(body) > max_rows:
        lines.append(f"\n({len(body) - max_rows} more rows in `{path.name}`)")
    return "\n".join(lines) + "\n"


def experiment_state(
    out: Path, exp_id: str, preset: str, status: dict[str, Any] | None
) -> dict[str, Any]:
    """``{"state": "ok" | "failed" | "not run", ...}`` of one experiment at ``preset``.

    ``status`` is this invocation's outcome (``None``: not run now, read the files: a complete
    summary of this preset is an earlier result; an ``error.json`` of this preset, a failure).
    """
    if status is not None and not status.get("ok", False):
        return {"state": "failed", "why": status.get("error", "unknown error")}
    summary = read_complete(out / exp_id / "summary.json")
    err = read_json(out / exp_id / "error.json")
    if status is None and err is not None and err.get("preset") == preset:
        return {"state": "failed", "why": err.get("error", "unknown error")}
    if summary is not None and summary.get("preset") == preset:
        return {"state": "ok", "summary": summary, "earlier": status is None}
    if summary is not None:
        why = f"not run at preset {preset} ({exp_id}/ holds a {summary.get('preset')} result)"
    else:
        why = f"not run at preset {preset}"
    return {"state": "not run", "why": why}


def _header(preset: str) -> list[str]:
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
    return lines


def _claim_rows(states: dict[str, dict[str, Any]], counts: dict[str, int]) -> Iterator[str]:
    for exp_id, st in states.items():
        if st["state"] != "ok":
            mark = st["state"]
            counts[mark] = counts.get(mark, 0) + 1
            why = f"failed: {st['why']}" if mark == "failed" else st["why"]
            yield f"| {exp_id} | (all claims) | {_cell(why)} | - | **{mark}** | - |"
            continue
        for c in st["summary"]["claims"]:
            v = c["verdict"]
            counts[v] = counts.get(v, 0) + 1
            cells = (exp_id, c["text"], c["evidence"], spread_text(c.get("spread")))
            yield ("| " + " | ".join(_cell(x) for x in cells) + f" | **{v}** | "
                   f"{_cell(c.get('rule') or '-')} |")  # fmt: skip


def _claims_table(states: dict[str, dict[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    lines = ["## Claims", "",
             "Effect over seeds: mean +- sample standard deviation of the effect the verdict "
             "judges (training claims: reproduced only when it exceeds the spread).", "",
             "| experiment | claim | measured | effect over seeds | verdict | rule |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += list(_claim_rows(states, counts))
    total = sum(st["summary"]["wall_time_s"] for st in states.values() if st["state"] == "ok")
    return lines + [
        "",
        "Totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "",
        f"Sum of the experiments' wall times: {total / 60:.1f} min (a rerun that reused "
        "finished sweep points counts the time of the run that computed them).",
        "",
    ]


def _section(out: Path, exp_id: str, title: str, st: dict[str, Any]) -> list[str]:
    lines = [f"## {exp_id}: {title}", ""]
    if st["state"] == "failed":
        return lines + [f"**Failed**: {st['why']} (details in `{exp_id}/error.json`)", ""]
    if st["state"] == "not run":
        return lines + [f"**Not run**: {st['why']}.", ""]
    s = st["summary"]
    when = " From an earlier run of this preset." if st.get("earlier") else ""
    if s.get("max_steps") is not None:
        lines += [f"**Check run** (`--max-steps {s['max_steps']}`): the preset ran a few "
                  "steps per training run to prove it works; the numbers are not results.",
                  ""]  # fmt: skip
    lines += [f"Wall time {s['wall_time_s']:.0f} s on {s.get('device', 'cpu')}. Provenance: "
              f"`{exp_id}/provenance.json`.{when}", ""]  # fmt: skip
    if s.get("device_note"):
        lines += [f"Note: {s['device_note']}.", ""]
    for c in s["claims"]:
        rule = f" (rule: {c['rule']})" if c.get("rule") else ""
        spread = f" [effect {spread_text(c['spread'])}]" if c.get("spread") else ""
        lines.append(f"- {c['text']}: {c['evidence']}{spread} -> **{c['verdict']}**{rule}")
    lines.append("")
    lines += [f"![{exp_id}]({exp_id}/{f})\n" for f in s["figures"] if f.endswith(".png")]
    for tab in s.get("tables", []):
        p = out / exp_id / tab
        if p.is_file() and p.suffix == ".csv":
            lines += [f"Table `{exp_id}/{tab}`:", "", _table_md(p)]
    return lines


def write_report(
    out: str | os.PathLike, preset: str, statuses: dict[str, dict[str, Any]] | None = None
) -> Path:
    """Write ``<out>/REPORT.md`` for ``preset`` from the experiments' result files.

    ``statuses`` holds the outcome of the experiments run by this invocation (``{"ok": bool,
    "error": str}``); the others keep their earlier result of the same preset, if any, so a
    partial run (``--only``) updates its own sections and leaves the rest as they were.
    """
    from . import EXPERIMENTS, get_experiment

    out, statuses = Path(out), statuses or {}
    states = {e: experiment_state(out, e, preset, statuses.get(e)) for e in EXPERIMENTS}
    lines = _header(preset) + _claims_table(states)
    for exp_id, st in states.items():
        lines += _section(out, exp_id, get_experiment(exp_id).title, st)
    return write_text(out / "REPORT.md", "\n".join(lines) + "\n")
