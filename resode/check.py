"""``resode check``: is the memory-free backward safe for this network?

    resode check tiny_resnet --dataset fashion_mnist              # registry model, real data
    resode check tiny_resnet --checkpoint run/ckpt.pt --dataset cifar10
    resode check tiny_resnet -k depth=32 -k scheme=heun --shape 3 32 32
    resode check examples/my_resnet.py:make_model --shape 3 32 32 --num-classes 10
    resode check my_package.models:make_model --dataset fashion_mnist --json

``MODEL`` is a registered model (:func:`resode.models.list`; ``-k KEY=VALUE`` sets its keywords,
``--checkpoint`` loads trained weights, the model then comes from the checkpoint's config) or
``module:factory`` for your own model: an importable module (the current directory is searched
first) or a ``.py`` file, and a function called with no arguments that returns the model. The
batch comes from a registered dataset (``--dataset``, its test split) or is random of shape
``--shape`` with ``--num-classes`` classes. The measurement is
:func:`resode.diagnostics.check`: a table (or ``--json``) with, per stage, depth, scheme, step,
reconstruction error, drift, gradient error for each refine, activation memory with autograd and
with the adjoint, and the recommended ``backward``/``refine``.

The lead wires it into ``resode`` with ``resode.check.add_parser(subparsers)`` and
``resode.check.main(args)``; ``python -m resode.check ...`` and :func:`run` work on their own.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diagnostics import CHECK_REFINES, CHECK_TARGET, check

__all__ = ["add_parser", "build_parser", "load_model", "main", "run"]


class CheckError(Exception):
    """A problem with the command's input, reported as one line."""


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "model",
        help="a registered model name (resode.models.list()) or module:factory / file.py:factory",
    )
    p.add_argument("--checkpoint", default=None, help="trained weights (a resode checkpoint)")
    p.add_argument(
        "-k",
        "--kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword of the registered model (repeatable), e.g. -k depth=32 -k scheme=heun",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", default=None, help="a registered dataset (test split)")
    data.add_argument(
        "--shape", type=int, nargs="+", default=None, help="random inputs of this shape (C H W)"
    )
    p.add_argument("--num-classes", type=int, default=10, help="classes of random targets")
    p.add_argument("--data-root", default=None, help="where to look for the dataset")
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="download the dataset when missing (default: no)",
    )
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and the model")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the measurement (default float64: errors down to ~1e-12)",
    )
    p.add_argument(
        "--refine",
        type=int,
        nargs="+",
        default=list(CHECK_REFINES),
        help="refine values to measure (default 0 1 2)",
    )
    p.add_argument(
        "--target",
        type=float,
        default=CHECK_TARGET,
        help=f"acceptable relative gradient error (default {CHECK_TARGET:g})",
    )
    p.add_argument(
        "--train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure in training mode (BatchNorm on batch statistics; default) or eval mode",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m resode.check``."""
    return _configure(
        argparse.ArgumentParser(
            prog="resode check", description="Is the memory-free backward safe for my network?"
        )
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``check`` command to ``resode``'s subparsers; dispatch to :func:`main`."""
    p = subparsers.add_parser(
        "check",
        help="is the memory-free backward safe for a network? (per stage)",
        description=build_parser().description,
    )
    _configure(p)
    p.set_defaults(func=main)
    return p


def _parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CheckError(f"bad --kwarg {item!r}: expected KEY=VALUE, e.g. -k depth=32")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a plain string (scheme=heun)
    return out


def _import_factory(spec: str):
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise CheckError(f"no such file: {module_name}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckError(f"cannot import {module_name!r} (from {spec!r}): {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckError(f"{module_name} has no function {attr!r} (from {spec!r})")
    return factory


def _model_from_checkpoint(path: str) -> nn.Module:
    """A registered model rebuilt from a checkpoint's stored config, with its weights."""
    from . import models

    if not Path(path).is_file():
        raise CheckError(f"no such checkpoint: {path}")
    state, cfg = models.read_model_state(path)
    if cfg is None:
        raise CheckError(
            f"{path} has no model config (not written by resode.train); give the model as "
            "module:factory together with --checkpoint"
        )
    return models.load_checkpoint_into(models.create(cfg.name, cfg.kwargs), state)


def load_model(
    spec: str, checkpoint: str | None, kwargs: dict[str, Any], data_info: dict[str, int]
) -> nn.Module:
    """The model named by ``spec`` (registry name or ``module:factory``), with weights from
    ``checkpoint`` when given. ``data_info`` (``num_classes``, ``in_channels``, ``image_size``)
    fills the registered model's keywords that are not set."""
    from . import models

    if ":" in spec:
        if kwargs:
            raise CheckError("--kwarg applies to registered models; a factory takes no arguments")
        model = _import_factory(spec)()
        if not isinstance(model, nn.Module):
            raise CheckError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
        if checkpoint is not None:
            models.load_checkpoint_into(model, checkpoint)
        return model
    if checkpoint is not None:
        if kwargs:
            raise CheckError("--kwarg cannot change a model loaded from --checkpoint")
        return _model_from_checkpoint(checkpoint)
    if not models.is_model(spec):
        raise CheckError(
            f"unknown model {spec!r}: give a registered name ({', '.join(models.list_models())}) "
            "or module:factory"
        )
    params = models.model_parameters(spec)
    for key, value in data_info.items():
        if key in params:
            kwargs.setdefault(key, value)
    return models.create(spec, kwargs)


def _batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    if args.dataset is not None:
        from .data import get_dataset

        data = get_dataset(args.dataset, root=args.data_root, download=args.download)
        loader = data.loader("test", batch_size=args.batch, seed=args.seed, shuffle=True)
        x, y = next(iter(loader))
        info = dict(num_classes=data.num_classes, in_channels=data.in_channels)
        return x, y, {**info, "image_size": data.image_size}
    shape = args.shape or [3, 32, 32]
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *shape, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
    info = {"num_classes": args.num_classes, "in_channels": shape[0]}
    if len(shape) == 3 and shape[1] == shape[2]:
        info["image_size"] = shape[1]
    return x, y, info


def main(args: argparse.Namespace) -> int:
    """Run ``resode check`` with parsed arguments; 0 on success, 2 on a reported error."""
    from .data import DatasetNotFoundError
    from .utils import resolve_device, seed_everything

    try:
        if args.batch < 2 and args.train:
            raise CheckError("--batch must be at least 2 in training mode (BatchNorm statistics)")
        device = resolve_device(args.device)
        dtype = getattr(torch, args.dtype)
        x, y, info = _batch(args)
        seed_everything(args.seed)
        model = load_model(args.model, args.checkpoint, _parse_kwargs(args.kwarg), info)
        model = model.to(device=device, dtype=dtype)
        report = check(
            model,
            x.to(device=device, dtype=dtype),
            y.to(device),
            refines=tuple(args.refine),
            target=args.target,
            training=args.train,
        )
    except (CheckError, DatasetNotFoundError, ValueError, TypeError, RuntimeError, OSError,
            IndexError) as e:  # fmt: skip
        msg = " ".join(str(e).split())
        print(f"resode check: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.table())
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m resode.check ARGS``: parse ``argv`` and run; returns the exit status."""
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
