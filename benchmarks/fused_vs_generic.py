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
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from resode import fused
from resode.diagnostics import saved_tensor_bytes

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
# GPU-only extra target: tiny conv stage, batch 256, depth 64: fused adjoint vs PyTorch autograd
GPU_EXTRA = {"tiny_conv_b256_d64": dict(kind="conv", batch=256, channels=16, size=10, depth=64)}


def make_stage(cfg: dict, scheme: str, backward: str, device, dtype):
    if cfg["kind"] == "mlp":
        f = fused.MLPStack(
            cfg["dim"],
            cfg["hidden"],
            cfg["depth"],
            activation="tanh",
            scheme=scheme,
            backward=backward,
        )
        shape = (cfg["batch"], cfg["dim"])
    else:
        f = fused.ConvStack(cfg["channels"], cfg["depth"], scheme=scheme, backward=backward)
        with torch.no_grad():  # a non-trivial residual branch
            f.bn2_weight.fill_(1.0)
        shape = (cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
    f = f.to(device=device, dtype=dtype)
    g = f.to_generic()
    return f, g, shape


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_step(stage, x, w, warmup: int, steps: int, device) -> float:
    params = list(stage.parameters())

    def step():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        loss = (stage(xi) * w).sum()
        loss.backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def activation_bytes(stage, x) -> int:
    xi = x.detach().requires_grad_(True)
    return saved_tensor_bytes(stage, xi, exclude=list(stage.parameters()))


def run_config(name, cfg, args, rows):
    for scheme in ("euler", "heun"):
        for backward in ("autograd", "adjoint"):
            torch.manual_seed(0)
            f, g, shape = make_stage(cfg, scheme, backward, args.device, args.dtype)
            x = torch.randn(*shape, device=args.device, dtype=args.dtype)
            w = torch.randn(*shape, device=args.device, dtype=args.dtype)
            row = dict(config=name, scheme=scheme, backward=backward, **cfg)
            for engine, stage in (("fused", f), ("generic", g)):
                row[f"{engine}_s"] = time_step(stage, x, w, args.warmup, args.steps, args.device)
                row[f"{engine}_act_bytes"] = activation_bytes(stage, x)
            row["speedup"] = row["generic_s"] / row["fused_s"]
            rows.append(row)
            print(
                f"{name:20s} {scheme:5s} {backward:8s} fused {row['fused_s'] * 1e3:9.2f} ms  "
                f"generic {row['generic_s'] * 1e3:9.2f} ms  x{row['speedup']:.2f}  "
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


def summarise(rows, flat, args) -> dict:
    def find(config, scheme, backward):
        for r in rows:
            if (r["config"], r["scheme"], r["backward"]) == (config, scheme, backward):
                return r
        return None

    targets = []
    if args.device == "cpu":
        for config, need in (("narrow_mlp", 3.0), ("wide_mlp", 1.2), ("tiny_conv", 1.5)):
            for scheme in ("euler", "heun"):
                r = find(config, scheme, "adjoint")
                if r:
                    targets.append(
                        dict(
                            target=f"{config} {scheme} adjoint: fused >= {need}x faster",
                            value=round(r["speedup"], 2),
                            met=r["speedup"] >= need,
                        )
                    )
        for config in CONFIGS:
            for scheme in ("euler", "heun"):
                a, b = find(config, scheme, "adjoint"), find(config, scheme, "autograd")
                if a and b:
                    ratio = a["fused_s"] / b["fused_s"]
                    targets.append(
                        dict(
                            target=f"{config} {scheme}: fused adjoint <= 1.7x fused autograd",
                            value=round(ratio, 2),
                            met=ratio <= 1.7,
                        )
                    )
    else:
        for scheme in ("euler", "heun"):
            r = find("tiny_conv_b256_d64", scheme, "adjoint")
            ra = find("tiny_conv_b256_d64", scheme, "autograd")
            if r and ra:
                ratio = r["fused_s"] / ra["generic_s"]
                targets.append(
                    dict(
                        target=f"GPU tiny conv b256 d64 {scheme}: fused adjoint <= 1.5x "
                        "PyTorch autograd",
                        value=round(ratio, 2),
                        met=ratio <= 1.5,
                    )
                )
            for backward in ("autograd", "adjoint"):
                r = find("narrow_mlp", scheme, backward)
                if r:
                    targets.append(
                        dict(
                            target=f"GPU narrow MLP {scheme} {backward}: fused >= 5x generic",
                            value=round(r["speedup"], 2),
                            met=r["speedup"] >= 5.0,
                        )
                    )
    for key, v in flat.items():
        targets.append(
            dict(
                target=f"{key}: fused adjoint memory flat (depth 1024 / 16 within 5%)",
                value=round(v["ratio"], 4),
                met=abs(v["ratio"] - 1) <= 0.05,
            )
        )
    return targets


def provenance(args) -> dict:
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=args.device,
        dtype=str(args.dtype),
        steps=args.steps,
        warmup=args.warmup,
        quick=args.quick,
        extension=fused.extension_available().as_dict(),
    )
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown(rows, targets, flat, prov) -> str:
    lines = [
        "# Fused vs generic residual stages",
        "",
        f"{prov['date']} · torch {prov['torch']} · {prov['device']}"
        + (f" ({prov.get('gpu')})" if prov.get("gpu") else f" ({prov['torch_threads']} threads)")
        + f" · {prov['dtype']} · median of {prov['steps']} steps after {prov['warmup']} warm-up"
        + (" · QUICK sizes" if prov["quick"] else ""),
        "",
        "| config | scheme | backward | fused ms | generic ms | speedup | fused act MiB "
        "| generic act MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['scheme']} | {r['backward']} | {r['fused_s'] * 1e3:.2f} | "
            f"{r['generic_s'] * 1e3:.2f} | {r['speedup']:.2f}x | "
            f"{r['fused_act_bytes'] / 2**20:.3f} | {r['generic_act_bytes'] / 2**20:.3f} |"
        )
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |")
    lines += ["", "Adjoint activation memory (bytes) at depth 16 vs 1024:", ""]
    for k, v in flat.items():
        lines.append(f"- {k}: {v['depth16']} vs {v['depth1024']} (ratio {v['ratio']:.4f})")
    return "\n".join(lines) + "\n"


def main(argv=None):
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
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    if not fused.available_for(args.device):
        p.error(f"the fused extension cannot run on {args.device}: {fused.extension_available()}")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "fused_vs_generic" + ("_cuda" if args.device == "cuda" else "")
    (out / f"{stem}.json").write_text(
        json.dumps(dict(provenance=prov, rows=rows, memory=flat, targets=targets), indent=2)
    )
    md = markdown(rows, targets, flat, prov)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
