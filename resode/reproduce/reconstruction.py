"""reconstruction: forward-then-reverse error of a random ResNet stage vs its depth ``N``.

For each ``N`` (2..2^15 in the paper), a randomly initialised tiny-ResNet stage (``N`` residual
functions conv3x3-BN-ReLU-conv3x3-BN, step ``1/N``) runs forward on real images (after the stem)
and the scheme's reverse steps rebuild the input from the output:
``||x - reverse(forward(x))|| / ||x||`` (:func:`resode.diagnostics.reconstruction_error`).
BatchNorm is in training mode (batch statistics, running statistics untouched).

Deviation: the tiny ResNet zero-initialises the last BatchNorm of each residual function
(``f_n = 0`` at initialisation, which would make the reconstruction trivially exact); here that
BatchNorm weight is reset to PyTorch's default (1) so every ``f_n`` is a random non-zero map.
Images: Fashion-MNIST (quick), CIFAR-10 (paper), synthetic (smoke or when the data is missing,
stated in the summary). Runs on the CPU or a GPU (``--device``; the ``gpu`` preset goes to
``N = 2^13``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from resode.utils import loglog_slope, seed_everything

from .claims import Claim
from .context import Context
from .experiment import Experiment
from .figures import pyplot

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(depths=[2**k for k in range(1, 6)], batch=16, channels=16, seeds=[0]),
    "quick": dict(depths=[2**k for k in range(1, 9)], batch=32, channels=16, seeds=[0]),
    "paper": dict(depths=[2**k for k in range(1, 16)], batch=128, channels=16, seeds=[0, 1]),
    "gpu": dict(depths=[2**k for k in range(1, 14)], batch=128, channels=16, seeds=[0, 1]),
}


def _images(dataset: str, data_kwargs: dict, data_root: str | None, batch: int, seed: int):
    """A batch of normalised test images (float, NCHW)."""
    from .training import one_batch

    x, _ = one_batch(dataset, data_root, data_kwargs, batch, seed, split="test")
    return x.float()


def measure_point(
    scheme: str,
    depth: int,
    seed: int,
    dataset: str,
    data_kwargs: dict,
    data_root: str | None,
    batch: int,
    channels: int,
    device: str = "cpu",
) -> dict[str, Any]:
    from resode.diagnostics import reconstruction_error
    from resode.models import create

    images = _images(dataset, data_kwargs, data_root, batch, seed)
    seed_everything(seed)
    model = create(
        "tiny_resnet",
        depth=depth,
        channels=channels,
        in_channels=images.shape[1],
        scheme=scheme,
        engine="generic",
    )
    stage = model.layer1
    for n in range(stage.depth):
        bns = [m for m in stage.block(n).modules() if isinstance(m, nn.BatchNorm2d)]
        nn.init.ones_(bns[-1].weight)  # undo zero-init: a random non-zero residual function
    model.train().to(device)
    with torch.no_grad():
        x = model.stem(images.to(device))  # (B, C, H', W')
    err = reconstruction_error(stage, x)
    return {"scheme": scheme, "depth": depth, "seed": seed, "error": err}


def collect(ctx: Context) -> list[dict[str, Any]]:
    data = ctx.data
    ctx.cfg["dataset"] = data_note = ctx.dataset
    try:
        _images(ctx.dataset, ctx.data_kwargs, ctx.data_root, 2, 0)
    except Exception as e:  # data missing: say so and use synthetic images
        data_note = f"synthetic (could not load {ctx.dataset}: {type(e).__name__})"
        data = dict(data, dataset="synthetic",
                    data_kwargs=dict(in_channels=3, image_size=32, num_test=256))  # fmt: skip
        ctx.cfg["dataset"] = data_note
    jobs = [
        dict(scheme=s, depth=n, seed=sd, **data, batch=ctx.cfg["batch"],
             channels=ctx.cfg["channels"],
             **({"device": ctx.device} if ctx.device != "cpu" else {}))
        for s in ("euler", "heun")
        for n in ctx.cfg["depths"]
        for sd in ctx.seeds
    ]  # fmt: skip
    return ctx.sweep(measure_point, jobs, key=lambda j: f"{j['scheme']}-N{j['depth']}-s{j['seed']}")


def aggregate(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    table = []
    for s in ("euler", "heun"):
        for n in ctx.cfg["depths"]:
            errs = [r["error"] for r in rows if r["scheme"] == s and r["depth"] == n]
            table.append(
                {"scheme": s, "depth": n, "error_mean": sum(errs) / len(errs), "seeds": len(errs)}
            )
    ctx.write_table("reconstruction.csv", table)
    slopes = {}
    for s in ("euler", "heun"):
        t = [r for r in table if r["scheme"] == s]
        slopes[s] = loglog_slope([r["depth"] for r in t], [r["error_mean"] for r in t])
    return {"slopes": slopes, "table": table, "images": ctx.cfg["dataset"]}


def figure(ctx: Context, numbers: dict[str, Any]):
    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    for s, mk in (("euler", "o-"), ("heun", "s-")):
        t = [r for r in numbers["table"] if r["scheme"] == s]
        ax.loglog(
            [r["depth"] for r in t],
            [r["error_mean"] for r in t],
            mk,
            label=f"{s} (slope {numbers['slopes'][s]:.2f})",
        )
    ax.set_xlabel("depth N")
    ax.set_ylabel(r"relative reconstruction error $\|x-\hat x\|/\|x\|$")
    ax.set_title(f"random-init conv stage, {numbers['images']} images")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def claims(ctx: Context, numbers: dict[str, Any]) -> list[Claim]:
    out = []
    for s in ("euler", "heun"):
        t = [r for r in numbers["table"] if r["scheme"] == s]
        first, last, slope = t[0]["error_mean"], t[-1]["error_mean"], numbers["slopes"][s]
        out.append(
            Claim(
                key=f"{s}_slope",
                text=f"reconstruction error of the reverse {s} steps vanishes as depth grows",
                evidence=(
                    f"{s}: error {first:.2e} at N={t[0]['depth']} -> {last:.2e} at "
                    f"N={t[-1]['depth']}, log-log slope {slope:.2f}"
                ),
                value=slope,
                verdict="reproduced" if (slope < -0.5 and last < first) else "not reproduced",
                rule="reproduced when the log-log slope is below -0.5 and the error at the "
                "largest depth is below the error at the smallest",
            )
        )
    return out


EXPERIMENT = Experiment(
    "reconstruction",
    "Reconstruction error of the reverse steps vs depth (random-init ResNet stage)",
    PRESETS, collect, aggregate, figure, claims,
    figure_name="reconstruction", paper_dataset="cifar10"
)  # fmt: skip
