"""What the paper presets cost: training runs, steps, FLOPs and GPU hours of each experiment.

For each training experiment (``tied-depth``, ``adjoint-failure``, ``heun-depth``,
``untie-finetune``, ``gradient-error``) the preset (``paper`` by default) is turned into training
runs *by the experiment's own code*: its ``collect`` hook runs against a recording context whose
sweeps train nothing -- every training job it submits is recorded (model, model kwargs with the
backward mode of every stage, dataset, training settings, fine-tuning transform and trainable
subset), other sweeps (gradient-error measurements, activation memory, batch-statistics
accuracy) are only counted. So the runs counted here are the runs ``resode reproduce --preset
paper`` trains, with nothing copied from the presets.

Runs with the same settings up to the seed form one *configuration*. For each one:

1. **FLOPs of one training step** (forward, cross-entropy, backward; the SGD update is not
   counted) with ``torch.utils.flop_counter.FlopCounterMode`` at a small batch (``--flop-batch``,
   default 2), on the CPU, scaled linearly to the preset's batch. The model is built as the
   training run builds it (``resode.train.build_model``, the run's ``residual_init``; fine-tuning
   runs: the pretraining model, untied if the run unties it, the backward mode set on its
   ``backward_scope``, only ``trainable`` modules trained), except that the residual stages run
   on the **generic engine** (the fused C++/CUDA kernels are invisible to the counter; both
   engines do the same arithmetic). FlopCounterMode counts matrix products and convolutions
   (BatchNorm, activations and other elementwise work are not counted): the adjoint's
   recomputation in its backward is counted, as it runs. ``backward="auto"`` is counted as it runs
   on one step from initialisation on random inputs (whether it falls back later in training is
   data-dependent). Also the FLOPs of the evaluation forward run after every epoch on the test
   split.
2. **Measured step time** (``--measure-steps K``; default 0 on the CPU, 5 on CUDA): ``K`` steps at
   the preset's batch on ``--device``, built exactly as the run (engine included; bf16 autocast
   when the run uses it on CUDA; SGD with the run's parameter groups), after 2 warm-up steps,
   synchronised; the median. The evaluation forward is timed the same way at the run's test
   batch.
3. **Totals**: steps = runs x epochs x steps per epoch (``floor(train size / batch)``: the
   training loader drops the last partial batch), PFLOP (training steps + evaluation), and
   hours = measured step time x steps (+ measured evaluation time) where measured, else
   PFLOP / the *assumed* sustained rate ``--assume-tflops`` (default 100 TFLOP/s: a guess,
   labelled as such in every table; about 10 % of an H100 SXM's dense bf16 peak, 20 % of its
   dense TF32 peak -- most paper presets train in float32).

Outputs ``results/benchmarks/paper_cost.{json,md}`` (``--out``): provenance (torch, device,
command, date, machine), one table per experiment and a summary row per experiment.

    python benchmarks/paper_cost.py                          # FLOP counts, CPU, all five
    python benchmarks/paper_cost.py --device cuda            # + measured step times (GPU)
    python benchmarks/paper_cost.py --experiments heun-depth --preset gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if (_HERE.parent / "resode" / "__init__.py").exists():  # run from a checkout
    sys.path.insert(1, str(_HERE.parent))

import _common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

#: the training experiments, in the order of the report
EXPERIMENTS = ("tied-depth", "adjoint-failure", "heun-depth", "untie-finetune", "gradient-error")
#: dataset -> (train size, test size, channels, image size, classes); ImageNet: ILSVRC2012 train
#: and val, image size from ``data_kwargs["image_size"]`` (the loader's default 224);
#: ``synthetic``: from its ``data_kwargs`` and :func:`resode.data.synthetic`'s defaults
DATASETS: dict[str, tuple[int, int, int, int, int]] = {
    "cifar10": (50_000, 10_000, 3, 32, 10),
    "cifar100": (50_000, 10_000, 3, 32, 100),
    "imagenet": (1_281_167, 50_000, 3, 224, 1000),
    "fashion_mnist": (60_000, 10_000, 1, 28, 10),
}
#: training-run keywords that are not :class:`resode.train.TrainConfig` fields
RUN_KEYS = ("run_dir", "data_root", "device", "seed", "init_checkpoint", "transform",
            "residual_init", "backward_scope")  # fmt: skip
#: the label of the assumed rate (H100 SXM dense peaks: bf16 989 TFLOP/s, TF32 495; the presets
#: mostly train in float32, where cuDNN runs convolutions in TF32 by default)
ASSUMPTION = (
    "assumed {tflops:g} TFLOP/s sustained (a guess, not measured: {bf16:.0f}% of an H100 SXM's "
    "dense bf16 peak, {tf32:.0f}% of its dense TF32 peak)"
)
H100_PEAK_TFLOPS = {"bf16": 989.0, "tf32": 495.0}


# --------------------------------------------------------------------------- the runs of a preset
@dataclasses.dataclass
class DataShape:
    """What the cost of a run needs to know about its dataset."""

    name: str
    train: int
    test: int
    channels: int
    size: int
    classes: int

    @classmethod
    def of(cls, dataset: str, data_kwargs: dict[str, Any]) -> DataShape:
        if dataset == "synthetic":
            from resode.data import synthetic

            d = {k: p.default for k, p in inspect.signature(synthetic).parameters.items()}
            d.update(data_kwargs)
            return cls(dataset, d["num_train"], d["num_test"], d["in_channels"],
                       d["image_size"], d["num_classes"])  # fmt: skip
        if dataset not in DATASETS:
            raise SystemExit(f"paper_cost: no shape known for dataset {dataset!r}; add it to "
                             "DATASETS in benchmarks/paper_cost.py")  # fmt: skip
        train, test, c, size, k = DATASETS[dataset]
        return cls(dataset, train, test, c, data_kwargs.get("image_size", size), k)


def record_jobs(exp_id: str, preset: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The training jobs that ``exp_id``'s ``collect`` submits for ``preset`` (seeds included),
    and how many points each of its other sweeps has; nothing is trained or measured."""
    from resode.reproduce import get_experiment
    from resode.reproduce.context import Context

    exp = get_experiment(exp_id)
    jobs: list[dict[str, Any]] = []
    others: dict[str, int] = defaultdict(int)

    class Recorder(Context):
        def train_sweep(self, jobs_, folder="runs", desc=None, fn=None):
            jobs.extend(jobs_)
            return [{"job": j, "checkpoint": str(Path(j["run_dir"]) / "checkpoint.pt")}
                    for j in jobs_]  # fmt: skip

        def sweep(self, fn, jobs_, key, folder="runs", desc=None, launcher=None, validate=None):
            others[desc or fn.__name__] += len(jobs_)
            return [defaultdict(float) for _ in jobs_]

    with tempfile.TemporaryDirectory() as tmp:  # job paths only; nothing is written there
        ctx = exp.context(preset, tmp, None, "cpu", None, "inline")
        rec = Recorder(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)})
        exp.collect(rec)
    return jobs, dict(others)


#: job keys that differ between the runs of one configuration (a fine-tuning run's
#: ``init_checkpoint`` is compared through the pretraining job it names)
PER_RUN_KEYS = ("run_dir", "seed", "device", "data_root", "init_checkpoint")


def _without_seed(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in PER_RUN_KEYS}


def configurations(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the jobs by their settings up to the seed: ``[{"job", "runs", "base"}]`` (``base``:
    the pretraining job of a fine-tuning run, found by its checkpoint)."""
    by_ckpt = {str(Path(j["run_dir"]) / "checkpoint.pt"): j for j in jobs}
    groups: dict[str, dict[str, Any]] = {}
    for j in jobs:
        base = by_ckpt.get(j.get("init_checkpoint") or "")
        key = json.dumps([_without_seed(j), base and _without_seed(base)], sort_keys=True,
                         default=str)  # fmt: skip
        g = groups.setdefault(key, {"job": j, "runs": 0, "base": base})
        g["runs"] += 1
    return list(groups.values())


def train_config(job: dict[str, Any]):
    """The :class:`resode.train.TrainConfig` of a recorded training job (checks its fields)."""
    from resode.train import TrainConfig

    kw = {k: v for k, v in job.items() if k not in RUN_KEYS}
    return TrainConfig(**kw)


def steps_per_epoch(cfg, data: DataShape) -> int:
    """Training steps of one epoch: the loader drops the last partial batch."""
    steps = data.train // cfg.batch_size
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def eval_samples(cfg, data: DataShape) -> int:
    """Test images evaluated after each epoch."""
    if cfg.max_eval_batches is None:
        return data.test
    return min(data.test, cfg.max_eval_batches * cfg.test_batch_size)


def build(config: dict[str, Any], data: DataShape, engine: str | None) -> nn.Module:
    """The model of a configuration as its training run starts it (``engine``: override the
    engine of the residual stages, ``None``: the run's own)."""
    import resode
    from resode.models import untie
    from resode.reproduce.training import standard_residual_init
    from resode.train import apply_trainable, build_model
    from resode.utils import seed_everything

    job, base = config["job"], config["base"]
    shape = SimpleNamespace(num_classes=data.classes, in_channels=data.channels,
                            image_size=data.size)  # fmt: skip
    start = base if base is not None else job
    cfg = train_config(start)
    if engine is not None:
        cfg.model_kwargs = dict(cfg.model_kwargs, engine=engine)
    seed_everything(job["seed"])
    net = build_model(cfg, shape)
    if start.get("residual_init", "zero") == "standard":
        standard_residual_init(net)
    if base is not None:  # as resode.reproduce.training._initial_model prepares a fine-tuning
        if job.get("transform") == "untie":
            net = untie(net)
        if "backward" in job["model_kwargs"]:
            scope = job.get("backward_scope")
            resode.set_backward(net if scope is None else net.get_submodule(scope),
                                job["model_kwargs"]["backward"])  # fmt: skip
    apply_trainable(net, train_config(job).trainable)
    return net.train()


def batch_of(data: DataShape, batch: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, data.channels, data.size, data.size, generator=g)
    y = torch.randint(0, data.classes, (batch,), generator=g)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------- counting and timing
class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to ``"Global"``."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class StepFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module breakdown. Its ModuleTracker puts backward
    hooks on module outputs, which make the ``torch.autograd.grad`` that the reconstruction
    adjoint calls inside its backward fail ("A leaf node was passed to
    _will_engine_execute_node"); the counting itself (the flop registry, the dispatch mode) is
    FlopCounterMode's."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs (matrix products and convolutions) of forward + cross-entropy + backward."""
    model.zero_grad(set_to_none=True)
    with StepFlopCounter() as counter:
        F.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def eval_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of the evaluation forward (eval mode, no gradient)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), StepFlopCounter() as counter:
            model(x)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def measure(config: dict[str, Any], data: DataShape, args: argparse.Namespace) -> dict[str, Any]:
    """Median step time at the run's batch on ``args.device`` (engine and bf16 as the run), and
    the median time of one evaluation forward at its test batch."""
    from resode.train import param_groups

    cfg = train_config(config["job"])
    dev = args.device
    net = build(config, data, engine=None).to(dev)
    opt = torch.optim.SGD(param_groups(net, cfg), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    bf16 = bool(cfg.bf16) and dev == "cuda"
    x, y = batch_of(data, cfg.batch_size, dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    xe, _ = batch_of(data, min(cfg.test_batch_size, data.test), dev, seed=1)

    def evaluate():
        net.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            net(xe)
        net.train()

    try:
        times = _common.time_calls(step, dev, warmup=2, reps=args.measure_steps)
        etimes = _common.time_calls(evaluate, dev, warmup=1, reps=max(1, args.measure_steps // 2))
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()
    return {"step_s": _common.median(times), "step_times_s": times, "bf16": bf16,
            "eval_s_per_sample": _common.median(etimes) / len(xe)}  # fmt: skip


def describe(config: dict[str, Any]) -> str:
    """A short label: model and kwargs, and for a fine-tuning run what it starts from."""
    job, base = config["job"], config["base"]

    def kw(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in d.items())

    if base is None:
        return f"{job['model']}({kw(job['model_kwargs'])})"
    how = "untied" if job.get("transform") == "untie" else "kept tied"
    return (
        f"fine-tune {job.get('trainable')}, {how}, {kw(job['model_kwargs'])} "
        f"on {job.get('backward_scope')} | from {base['model']}({kw(base['model_kwargs'])})"
    )


def cost_of(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every number of one configuration."""
    job = config["job"]
    data = DataShape.of(job["dataset"], job.get("data_kwargs") or {})
    cfg = train_config(job)
    net = build(config, data, engine="generic")
    x, y = batch_of(data, args.flop_batch)
    per_sample = step_flops(net, x, y) / args.flop_batch
    eval_per_sample = eval_flops(net, x) / args.flop_batch
    del net
    spe = steps_per_epoch(cfg, data)
    runs, epochs = config["runs"], cfg.epochs
    steps = runs * epochs * spe
    n_eval = runs * epochs * eval_samples(cfg, data)
    row = {
        "config": describe(config),
        "dataset": data.name,
        "runs": runs,
        "epochs": epochs,
        "batch": cfg.batch_size,
        "bf16": bool(cfg.bf16),
        "steps_per_epoch": spe,
        "steps": steps,
        "gflop_per_step": per_sample * cfg.batch_size / 1e9,
        "eval_gflop_per_sample": eval_per_sample / 1e9,
        "train_pflop": per_sample * cfg.batch_size * steps / 1e15,
        "eval_pflop": eval_per_sample * n_eval / 1e15,
        "eval_samples": n_eval,
    }
    row["pflop"] = row["train_pflop"] + row["eval_pflop"]
    row["hours_assumed"] = row["pflop"] * 1e15 / (args.assume_tflops * 1e12) / 3600
    if args.measure_steps > 0:
        m = measure(config, data, args)
        row["measured"] = m
        if "step_s" in m:
            row["hours_measured"] = (m["step_s"] * steps + m["eval_s_per_sample"] * n_eval) / 3600
    return row


def experiment_cost(exp_id: str, plan, args: argparse.Namespace, bar) -> dict[str, Any]:
    """The configurations of one experiment's preset (``plan``: :func:`record_jobs`' answer)
    and their totals."""
    jobs, others = plan
    rows = []
    for config in configurations(jobs):
        if bar is not None:
            bar.set_postfix_str(f"{exp_id}: {describe(config)[:50]}")
        rows.append(cost_of(config, args))
        if bar is not None:
            bar.update(1)
    measured = args.measure_steps > 0 and all("hours_measured" in r for r in rows)
    total = {k: sum(r[k] for r in rows) for k in ("runs", "steps", "pflop", "hours_assumed")}
    total["hours_measured"] = sum(r["hours_measured"] for r in rows) if measured else None
    return {"experiment": exp_id, "configs": rows, "total": total,
            "not_counted": others}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every experiment of ``args.experiments``; returns the result dict. ``--threads``
    applies to this run only."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    threads_before = torch.get_num_threads()
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        plans = {e: record_jobs(e, args.preset) for e in args.experiments}
        bar = _common.progress(sum(len(configurations(p[0])) for p in plans.values()), "cost")
        exps = [experiment_cost(e, plans[e], args, bar) for e in args.experiments]
        if bar is not None:
            bar.close()
        info = _common.machine_info(args.device)
    finally:
        torch.set_num_threads(threads_before)
    return {
        "provenance": {
            "command": "python benchmarks/paper_cost.py " + " ".join(args.argv),
            "date": started,
            "wall_s": time.perf_counter() - t0,
            "machine": info,
            "preset": args.preset,
            "flop_batch": args.flop_batch,
            "measure_steps": args.measure_steps,
            "assume_tflops": args.assume_tflops,
            "assumption": ASSUMPTION.format(
                tflops=args.assume_tflops,
                **{k: 100 * args.assume_tflops / v for k, v in H100_PEAK_TFLOPS.items()},
            ),
        },
        "experiments": exps,
    }


# --------------------------------------------------------------------------- report
def _hours(h: float | None) -> str:
    return "-" if h is None else f"{h:,.1f}" if h >= 1 else f"{h:.2f}"


def summary_table(result: dict[str, Any]) -> list[str]:
    prov = result["provenance"]
    lines = [
        f"| experiment | runs | steps | PFLOP | GPU hours, {prov['assumption']} | "
        "GPU hours, measured step time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in result["experiments"]:
        t = e["total"]
        lines.append(f"| {e['experiment']} | {t['runs']} | {t['steps']:,} | {t['pflop']:,.1f} | "
                     f"{_hours(t['hours_assumed'])} | {_hours(t['hours_measured'])} |")  # fmt: skip
    return lines


def experiment_table(e: dict[str, Any]) -> list[str]:
    lines = [
        "| configuration | runs | epochs x steps/epoch (batch) | precision | GFLOP/step |"
        " eval GFLOP/img | PFLOP | hours (assumed) | measured ms/step | hours (measured) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in e["configs"]:
        m = r.get("measured") or {}
        ms = f"{1e3 * m['step_s']:.1f}" if "step_s" in m else m.get("error", "-")
        lines.append(
            f"| {r['config']} | {r['runs']} | {r['epochs']} x {r['steps_per_epoch']} "
            f"({r['batch']}) | {'bf16 autocast' if r['bf16'] else 'float32'} | "
            f"{r['gflop_per_step']:,.1f} | {r['eval_gflop_per_sample']:.3f} | "
            f"{r['pflop']:,.2f} | {_hours(r['hours_assumed'])} | {ms} | "
            f"{_hours(r.get('hours_measured'))} |"
        )
    if e["not_counted"]:
        lines += ["", "Not counted (measurement sweeps, not training): " + ", ".join(
            f"{k} ({v} points)" for k, v in e["not_counted"].items()) + "."]  # fmt: skip
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    prov, info = result["provenance"], result["provenance"]["machine"]
    head = [
        f"# Cost of the `{prov['preset']}` presets",
        "",
        f"`{prov['command']}` on {prov['date']}; torch {info['torch']}, device "
        f"{info.get('gpu', info['device'])} ({info['cpu']}, {info['torch_threads']} threads).",
        "",
        f"FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions), "
        f"one training step (forward, cross-entropy, backward) at batch {prov['flop_batch']} "
        "on the generic engine, scaled linearly to the preset's batch; evaluation: the eval "
        "forward over the test split after every epoch. Steps per epoch: floor(train size / "
        "batch). Hours (assumed): PFLOP / " + prov["assumption"] + "; for the tiny ResNets a "
        "GPU step is launch-bound, far below that rate, so there it is a lower bound. Hours "
        f"(measured): {prov['measure_steps']} timed steps per configuration at the preset's "
        "batch on the device"
        + (" (none: `--measure-steps 0`)." if not prov["measure_steps"] else "."),  # fmt: skip
        "",
        *summary_table(result),
        "",
    ]
    body = []
    for e in result["experiments"]:
        body += [f"## {e['experiment']}", "", *experiment_table(e), ""]
    return "\n".join(head + body)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the Markdown report and write ``<out>/paper_cost.{json,md}``."""
    args = parse_args(argv)
    result = run(args)
    md = to_markdown(result)
    paths = _common.write_json_md(args.out, "paper_cost", result, md)
    print(md, "\nwrote", *map(str, paths))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where step times are measured (FLOPs are always counted on the CPU)",
    )
    add("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    add("--preset", default="paper", help="the preset whose cost is estimated (default paper)")
    add(
        "--measure-steps",
        type=int,
        default=None,
        help="timed steps per configuration at the preset's batch (default 0 on cpu, 5 on cuda)",
    )
    add("--flop-batch", type=int, default=2, help="batch at which FLOPs are counted")
    add(
        "--assume-tflops",
        type=float,
        default=100.0,
        help="assumed sustained TFLOP/s for the hours without a measured step time",
    )
    add("--threads", type=int, default=1, help="intra-op CPU threads (0: torch's default)")
    add("--out", type=Path, default=Path("results/benchmarks"))  # fmt: skip
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.measure_steps is None:
        a.measure_steps = 5 if a.device == "cuda" else 0
    for name in ("flop_batch", "assume_tflops"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.measure_steps < 0:
        p.error("--measure-steps must be >= 0")
    return a


if __name__ == "__main__":
    main()
