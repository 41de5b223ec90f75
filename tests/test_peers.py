"""benchmarks/peers.py: the methods compute the same network, their gradients agree with plain
autograd within the expected error, the memory accounting sees what each method keeps, and a
tiny end-to-end run writes finite numbers, the tables and the plots."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
peers = pytest.importorskip("peers")
pytest.importorskip("torchdiffeq")

from resode.utils import (  # noqa: E402
    MMAP_THRESHOLD,
    cpu_peak_reset_supported,
    fresh_process_pool,
    run_in_child,
)

TINY_MLP = {"kind": "mlp", "batch": 8, "dim": 12, "hidden": 6}
TINY_CONV = {"kind": "conv", "batch": 4, "channels": 3, "size": 5}
FUSED = peers.fused_status("cpu") == "available"


def _grads(model, x, target):
    params = list(model.parameters())
    loss = 0.5 * (model(x) - target).square().sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", [TINY_MLP, TINY_CONV], ids=["mlp", "conv"])
def test_every_method_runs_the_same_forward(cfg):
    depth = 8
    blocks = peers.make_blocks(cfg, depth, seed=3, dtype=torch.float64)
    x = peers.make_input(cfg, dtype=torch.float64)
    ref = peers.PlainLoop(blocks)
    with torch.no_grad():
        blocks.eval()  # BN on running statistics: every call sees the same function
        y_ref = ref(x)
        for m in peers.METHODS:
            if m.scheme != "euler" or (m.family == "fused" and not FUSED):
                continue
            model = peers.build_method(m, blocks, cfg).eval()
            torch.testing.assert_close(model(x), y_ref, rtol=1e-10, atol=1e-10, msg=m.key)


def test_torchdiffeq_field_uses_block_floor_tN_and_N_forward_steps():
    depth = 16
    blocks = peers.make_blocks(TINY_MLP, depth, seed=0, dtype=torch.float64)
    model = peers.TorchdiffeqAdjoint(blocks)
    x = peers.make_input(TINY_MLP, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    assert model.field.evaluations == depth
    # on torchdiffeq's Euler grid (arange * step), time t_k selects block k
    grid = torch.arange(0, depth, dtype=torch.float64) * (1.0 / depth)
    for k, t in enumerate(grid):
        torch.testing.assert_close(model.field(t, x), blocks[k](x), rtol=0, atol=0)
    torch.testing.assert_close(model.field(torch.tensor(1.0), x), blocks[-1](x), rtol=0, atol=0)


def test_gradients_agree_with_plain_autograd():
    """Exact methods match to rounding; the adjoints within their expected error, which shrinks
    with depth (Euler ~1/N, Heun faster on smooth weights); torchdiffeq is worse than ours."""
    errors = {}
    for depth in (8, 32):
        keys = [m.key for m in peers.METHODS if m.key != "plain"]
        r = peers.gradient_worker(depth, True, keys, "cpu", 0, TINY_MLP)
        errors[depth] = r
        for k, v in r.items():
            if k == "process":  # (pid, load, CPU time of the measuring process)
                continue
            if k.startswith("fused") and not FUSED:
                assert v["status"] != "ok"
                continue
            assert v["status"] == "ok", (k, v)
            e = v["rel_error"]
            assert math.isfinite(e)
            if k == "checkpoint" or k.endswith("-autograd"):
                assert e < 1e-12, (k, depth, e)
            elif "euler" in k:
                assert e < 0.5 / depth, (k, depth, e)
            elif "heun" in k:
                assert e < 2.0 / depth**2, (k, depth, e)
    for k in ("generic-euler-adjoint", "generic-heun-adjoint", "torchdiffeq"):
        assert errors[32][k]["rel_error"] < errors[8][k]["rel_error"], k
    assert errors[32]["torchdiffeq"]["rel_error"] > errors[32]["generic-euler-adjoint"]["rel_error"]


def test_activation_accounting_sees_what_each_method_keeps():
    depth = 6
    blocks = peers.make_blocks(TINY_MLP, depth, seed=0)
    x = peers.make_input(TINY_MLP)
    state = x.numel() * x.element_size()
    act = {
        m.key: peers.activation_bytes(peers.build_method(m, blocks, TINY_MLP), x)
        for m in peers.METHODS
        if m.family != "fused" or FUSED
    }
    # adjoint modes keep a copy of the output and a reference to the input (the caller's tensor:
    # the drift check and "auto"'s exact fallback read it), torchdiffeq its solution at t=0 and 1
    assert act["generic-euler-adjoint"] == 2 * state
    assert act["generic-heun-adjoint"] == 2 * state
    assert act["torchdiffeq"] <= 2 * state + 64
    # checkpoint keeps each block's input (seen through the outer hook), plain keeps more
    assert depth * state <= act["checkpoint"] < act["plain"]
    assert act["plain"] >= 1.5 * depth * state  # per block: its input and tanh output
    if FUSED:
        assert act["fused-euler-adjoint"] == 2 * state
        assert act["fused-euler-autograd"] >= depth * state


def test_peak_memory_in_a_fresh_process_tracks_activations():
    if not cpu_peak_reset_supported():
        pytest.skip("no /proc/self/clear_refs peak reset on this system")
    cfg = {"kind": "mlp", "batch": 256, "dim": 256, "hidden": 32}
    pool = fresh_process_pool(peers.PRELOAD)
    depth = 64  # (activations 18 MiB, gradients 4 MiB: the activations dominate plain's peak)
    plain = run_in_child(pool, peers.measure_method, cfg, depth, "plain", "cpu")
    adj = run_in_child(pool, peers.measure_method, cfg, depth, "generic-euler-adjoint", "cpu")
    blocks, x = peers.make_blocks(cfg, depth), peers.make_input(cfg)
    act = peers.activation_bytes(peers.PlainLoop(blocks), x)
    # the step's peak holds the activations (plus gradients); the adjoint's does not
    assert plain["activation_bytes"] == act
    assert plain["peak_step_bytes"] >= 0.8 * act
    assert adj["peak_step_bytes"] < 0.5 * plain["peak_step_bytes"]
    assert plain["grad_bytes"] == plain["param_bytes"] > 0
    # each measurement ran in its own process, with the mmap threshold the run records
    assert plain["process"]["pid"] != adj["process"]["pid"]
    assert plain["process"]["malloc_mmap_threshold"] == str(MMAP_THRESHOLD)


def test_default_run_plan():
    """Memory at every depth up to 1024, times at a mid depth, one process per method on CPU;
    the GPU run covers the same table with one process per (workload, depth)."""
    a = peers.parse_args([])
    assert a.workloads == ["mlp", "conv", "mlp-narrow"]
    assert a.depths_of["conv"] == a.peak_depths_of["conv"] == (16, 64, 1024)
    assert a.time_depths_of == {"mlp": (64,), "conv": (64,), "mlp-narrow": (256,)}
    assert a.isolate == "method" and a.pin_mmap_threshold and a.reps == 5
    assert a.jobs == max(1, len(os.sched_getaffinity(0)) // torch.get_num_threads())
    g = peers.parse_args(["--device", "cuda", "--no-pin-mmap-threshold"])
    assert g.isolate == "point" and not g.pin_mmap_threshold and g.jobs == 1
    assert g.depths_of == a.depths_of and g.time_depths_of == a.time_depths_of
    q = peers.parse_args(["--quick", "--time-depths", "16"])
    assert q.depths_of["mlp"] == (4, 16) and q.time_depths_of["mlp"] == (16,)


def test_skips():
    args = peers.parse_args(["--max-activation-gib", "1"])
    history = {"act_b": {"plain": {64: 2**27, 256: 2**29}, "generic-euler-adjoint": {}}}
    assert peers._estimate(history["act_b"]["plain"], 1024) == 2**31
    assert "activations 2.0 GiB" in peers._point_skip("plain", 1024, history, args)
    assert peers._point_skip("plain", 256, history, args) is None
    assert peers._point_skip("generic-euler-adjoint", 1024, history, args) is None
    # torchdiffeq's O(N^2) step: not above --torchdiffeq-max-step-depth (its saved bytes are)
    assert "step not run above depth 64" in peers._step_skip("torchdiffeq", 256, args)
    assert peers._step_skip("torchdiffeq", 64, args) is None
    assert peers._step_skip("plain", 1024, args) is None


def test_side_by_side_processes_stay_within_the_memory_budget(monkeypatch):
    """--jobs 2: two processes at a time, but never two whose estimated activations together
    exceed --max-activation-gib; the largest start first; a failure is returned, not raised."""
    running, seen, order = set(), [], []
    lock = threading.Lock()

    def fake_in_child(pool, fn, name, args):
        with lock:
            running.add(name)
            seen.append(set(running))
            order.append(name)
        time.sleep(0.05)
        with lock:
            running.discard(name)
        if name == "bad":
            raise RuntimeError("child died")
        return {"status": "ok", "name": name}

    monkeypatch.setattr(peers, "_in_child", fake_in_child)
    args = peers.parse_args(["--jobs", "2", "--max-activation-gib", "8"])
    gib = 2**30
    sizes = {"big": 7 * gib, "big2": 6 * gib, "small": 2**20, "bad": 0, "tiny": 0}
    calls = {n: (b, None, (n,)) for n, b in sizes.items()}
    out = peers._run_many(None, calls, args, None)
    assert isinstance(out.pop("bad"), RuntimeError)
    assert all(v["name"] == n for n, v in out.items())
    assert order[:2] == ["big", "small"]  # largest first; big2 does not fit beside big
    assert max(len(r) for r in seen) == 2
    assert not any({"big", "big2"} <= r for r in seen)


def test_a_process_server_started_with_the_other_mmap_setting_is_refused():
    args = peers.parse_args(["--no-pin-mmap-threshold"])
    pinned = {"process": {"malloc_mmap_threshold": str(MMAP_THRESHOLD)}}
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        with pytest.raises(RuntimeError, match="new process"):
            peers._check_child(pinned, args)
    peers._check_child(pinned, peers.parse_args([]))


def test_tiny_end_to_end_run_writes_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "WORKLOADS", {"mlp": TINY_MLP, "conv": TINY_CONV})
    monkeypatch.setattr(peers, "GRAD_CONFIG", TINY_MLP)
    methods = ["checkpoint", "torchdiffeq", "generic-heun-adjoint", "fused-euler-adjoint"]
    result = peers.main(
        [
            "--quick",
            "--depths",
            "2",
            "4",
            "--peak-depths",
            "4",
            "--grad-depths",
            "2",
            "4",
            "--methods",
            *methods,
            "--threads",
            "1",
            "--reps",
            "3",
            "--jobs",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    for name in (
        "peers.json",
        "peers.md",
        "peers_memory.png",
        "peers_memory.pdf",
        "peers_time.png",
        "peers_time.pdf",
        "peers_gradient_error.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "peers.json").read_text())
    assert data["points"].keys() == {"mlp", "conv"}
    for w, pts in data["points"].items():
        for d, point in pts.items():
            for k, v in point.items():
                if k.startswith("fused") and not FUSED:
                    assert v["status"].startswith("not built")
                    continue
                assert v["status"] == "ok", (w, d, k, v)
                fields = ["time_s", "time_ratio", "activation_bytes"]
                fields += ["peak_step_bytes", "grad_bytes"] if d == "4" else []
                for field in fields:
                    assert math.isfinite(v[field]) and v[field] >= 0, (w, d, k, field)
                if d == "2":  # not a peak depth: no peak figure is reported
                    assert "peak_step_bytes" not in v
                assert v["process"]["malloc_mmap_threshold"] == str(MMAP_THRESHOLD)
            assert point["plain"]["time_ratio"] == 1.0
            assert point.keys() == {"plain", *methods}
            # memory: one process per method; times: one more process, methods interleaved
            pids = [v["process"]["pid"] for v in point.values() if v["status"] == "ok"]
            timing = data["timing_processes"][w][d]
            assert len(set(pids + [timing["pid"]])) == len(pids) + 1
            assert timing["malloc_mmap_threshold"] == os.environ.get("MALLOC_MMAP_THRESHOLD_")
            assert all(len(v.get("times_s", [0] * 3)) == 3 for v in point.values())
    assert data["settings"]["pin_mmap_threshold"] is True
    assert data["settings"]["isolate"] == "method"
    md = (tmp_path / "peers.md").read_text()
    assert "## Summary" in md and "## Targets" in md and "torchdiffeq" in md
    slopes = result["gradient_error"]["smooth"]["slopes"]
    assert math.isfinite(slopes["torchdiffeq"]) and math.isfinite(slopes["generic-heun-adjoint"])
