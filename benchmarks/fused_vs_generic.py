"""Fused (resode._C) vs generic stages: train-step time and activation memory, in one run.

For each configuration x scheme x backward mode, the train step (forward, loss, backward) of the
fused stage and of the equivalent generic ResidualStack (same parameters) is timed (median of
``--steps`` steps after ``--warmup``), and the activation memory is counted with
:func:`resode.diagnostics.saved_tensor_bytes` (unique storages saved for the backward, parameters
excluded; the fused op returns everything it keeps to Python and saves it with
``ctx.save_for_backward``, so nothing is hidden). Writes ``results/benchmarks/
fused_vs_generic.{json,md}``.

    python benchmarks/fused_vs_generic.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if (_HERE.parent / "resode" / "__init__.py").exists():  # run from a checkout
    sys.path.insert(1, str(_HERE.parent))

import torch  # noqa: E402
from _common import machine_info, median, time_calls, write_json_md  # noqa: E402

from resode import fused  # noqa: E402
from resode.diagnostics import saved_tensor_bytes  # noqa: E402
from resode.utils import environ  # noqa: E402

CONFIGS = {
    # name: (kind, batch, dim/channels, hidden or spatial, depth)
    "narrow_mlp": dict(kind="mlp", batch=128, dim=64, hidden=64, depth=256),
    "wide_mlp": dict(kind="mlp", batch=256, dim=512, hidden=64, depth=64),
    "tiny_conv": dict(kind="conv", batch=128, channels=16, size=10, depth=32),
}
QUICK = {
    "narrow_mlp": dict(kind="mlp", batch=32, dim=16, hidden=16, depth=32),
    "wide_mlp": dict(kind="mlp", batch=32, dim=128, hidden=16, depth=8),
    "tiny_conv": dict(kind="conv", batch=8, channels=4, size=6, depth=4),
}
# GPU-only extras (issue 11's targets): the tiny conv stage at batch 256, depth 64, and the narrow
# MLP in bfloat16 (a ``dtype`` entry overrides --dtype)
GPU_EXTRA = {
    "tiny_conv_b256_d64": dict(kind="conv", batch=256, channels=16, size=10, depth=64),
    "narrow_mlp_bf16": dict(kind="mlp", batch=128, dim=64, hidden=64, depth=256, dtype="bfloat16"),
}
# The fused engine's previous CUDA path (one kernel launch per operation, no graphs): timed as
# "fused_eager" beside the default on CUDA, so the gain of the persistent kernel / graph replay
# is measured in the same run (the extension reads these at call time).
EAGER_ENV = {"RESODE_PERSISTENT_MLP": "0", "RESODE_CUDA_GRAPHS": "0"}


def make_stage(cfg: dict, scheme: str, backward: str, device, dtype):
    """The fused stage of ``cfg``, its generic copy (``to_generic``) and the input shape."""
    dtype = getattr(torch, cfg["dtype"]) if "dtype" in cfg else dtype
    kw = dict(scheme=scheme, backward=backward)
    if cfg["kind"] == "mlp":
        f = fused.MLPStack(cfg["dim"], cfg["hidden"], cfg["depth"], activation="tanh", **kw)
        shape = (cfg["batch"], cfg["dim"])  # (B, D)
    else:  # (last BN weight 1, not 0: a non-trivial residual branch)
        f = fused.ConvStack(cfg["channels"], cfg["depth"], zero_init_last_bn=False, **kw)
        shape = (cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])  # (B, C, H, W)
    f = f.to(device=device, dtype=dtype)
    return f, f.to_generic(), shape


def time_step(stage, x, w, warmup: int, steps: int, device) -> float:
    """Median wall time of a train step: fresh input leaf, forward, ``(y * w).sum()``,
    backward."""
    params = list(stage.parameters())

    def step():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        loss = (stage(xi) * w).sum()
        loss.backward()

    return median(time_calls(step, device, warmup=warmup, reps=steps))


def activation_bytes(stage, x) -> int:
    xi = x.detach().requires_grad_(True)
    return saved_tensor_bytes(stage, xi, exclude=list(stage.parameters()))


def run_config(name, cfg, args, rows):
    for scheme in ("euler", "heun"):
        for backward in ("autograd", "adjoint"):
            torch.manual_seed(0)
            f, g, shape = make_stage(cfg, scheme, backward, args.device, args.dtype)
            dtype = next(f.parameters()).dtype
            x = torch.randn(*shape, device=args.device, dtype=dtype)
            w = torch.randn(*shape, device=args.device, dtype=dtype)
            row = dict(config=name, scheme=scheme, backward=backward, **cfg)
            for engine, stage in (("fused", f), ("generic", g)):
                row[f"{engine}_s"] = time_step(stage, x, w, args.warmup, args.steps, args.device)
                row[f"{engine}_act_bytes"] = activation_bytes(stage, x)
            if args.device == "cuda":
                with environ(**EAGER_ENV):
                    row["fused_eager_s"] = time_step(f, x, w, args.warmup, args.steps, args.device)
            row["speedup"] = row["generic_s"] / row["fused_s"]
            rows.append(row)
            eager = f" (eager {row['fused_eager_s'] * 1e3:.2f})" if "fused_eager_s" in row else ""
            print(
                f"{name:20s} {scheme:5s} {backward:8s} fused {row['fused_s'] * 1e3:9.2f} ms"
                f"{eager}  generic {row['generic_s'] * 1e3:9.2f} ms  x{row['speedup']:.2f}  "
                f"act {row['fused_act_bytes'] / 2**20:.2f} / {row['generic_act_bytes'] / 2**20:.2f}"
                " MiB",
                flush=True,
            )


def memory_flatness(args) -> dict:
    """Fused adjoint activation memory at depth 16 vs 1024 (narrow MLP and tiny conv shapes)."""
    out = {}
    base = QUICK if args.quick else CONFIGS
    for name in ("narrow_mlp", "tiny_conv"):
        for scheme in ("euler", "heun"):
            vals = {}
            for depth in (16, 1024):
                cfg = dict(base[name], depth=depth)
                torch.manual_seed(0)
                f, _, shape = make_stage(cfg, scheme, "adjoint", args.device, args.dtype)
                x = torch.randn(*shape, device=args.device, dtype=args.dtype)
                vals[depth] = activation_bytes(f, x)
            out[f"{name}/{scheme}"] = dict(
                depth16=vals[16], depth1024=vals[1024], ratio=vals[1024] / max(vals[16], 1)
            )
    return out


def _find(rows, config, scheme, backward):
    for r in rows:
        if (r["config"], r["scheme"], r["backward"]) == (config, scheme, backward):
            return r
    return None


def _target(name: str, value: float, met: bool) -> dict:
    return dict(target=name, value=round(value, 4 if "flat" in name else 2), met=met)


def _cpu_targets(rows) -> list[dict]:
    targets = []
    for config, need in (("narrow_mlp", 3.0), ("wide_mlp", 1.2), ("tiny_conv", 1.5)):
        for scheme in ("euler", "heun"):
            if r := _find(rows, config, scheme, "adjoint"):
                name = f"{config} {scheme} adjoint: fused >= {need}x faster"
                targets.append(_target(name, r["speedup"], r["speedup"] >= need))
    for config in CONFIGS:
        for scheme in ("euler", "heun"):
            a, b = _find(rows, config, scheme, "adjoint"), _find(rows, config, scheme, "autograd")
            if a and b:
                ratio = a["fused_s"] / b["fused_s"]
                name = f"{config} {scheme}: fused adjoint <= 1.7x fused autograd"
                targets.append(_target(name, ratio, ratio <= 1.7))
    return targets


def _gpu_targets(rows) -> list[dict]:
    """Issue 11's targets. "Plain autograd" is the generic stage with backward="autograd": the
    blocks' own PyTorch modules, differentiated by autograd."""
    targets = []
    vs_plain = (
        ("narrow_mlp", 0.5),
        ("narrow_mlp_bf16", 0.5),
        ("wide_mlp", 0.6),
        ("tiny_conv_b256_d64", 1.05),
    )
    for scheme in ("euler", "heun"):
        for config in ("narrow_mlp", "narrow_mlp_bf16"):
            if r := _find(rows, config, scheme, "adjoint"):
                name = f"GPU {config} {scheme}: fused adjoint >= 10x generic adjoint"
                targets.append(_target(name, r["speedup"], r["speedup"] >= 10.0))
        for config, need in vs_plain:
            r, ra = _find(rows, config, scheme, "adjoint"), _find(rows, config, scheme, "autograd")
            if r and ra:
                ratio = r["fused_s"] / ra["generic_s"]
                name = f"GPU {config} {scheme}: fused adjoint <= {need}x plain autograd"
                targets.append(_target(name, ratio, ratio <= need))
    return targets


def summarise(rows, flat, args) -> list[dict]:
    """The targets of the extension issue, each with its value and whether it is met."""
    targets = _cpu_targets(rows) if args.device == "cpu" else _gpu_targets(rows)
    for key, v in flat.items():
        name = f"{key}: fused adjoint memory flat (depth 1024 / 16 within 5%)"
        targets.append(_target(name, v["ratio"], abs(v["ratio"] - 1) <= 0.05))
    return targets


def provenance(args) -> dict:
    """Machine, versions and settings of the run."""
    return dict(
        machine_info(args.device),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dtype=str(args.dtype),
        steps=args.steps,
        warmup=args.warmup,
        quick=args.quick,
        extension=fused.extension_available().as_dict(),
    )


def markdown(rows, targets, flat, prov) -> str:
    lines = [
        "# Fused vs generic residual stages",
        "",
        f"{prov['date']} · torch {prov['torch']} · {prov['device']}"
        + (f" ({prov.get('gpu')})" if prov.get("gpu") else f" ({prov['torch_threads']} threads)")
        + f" · {prov['dtype']} · median of {prov['steps']} steps after {prov['warmup']} warm-up"
        + (" · QUICK sizes" if prov["quick"] else ""),
        "",
        "| config | scheme | backward | fused ms | fused eager ms | generic ms | speedup "
        "| fused act MiB | generic act MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eager = f"{r['fused_eager_s'] * 1e3:.2f}" if "fused_eager_s" in r else "-"
        lines.append(
            f"| {r['config']} | {r['scheme']} | {r['backward']} | {r['fused_s'] * 1e3:.2f} | "
            f"{eager} | {r['generic_s'] * 1e3:.2f} | {r['speedup']:.2f}x | "
            f"{r['fused_act_bytes'] / 2**20:.3f} | {r['generic_act_bytes'] / 2**20:.3f} |"
        )
    if any("fused_eager_s" in r for r in rows):
        lines += [
            "",
            "fused eager: the fused stage with the persistent MLP kernel and CUDA-graph replay "
            "turned off (RESODE_PERSISTENT_MLP=0 RESODE_CUDA_GRAPHS=0), timed in the same run.",
        ]
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |")
    lines += ["", "Adjoint activation memory (bytes) at depth 16 vs 1024:", ""]
    for k, v in flat.items():
        lines.append(f"- {k}: {v['depth16']} vs {v['depth1024']} (ratio {v['ratio']:.4f})")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--steps", type=int, default=7, help="timed steps (median; >= 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--configs", nargs="*", default=None, help="subset of the configurations")
    p.add_argument("--out", default="results/benchmarks", help="output folder")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: keep torch's default)"
    )
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    if not fused.available_for(args.device):
        p.error(f"the fused extension cannot run on {args.device}: {fused.extension_available()}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = dict(QUICK if args.quick else CONFIGS)
    if args.device == "cuda" and not args.quick:
        configs.update(GPU_EXTRA)
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs}
    rows = []
    for name, cfg in configs.items():
        run_config(name, cfg, args, rows)
    flat = memory_flatness(args)
    targets = summarise(rows, flat, args)
    prov = provenance(args)
    stem = "fused_vs_generic" + ("_cuda" if args.device == "cuda" else "")
    md = markdown(rows, targets, flat, prov)
    data = dict(provenance=prov, rows=rows, memory=flat, targets=targets)
    write_json_md(Path(args.out), stem, data, md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
