"""Training runs for the experiments: thin wrappers over :func:`resode.train.train`.

No training loop lives here: every classifier is trained by :mod:`resode.train`. This module only
turns a sweep point (plain keyword arguments, so submitit can pickle it) into a
:class:`~resode.train.TrainConfig`, keeps the dataset in memory between inline runs, and returns a
JSON-able result. Each run writes its checkpoint and ``metrics.jsonl`` in its own directory and
resumes from it (``resume=True``).

Besides the training metrics, a run reports what the experiments on the adjoint need:
:class:`BackwardLog` (per stage: backward passes, ``"auto"`` fallbacks, worst drift, read from
``stage.last_backward`` after every training step), :func:`residual_size` (how far the trained
residual functions are from zero) and the CPU time of the run (``cpu_time_s``: the process time,
which is the single-thread wall time on an idle machine; used to size the presets).
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resode.reproduce.files import write_json


@functools.lru_cache(maxsize=4)
def load_data(dataset: str, data_root: str | None, device: str, data_kwargs: str = "{}"):
    """The dataset (cached per process; ``data_kwargs`` is a JSON string so it hashes)."""
    from resode.data import get_dataset

    return get_dataset(dataset, root=data_root, device=device, **json.loads(data_kwargs))


def one_batch(
    dataset: str,
    data_root: str | None,
    data_kwargs: dict,
    batch: int,
    seed: int,
    split: str = "train",
):
    """One ``(x, y)`` batch of ``split`` on the CPU, drawn in the order given by ``seed``."""
    data = load_data(dataset, data_root, "cpu", json.dumps(data_kwargs, sort_keys=True))
    return next(iter(data.loader(split, batch, seed=seed)))


#: what reading a damaged checkpoint raises (torch.load of an empty, truncated or garbage
#: file: EOFError, RuntimeError, UnpicklingError, OSError; a foreign file: ValueError)
CHECKPOINT_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    pickle.UnpicklingError,
)


class CheckpointUnreadable(RuntimeError):
    """A checkpoint a sweep point needs cannot be read; the message names the run folder."""


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:  # the checkpoint module of the library, where it exists
        from resode.checkpoint import load_checkpoint
    except ImportError:
        from resode.train import load_checkpoint
    return load_checkpoint(path)


def checkpoint_problem(result: dict[str, Any]) -> str | None:
    """Why the checkpoint of a finished training point cannot be used (``None``: it can)."""
    path = result.get("checkpoint")
    if not path:
        return None
    if not Path(path).is_file():
        return f"its checkpoint {path} is missing; training {Path(path).parent} again"
    try:
        _load_checkpoint(path)
    except CHECKPOINT_READ_ERRORS as e:
        return (
            f"its checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
            f"training {Path(path).parent} again"
        )
    return None


def load_model(path: str | Path) -> nn.Module:
    """The model of a training checkpoint; a damaged file raises :class:`CheckpointUnreadable`
    naming the run folder to delete."""
    from resode.train import model_from_checkpoint

    try:
        return model_from_checkpoint(path)
    except CHECKPOINT_READ_ERRORS as e:
        raise CheckpointUnreadable(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete the run "
            f"folder {Path(path).parent} and rerun"
        ) from e


def _prepare_run_dir(run_dir: str, args: dict[str, Any]) -> None:
    """Start ``run_dir`` afresh when it was left by other arguments or holds a damaged
    checkpoint (never resume from either); record the arguments."""
    run = Path(run_dir)
    stamp = run / "run_args.json"
    text = json.dumps(args, sort_keys=True, default=str)
    fresh = stamp.is_file() and stamp.read_text() != text
    ckpt = run / "checkpoint.pt"
    if not fresh and ckpt.is_file():
        why = checkpoint_problem({"checkpoint": str(ckpt)})
        if why:
            print(f"[resode] {run}: {why.replace('its checkpoint', 'checkpoint')}", flush=True)
            fresh = True
    if fresh:
        for name in ("checkpoint.pt", "metrics.jsonl", "config.json", "backward_log.json"):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)


def _initial_model(
    init_checkpoint: str | None,
    transform: str | None,
    model_kwargs: dict[str, Any],
    backward_scope: str | None = None,
) -> nn.Module | None:
    """The starting model of a run that begins from a checkpoint (``None`` otherwise); its
    stages (those inside the module ``backward_scope`` only, when given) get
    ``model_kwargs["backward"]``."""
    if init_checkpoint is None:
        return None
    net = load_model(init_checkpoint)
    if transform == "untie":
        from resode.models import untie

        net = untie(net)
    elif transform is not None:
        raise ValueError(f"unknown transform {transform!r}")
    if "backward" in model_kwargs:
        import resode

        scope = net if backward_scope is None else net.get_submodule(backward_scope)
        resode.set_backward(scope, model_kwargs["backward"])
    return net


class BackwardLog:
    """What the backward passes of a model's stages did over a training run.

    A forward pre-hook on every :class:`resode.Stage` reads the stage's ``last_backward`` (the
    :class:`resode.BackwardReport` of the previous training step) when a new training forward
    starts; :meth:`close` reads the last one and removes the hooks. Each report is counted once
    (evaluation forwards run no backward). With ``path`` (``backward_log.json`` in a run
    directory) the counts of earlier calls on the same run are read first and the totals written
    back (atomically) by :meth:`close`, so a resumed run, also one resumed from a finished
    checkpoint, reports the whole run; passes re-run after an interruption (the steps after the
    last checkpoint) are counted each time they ran.

    :meth:`summary` gives, per stage: ``backwards`` (passes), ``fell_back`` (``"auto"`` passes
    that drifted beyond ``tol`` and returned exact gradients), ``exact`` (passes with exact
    gradients), ``worst_drift`` and ``mean_drift`` (relative ``||x^_0 - x_0|| / ||x_0||``; 0
    for autograd). A stage that publishes no report (the fused stages do not yet) shows 0
    passes.
    """

    def __init__(self, model: nn.Module, path: str | Path | None = None) -> None:
        from resode.stack import stages

        self._named = [(n, m) for n, m in model.named_modules() if m in set(stages(model))]
        self._seen: dict[str, Any] = {n: None for n, _ in self._named}
        self._stats = {
            n: dict(backwards=0, fell_back=0, exact=0, drift_sum=0.0, worst_drift=0.0)
            for n, _ in self._named
        }
        self._path = None if path is None else Path(path)
        if self._path is not None and self._path.is_file():
            before = json.loads(self._path.read_text())
            for n, st in self._stats.items():  # null: a NaN drift (write_json)
                old = before.get(n, {})
                st.update({k: float("nan") if v is None else v for k, v in old.items()})
        self._hooks = [
            m.register_forward_pre_hook(lambda mod, args, n=n: self._read(n, mod))
            for n, m in self._named
        ]

    def _read(self, name: str, stage: nn.Module) -> None:
        rep = stage.last_backward
        if rep is None or rep is self._seen[name]:
            return
        self._seen[name] = rep
        st, drift = self._stats[name], rep.drift
        st["backwards"] += 1
        st["fell_back"] += int(rep.fell_back)
        st["exact"] += int(rep.exact)
        st["drift_sum"] += drift
        st["worst_drift"] = drift if drift != drift else max(st["worst_drift"], drift)

    def close(self) -> None:
        """Read the last reports and remove the hooks."""
        for n, m in self._named:
            self._read(n, m)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._path is not None:
            write_json(self._path, self._stats)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for n, st in self._stats.items():
            k = st["backwards"]
            out[n] = {
                "backwards": k,
                "fell_back": st["fell_back"],
                "exact": st["exact"],
                "worst_drift": st["worst_drift"],
                "mean_drift": st["drift_sum"] / k if k else 0.0,
            }
        return out


@torch.no_grad()
def residual_size(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """``||x_out - x_in|| / ||x_in||`` of every stage of ``model`` on the batch ``x``, in eval
    mode (running statistics): how far the stage is from the identity, i.e. how large its
    residual functions have grown (zero-initialised functions start at 0)."""
    from resode.stack import stages

    found, sizes, hooks = set(stages(model)), {}, []
    for name, m in model.named_modules():
        if m in found:

            def hook(mod, args, out, name=name):
                sizes[name] = float((out - args[0]).norm() / args[0].norm().clamp_min(1e-30))

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return sizes


def stage_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes that the residual stages of ``model`` save for the backward during a forward of
    ``x`` (unique storages, parameters excluded; what the rest of the model saves is left out):
    the activation memory that the backward mode of the stages decides."""
    from resode.stack import stages

    found = set(stages(model))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, storages, keep = [0], {}, []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and t.layout == torch.strided:
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.data_ptr() != 0:
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
                keep.append(st)  # no reuse of the address while counting
        return t

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    hooks = []
    for m in model.modules():
        if m in found:
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    keep.clear()
    del out
    return sum(storages.values())


def batch_stats_accuracy(
    checkpoint: str,
    dataset: str,
    data_kwargs: dict,
    data_root: str | None,
    batch: int,
    max_batches: int | None,
    checkpoint_stamp: float | None = None,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Test accuracy of a trained model with its BatchNorm layers normalising by the statistics
    of each test batch (training mode, no gradient) instead of their running statistics: a
    diagnostic for tied stages, whose one set of running statistics averages over all steps
    (in training each step is normalised by its own batch statistics)."""
    data = load_data(dataset, data_root, "cpu", json.dumps(data_kwargs, sort_keys=True))
    net = load_model(checkpoint).train()
    correct = total = 0
    with fixed_threads(num_threads), torch.no_grad():
        for i, (x, y) in enumerate(data.loader("test", batch, seed=0)):
            if max_batches is not None and i >= max_batches:
                break
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return {"acc": correct / max(total, 1)}


def batch_stats_sweep(
    ctx, runs: list[dict[str, Any]], settings: dict[str, Any], folder="batch_stats"
):
    """:func:`batch_stats_accuracy` of the checkpoint of every training result in ``runs``, on
    the test batches that the training settings evaluate."""
    from .sweeps import file_stamp

    train = ctx.training(settings)
    jobs = [
        dict(checkpoint=r["checkpoint"], checkpoint_stamp=file_stamp(r["checkpoint"]),
             **ctx.data, batch=train.get("test_batch_size", 1000),
             max_batches=train.get("max_eval_batches"), num_threads=train.get("num_threads"))
        for r in runs
    ]  # fmt: skip
    return ctx.sweep(batch_stats_accuracy, jobs, key=lambda j: Path(j["checkpoint"]).parent.name,
                     folder=folder, desc="batch-statistics accuracy")  # fmt: skip


def _result(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of :func:`resode.train.train`'s result that the experiments use."""
    final = res["final"]
    return {
        "best_test_error": res["best_test_error"],
        "best_test_acc": res["best_test_acc"],
        "best_epoch": res["best_epoch"],
        "final_test_acc": final["test_acc"] if final else None,
        "final_train_loss": final["train_loss"] if final else None,
        "history": res["history"],
        "num_params": res["num_params"],
        "checkpoint": res["checkpoint"],
        "train_time_s": sum(h["train_time_s"] for h in res["history"]),
    }


def train_run(
    run_dir: str,
    model: str,
    model_kwargs: dict[str, Any],
    dataset: str,
    data_kwargs: dict[str, Any],
    data_root: str | None,
    device: str,
    seed: int,
    init_checkpoint: str | None = None,
    transform: str | None = None,
    residual_init: str = "zero",
    backward_scope: str | None = None,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train one model with :func:`resode.train.train`; returns JSON-able results.

    Args:
        run_dir: the run's directory (checkpoint, metrics; resumed if present and made with
            the same arguments, started afresh otherwise or when its checkpoint is damaged).
        model, model_kwargs: registry name and arguments.
        init_checkpoint: start from the weights of this checkpoint (its model rebuilt from the
            checkpoint's config), optionally passed through ``transform`` (``"untie"``).
        residual_init: ``"zero"`` (the models' default) or ``"standard"``
            (:func:`standard_residual_init`).
        backward_scope: with ``init_checkpoint``, set ``model_kwargs["backward"]`` only on the
            stages inside this module (e.g. ``"layer3"``), the others keep theirs.
        **train_kwargs: other :class:`~resode.train.TrainConfig` fields (epochs, lr, ...).
    """
    from resode.train import TrainConfig, build_model, train
    from resode.utils import seed_everything

    if residual_init not in ("zero", "standard"):
        raise ValueError(f"residual_init must be 'zero' or 'standard', got {residual_init!r}")
    args = dict(model=model, model_kwargs=model_kwargs, dataset=dataset, data_kwargs=data_kwargs)
    args.update(seed=seed, init_checkpoint=init_checkpoint, transform=transform)
    _prepare_run_dir(
        run_dir,
        dict(args, residual_init=residual_init, backward_scope=backward_scope, **train_kwargs),
    )
    t0 = time.process_time()
    data = load_data(dataset, data_root, device, json.dumps(data_kwargs, sort_keys=True))
    net = _initial_model(init_checkpoint, transform, model_kwargs, backward_scope)
    cfg = TrainConfig(
        model=model, model_kwargs=dict(model_kwargs), dataset=dataset, data_root=data_root,
        data_kwargs=dict(data_kwargs), seed=seed, device=device, out_dir=run_dir, resume=True,
        progress=False, **train_kwargs,
    )  # fmt: skip
    if net is None:  # built here (as train() would: same seed, same weights) to hook its stages
        seed_everything(seed)
        net = build_model(cfg, data)
        if residual_init == "standard":
            standard_residual_init(net)
    log = BackwardLog(net, Path(run_dir) / "backward_log.json")
    try:
        res = train(cfg, model=net, data=data)
    finally:
        log.close()
    trained = res.pop("model")
    out = _result(res)
    out["backward_log"] = log.summary()
    x, _ = next(iter(data.loader("test", min(256, len(data.test)), seed=0)))
    with fixed_threads(cfg.num_threads):
        out["residual_size"] = residual_size(trained, x.to(next(trained.parameters()).device))
    out["cpu_time_s"] = time.process_time() - t0
    return out


@contextlib.contextmanager
def fixed_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the block (``None``: unchanged)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def standard_residual_init(model: nn.Module) -> nn.Module:
    """Set the last BatchNorm weight of every residual function to 1 (in place): torchvision's
    default initialisation, under which the residual functions start at ``O(1)`` instead of 0.
    Works on generic stages and on the fused conv stage (its stacked ``bn2_weight``)."""
    from resode.fused import ConvStack
    from resode.stack import ResidualStack, stages

    for st in stages(model):
        if isinstance(st, ConvStack):
            nn.init.ones_(st.bn2_weight)
            continue
        if not isinstance(st, ResidualStack):
            raise NotImplementedError(f"standard_residual_init on a {type(st).__name__}")
        for n in range(st.depth):
            bns = [m for m in st.block(n).modules() if isinstance(m, _BatchNorm)]
            if bns:
                nn.init.ones_(bns[-1].weight)
    return model


# ----------------------------------------------------------------------------- preset settings
#: training settings shared by the smoke presets of the training experiments (seconds, CI)
SMOKE_TRAIN: dict[str, Any] = dict(
    epochs=1, batch_size=32, lr=0.1, max_steps_per_epoch=3, test_batch_size=256,
    max_eval_batches=1, num_threads=1,
)  # fmt: skip
#: shared by the quick presets (Fashion-MNIST on a CPU): SGD as in the paper, a cosine schedule
#: run to its end, 5000 test images, one thread (bitwise reproducible on one machine)
QUICK_TRAIN: dict[str, Any] = dict(
    batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    test_batch_size=1000, max_eval_batches=5, num_threads=1,
)  # fmt: skip
#: shared by the gpu presets (CIFAR-10 on one GPU, whole training and test sets): float32 (no
#: bf16 autocast: the adjoint's accuracy is what is measured) and deterministic kernels
GPU_TRAIN: dict[str, Any] = dict(
    batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    test_batch_size=1000, bf16=False, deterministic=True,
)  # fmt: skip


def quick_train(steps: int, epochs: int = 2, **over: Any) -> dict[str, Any]:
    """:data:`QUICK_TRAIN` for ``steps`` training steps in ``epochs`` epochs."""
    return {**QUICK_TRAIN, "epochs": epochs, "max_steps_per_epoch": steps // epochs, **over}


# ----------------------------------------------------------------------------- seed statistics
def by_seed(rows: list[dict[str, Any]], metric: str, **match: Any) -> dict[int, float]:
    """``{seed: row[metric]}`` over the training results whose job's ``model_kwargs`` contain
    ``match`` (a result that diverged, ``None``, counts as ``nan``)."""
    out = {}
    for r in rows:
        kw = r["job"]["model_kwargs"]
        if all(kw.get(k) == v for k, v in match.items()):
            v = r.get(metric)
            out[r["job"]["seed"]] = float("nan") if v is None else float(v)
    return out


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed in both (runs of one seed share initialisation and data
    order, so the paired difference removes what the seeds have in common)."""
    return [a[s] - b[s] for s in sorted(a) if s in b]


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (sample std over seeds)."""
    from .claims import seed_stats

    st = seed_stats(values)
    return f"{scale * st['mean']:.{digits}f} ± {scale * st['std']:.{digits}f}"


def stats_row(prefix: str, values: list[float]) -> dict[str, float]:
    """``{prefix_mean, prefix_std, prefix_min, prefix_max}`` over seeds, for a table row."""
    from .claims import seed_stats

    st = seed_stats(values)
    return {f"{prefix}_{k}": st[k] for k in ("mean", "std", "min", "max")}
