"""Reporting for ``peers.py``: the target check, the Markdown tables and the plots.

Everything here reads the result dictionary that ``peers.py`` writes to ``peers.json``
(``points[workload][depth][method]`` and ``gradient_error[weights]``), so a report can be
rebuilt from the JSON alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import human_bytes

ADJOINTS = ("generic-euler-adjoint", "generic-heun-adjoint", "fused-euler-adjoint")
ADJOINTS += ("fused-heun-adjoint",)


# --------------------------------------------------------------------------- lookups
def series(result: dict[str, Any], w: str, k: str, field: str) -> dict[int, float]:
    """``{depth: value}`` of one field of one method on one workload (measured points only)."""
    out = {}
    for d, point in result["points"].get(w, {}).items():
        v = point.get(k, {})
        if v.get("status") == "ok" and field in v:
            out[int(d)] = v[field]
    return out


def _ratios_text(r: dict[int, float]) -> str:
    return ", ".join(f"N={d}: {v:.2f}x" for d, v in sorted(r.items()))


def _slope(result: dict[str, Any], label: str, k: str) -> float:
    return result["gradient_error"].get(label, {}).get("slopes", {}).get(k, math.nan)


# --------------------------------------------------------------------------- targets
class _Targets:
    """Rows of the target table: ``ok`` None = not measured, True = met, False = missed."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, target: str, ok: bool | None, measured: str) -> None:
        status = "not measured" if ok is None else ("met" if ok else "missed")
        self.rows.append({"target": target, "status": status, "measured": measured})


def _memory_targets(result: dict[str, Any], t: _Targets) -> None:
    for w in ("mlp", "conv"):
        for k in ADJOINTS:
            a = series(result, w, k, "activation_bytes")
            if len(a) < 2:
                t.add(f"{w}: {k} activation memory flat (min vs max depth within 5%)", None, "-")
                continue
            lo, hi = min(a), max(a)
            change = a[hi] / a[lo] - 1
            t.add(
                f"{w}: {k} activation memory flat (depth {lo} vs {hi} within 5%)",
                abs(change) <= 0.05,
                f"{human_bytes(a[lo])} -> {human_bytes(a[hi])} ({change:+.1%})",
            )
    a_plain = series(result, "conv", "plain", "activation_bytes")
    a_adj = series(result, "conv", "generic-euler-adjoint", "activation_bytes")
    name = "conv depth 1024: autograd ~4 GiB of activations, resode adjoint ~1 MiB"
    if 1024 in a_plain and 1024 in a_adj:
        t.add(
            name,
            a_adj[1024] <= 1.1 * 2**20,
            f"plain {human_bytes(a_plain[1024])}, generic-euler-adjoint {human_bytes(a_adj[1024])}",
        )
    else:
        t.add(name, None, "depth 1024 not run")
    pin = "pinned" if result["settings"].get("pin_mmap_threshold") else "not pinned"
    for k in ("generic-euler-adjoint", "fused-euler-adjoint"):
        p = series(result, "conv", k, "peak_step_bytes")
        g = series(result, "conv", k, "grad_bytes")
        name = f"conv: {k} peak step memory, N=64 vs N=1024 (issue 10; mmap threshold {pin})"
        if 64 in p and 1024 in p:
            t.add(
                name,
                None,
                f"{human_bytes(p[64])} -> {human_bytes(p[1024])} (gradients inside: "
                f"{human_bytes(g.get(64))} -> {human_bytes(g.get(1024))})",
            )
            t.rows[-1]["status"] = "shown"
        else:
            t.add(name, None, "N=64 or N=1024 not measured")


def _time_targets(result: dict[str, Any], t: _Targets) -> None:
    for w, limit in (("mlp", 1.5), ("conv", 1.25)):
        r = series(result, w, "generic-euler-adjoint", "time_ratio")
        t.add(
            f"{w}: generic Euler adjoint step <= {limit}x plain autograd at the timed depths",
            (max(r.values()) <= limit) if r else None,
            _ratios_text(r) or "-",
        )
    for w in ("mlp", "conv"):
        r = series(result, w, "fused-euler-adjoint", "time_ratio")
        t.add(
            f"{w}: fused Euler adjoint step <= 1.2x plain autograd at the timed depths",
            (max(r.values()) <= 1.2) if r else None,
            _ratios_text(r) or "not built / not run",
        )
    r = series(result, "mlp-narrow", "fused-euler-adjoint", "time_ratio")
    t.add(
        "mlp-narrow (batch 128, dim 64, hidden 64, depth 256): fused Euler adjoint < 1.0x plain",
        (max(r.values()) < 1.0) if r else None,
        _ratios_text(r) or "not built / not run",
    )


def _slope_targets(result: dict[str, Any], t: _Targets) -> None:
    checks: tuple[tuple[str, str, Callable[[float], bool], str], ...] = (
        ("iid", "generic-euler-adjoint", lambda s: -1.6 <= s <= -0.7, "about -1"),
        ("smooth", "generic-euler-adjoint", lambda s: -1.6 <= s <= -0.7, "about -1"),
        ("smooth", "generic-heun-adjoint", lambda s: s <= -2.0, "<= -2"),
        ("smooth", "fused-heun-adjoint", lambda s: s <= -2.0, "<= -2"),
    )
    for label, k, cond, text in checks:
        s = _slope(result, label, k)
        t.add(
            f"gradient-error slope, {k}, {label} weights: {text}",
            cond(s) if math.isfinite(s) else None,
            f"{s:.2f}" if math.isfinite(s) else "-",
        )
    for label in ("iid", "smooth"):
        s = _slope(result, label, "torchdiffeq")
        t.add(
            f"torchdiffeq continuous adjoint slope, {label} weights (shown, no target)",
            None,
            f"{s:.2f}" if math.isfinite(s) else "-",
        )
        t.rows[-1]["status"] = "shown" if math.isfinite(s) else "not measured"


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' targets, each with the measured numbers and met / missed / not measured."""
    t = _Targets()
    _memory_targets(result, t)
    _time_targets(result, t)
    _slope_targets(result, t)
    return t.rows


# --------------------------------------------------------------------------- markdown
def _table(head: list[str], rows: list[list[str]], numbers: bool = True) -> list[str]:
    """A Markdown table; with ``numbers`` every column but the first is right-aligned."""
    cell = "---:|" if numbers else "---|"
    lines = ["| " + " | ".join(head) + " |", "|---|" + cell * (len(head) - 1)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _cell(v: dict[str, Any] | None, field: str) -> str:
    if not v:
        return ""
    if v.get("status") != "ok":
        s = v.get("status", "")
        return "not built" if s.startswith("not built") else ("skipped" if "skip" in s else "n/a")
    if field not in v and "step_skipped" in v and field != "activation_bytes":
        return "skipped"
    if field == "time_ratio":
        return f"{v['time_ratio']:.2f}" if "time_ratio" in v else "-"
    if field == "time_s":
        return f"{v['time_s']:.3g}" if "time_s" in v else "-"
    return human_bytes(v.get(field))


def _header(result: dict[str, Any]) -> list[str]:
    m, s = result["machine"], result["settings"]
    load = result.get("loadavg", {})
    pin = "pinned to 64 KiB" if s["pin_mmap_threshold"] else "glibc default (not pinned)"
    return [
        "# resode vs peers: memory, speed and gradient error vs depth",
        "",
        f"Machine: {m['cpu']}, {m.get('affinity') or m['cpu_count']} cores, torch "
        f"{m['torch']} ({s['child_threads']} threads per measuring process), device "
        f"`{m['device']}`" + (f" ({m.get('gpu')})" if m.get("gpu") else "") + ".  ",
        f"Load average (1 min) at start {load.get('start')}, at end {load.get('end')}, max seen "
        f"by a measuring process {load.get('max_seen')}.  ",
        f"Fused engine: {result['fused']}.  Run time: {result['elapsed_s'] / 60:.1f} min "
        f"(CPU time of the measuring processes: {result.get('cpu_s', 0) / 60:.1f} min).  ",
        f"Command: `{result['command']}`.  ",
        f"Memory: one fresh process per {s['isolate']} (`--isolate {s['isolate']}`); glibc mmap "
        f"threshold in those processes: {pin}.  ",
        f"Step: {s['step']}.  ",
        f"Time: median of {s['reps']} rounds after {s['warmup']} warm-up round(s), at the timed "
        f"depths {s['time_depths']}; {s['timing']}.",
        "",
    ]


def _summary_columns(result: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """``(title, workload, field, depth)``: the time ratio at every timed depth; the saved and
    peak bytes at the largest depth of each workload measured at several depths."""
    cols = []
    for w in result["points"]:
        for d in sorted(series(result, w, "plain", "time_ratio")):
            cols.append((f"{w} time N={d}", w, "time_ratio", d))
    for field, what in (("activation_bytes", "saved"), ("peak_step_bytes", "peak")):
        for w, pts in result["points"].items():
            ds = series(result, w, "plain", field)
            if len(pts) > 1 and ds:
                cols.append((f"{w} {what} N={max(ds)}", w, field, max(ds)))
    return cols


def _summary_cell(result: dict[str, Any], k: str, w: str, field: str, depth: int) -> str:
    s = series(result, w, k, field)
    if field == "time_ratio":
        return f"{s[depth]:.2f}" if depth in s else "-"
    if depth in s:
        return human_bytes(s[depth])
    if s:  # the largest depth measured, when the asked one was skipped
        return f"{human_bytes(s[max(s)])} (N={max(s)})"
    return "-"


def _summary(result: dict[str, Any]) -> list[str]:
    """One row per method: time ratios at the timed depths, memory at the largest depth,
    gradient-error slopes."""
    cols = _summary_columns(result)
    labels = list(result["gradient_error"])
    rows = [
        [k]
        + [_summary_cell(result, k, *c[1:]) for c in cols]
        + [_fmt_slope(_slope(result, label, k)) for label in labels]
        for k in result["settings"]["methods"]
    ]
    head = ["method"] + [c[0] for c in cols] + [f"slope {label}" for label in labels]
    return ["## Summary", ""] + _table(head, rows)


def _fmt_slope(s: float) -> str:
    return f"{s:.2f}" if math.isfinite(s) else "-"


def _workload_tables(result: dict[str, Any], w: str, pts: dict[str, Any]) -> list[str]:
    depths = sorted(pts, key=int)
    lines = [f"## Workload `{w}`: {result['settings']['workloads'][w]}", ""]
    for title, field in (
        ("Step time, ratio to plain autograd", "time_ratio"),
        ("Step time, seconds", "time_s"),
        ("Activation memory (bytes saved for backward)", "activation_bytes"),
        ("Peak memory of one step in a fresh process, minus memory held before", "peak_step_bytes"),
    ):
        rows = [
            [k] + cells
            for k in result["settings"]["methods"]
            if any(cells := [_cell(pts[d].get(k), field) for d in depths])
            and any(c not in ("", "-") for c in cells)
        ]
        if rows:
            lines += [f"**{title}**", ""] + _table(["method"] + [f"N={d}" for d in depths], rows)
    pg = [
        f"N={d}: params {human_bytes(pts[d]['plain']['param_bytes'])}, "
        f"grads {human_bytes(pts[d]['plain'].get('grad_bytes'))}"
        for d in depths
        if pts[d].get("plain", {}).get("param_bytes")
    ]
    if pg:
        lines += [
            "Parameter and gradient bytes (not in the activation column; gradients are inside "
            "the peak): " + "; ".join(pg) + ".",
            "",
        ]
    return lines


def _gradient_tables(result: dict[str, Any]) -> list[str]:
    ge = result["gradient_error"]
    if not ge:
        return []
    lines = [
        "## Gradient relative error vs exact autograd "
        f"(float64, {result['settings']['grad_config']})",
        "",
        "`||g - g_exact|| / ||g_exact||` over all parameters; the exact reference is autograd of "
        "the same scheme. Slope = least-squares fit of log error vs log N.",
        "",
    ]
    for label, data in ge.items():
        depths = sorted(data["per_depth"], key=int)
        rows = []
        for k, s in data["slopes"].items():
            cells = []
            for d in depths:
                v = data["per_depth"][d].get(k, {})
                ok = v.get("status") == "ok"
                bad = "not built" if "not built" in v.get("status", "") else "n/a"
                cells.append(f"{v['rel_error']:.2e}" if ok else bad)
            rows.append([k, *cells, _fmt_slope(s)])
        head = ["method"] + [f"N={d}" for d in depths] + ["slope"]
        lines += [f"**{label} weights**", ""] + _table(head, rows)
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    """The report: header, summary, per-workload tables, gradient errors, skips, targets."""
    lines = _header(result) + _summary(result)
    for w, pts in result["points"].items():
        lines += _workload_tables(result, w, pts)
    lines += _gradient_tables(result)
    if result["skipped"]:
        lines += ["## Skipped points", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    lines += ["## Targets", ""]
    lines += _table(
        ["target", "status", "measured"],
        [[t["target"], t["status"], t["measured"]] for t in result["targets"]],
        numbers=False,
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _style(keys: list[str], plt) -> tuple[dict[str, str], dict[str, Any]]:
    styles = {k: ("-" if "adjoint" in k or k == "torchdiffeq" else "--") for k in keys}
    cmap = plt.get_cmap("tab20").colors
    return styles, dict(zip(keys, cmap[::2] + cmap[1::2]))


def _loglog_axes(ax, title: str, ylabel: str, ybase: float = 2) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=ybase)
    ax.set_xlabel("depth N")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _plot_series(ax, result, w, field, keys, styles, colors) -> None:
    for k in keys:
        s = series(result, w, k, field)
        if s:
            d = sorted(s)
            y = [max(s[x], 1) for x in d]
            ax.plot(d, y, styles[k], color=colors[k], marker="o", label=k)


def _plot_memory_and_time(result: dict[str, Any], plt, finish) -> None:
    keys = result["settings"]["methods"]
    styles, colors = _style(keys, plt)
    workloads = [w for w in result["points"] if len(result["points"][w]) > 1] or list(
        result["points"]
    )
    n = len(workloads)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 8), squeeze=False)
    for j, w in enumerate(workloads):
        for i, (field, title) in enumerate(
            (("activation_bytes", "activation memory"), ("peak_step_bytes", "peak step memory"))
        ):
            _plot_series(axes[i][j], result, w, field, keys, styles, colors)
            _loglog_axes(axes[i][j], f"{w}: {title}", "bytes")
    axes[0][-1].legend(fontsize=7)
    finish(fig, "peers_memory")
    workloads = list(result["points"])
    n = len(workloads)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for j, w in enumerate(workloads):
        ax = axes[0][j]
        for k in keys:  # (one depth per workload by default: bars would do, points are enough)
            s = series(result, w, k, "time_ratio")
            if s:
                d = sorted(s)
                ax.plot(d, [s[x] for x in d], styles[k], color=colors[k], marker="o", label=k)
        ax.axhline(1.0, color="k", lw=0.8)
        _loglog_axes(ax, f"{w}: step time / plain autograd", "ratio")
    axes[0][-1].legend(fontsize=7)
    finish(fig, "peers_time")


def _plot_gradient_error(result: dict[str, Any], plt, finish) -> None:
    ge = result["gradient_error"]
    if not ge:
        return
    fig, axes = plt.subplots(1, len(ge), figsize=(5.5 * len(ge), 4), squeeze=False)
    for j, (label, data) in enumerate(ge.items()):
        ax = axes[0][j]
        for k, slope in data["slopes"].items():
            pts = sorted(
                (int(d), v[k]["rel_error"])
                for d, v in data["per_depth"].items()
                if v.get(k, {}).get("status") == "ok" and v[k]["rel_error"] > 0
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{k} (slope {slope:.2f})")
        _loglog_axes(ax, f"{label} weights (float64)", "relative gradient error", ybase=10)
        ax.legend(fontsize=7)
    finish(fig, "peers_gradient_error")


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """``peers_memory``, ``peers_time`` and ``peers_gradient_error`` (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def finish(fig, name: str) -> None:
        fig.tight_layout()
        for ext in ("png", "pdf"):
            p = out / f"{name}.{ext}"
            fig.savefig(p, dpi=130)
            written.append(p)
        plt.close(fig)

    _plot_memory_and_time(result, plt, finish)
    _plot_gradient_error(result, plt, finish)
    return written
