"""Model surgery: untie tied stages, resample depth, load checkpoints across depths.

These act on every :class:`resode.Stage` of a model and keep the model's
:class:`~resode.models.ModelConfig` in step, so the result can be checkpointed and rebuilt.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..stack import ResidualStack, Stage
from ._registry import ModelConfig, create, get_config, unwrap


def _explicit_step(stack: Stage) -> float | str | None:
    """The stack's step if it was set explicitly (a number, or ``"unit"``: ``1/num_steps``),
    ``None`` if it is the default ``1/N``."""
    step = stack.stage_kwargs()["step"]
    if step is None or isinstance(step, str):
        return step
    return None if math.isclose(step, 1.0 / stack.depth, rel_tol=1e-12) else step


def _stack_kwargs(stack: ResidualStack) -> dict[str, Any]:
    """The keywords that rebuild ``stack`` at another depth or untied (``tied`` aside)."""
    kw = stack.stage_kwargs()
    del kw["tied"]
    return dict(kw, step=_explicit_step(stack), preserve_rng=stack.preserve_rng)


def _rebuild(stage: Stage, fn: Callable[[ResidualStack], ResidualStack]) -> Stage:
    """Apply ``fn`` to a generic stack; fused stages go through ``to_generic``/``from_generic``."""
    if isinstance(stage, ResidualStack):
        return fn(stage)
    if hasattr(stage, "to_generic"):
        new = fn(stage.to_generic())
        try:
            return type(stage).from_generic(new)
        except Exception:  # the fused engine cannot hold this stage: keep the generic one
            return new
    raise TypeError(
        f"cannot operate on stage of type {type(stage).__name__}: it is neither a "
        "ResidualStack nor a fused stage with to_generic()/from_generic()"
    )


def _replace_stages(
    model: nn.Module, fn: Callable[[int, Stage], Stage]
) -> tuple[nn.Module, list[int]]:
    """Deep-copy ``model``, replace its ``i``-th stage by ``fn(i, stage)``; return new depths."""
    model = copy.deepcopy(unwrap(model))
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, Stage) and n]
    # outermost stages only (a stage nested in another one is handled by its parent)
    top = [(n, m) for n, m in named if not any(n.startswith(p + ".") for p, _ in named)]
    if not top:
        raise ValueError(f"{type(model).__name__} has no residual stage (resode.Stage) to change")
    depths = []
    for i, (name, stage) in enumerate(top):
        new = fn(i, stage)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        depths.append(new.depth)
    return model, depths


def _update_config(model: nn.Module, depths=None, tied=None) -> None:
    if get_config(model) is not None and hasattr(model, "config_with"):
        model.config = model.config_with(depths=depths, tied=tied)


def untie(model: nn.Module) -> nn.Module:
    """Tied -> untied copy: every step gets its own deep copy of the shared block.

    The function computed is unchanged (same step, scheme, backward mode, refine and tol;
    BatchNorm running statistics are copied too), so outputs agree to float rounding. Untied
    stages are copied as they are. The input model is not modified.
    """

    def untie_stack(s: ResidualStack) -> ResidualStack:
        if not s.tied:
            return copy.deepcopy(s)
        blocks = [copy.deepcopy(s.block(n)) for n in range(s.depth)]
        return ResidualStack(blocks, **_stack_kwargs(s))

    new, _ = _replace_stages(model, lambda i, st: _rebuild(st, untie_stack))
    _update_config(new, tied=False)
    return new


def resample_depth(model: nn.Module, depth: int | Sequence[int]) -> nn.Module:
    """Copy of ``model`` whose residual stages have ``depth`` residual functions.

    Untied stage with ``N0`` functions -> ``N``: function ``i`` is a copy of function
    ``floor(i * N0 / N)`` (paper, Fig 4). Tied stage: the same shared block with ``N`` steps.
    The step becomes ``1/N`` (unless the stage had an explicit step, which is kept; ``"unit"``
    stays ``"unit"``, i.e. ``1/num_steps`` of the new depth). Backward mode, refine and tol
    are kept.

    Args:
        depth: one depth for every stage, or one per stage (in forward order). For the ResNet
            family this counts the residual functions of each stack (``layers[i] - 1``).
    """
    stages_ = [m for n, m in unwrap(model).named_modules() if isinstance(m, Stage) and n]
    if not isinstance(depth, int) and len(depth) != len(stages_):
        raise ValueError(f"got {len(depth)} depths for a model with {len(stages_)} stages")

    def resample(i: int, stage: Stage) -> Stage:
        n_new = depth if isinstance(depth, int) else depth[i]
        if not isinstance(n_new, int) or n_new < 1:
            raise ValueError(f"depth must be a positive integer, got {n_new!r}")

        def fn(s: ResidualStack) -> ResidualStack:
            kw = _stack_kwargs(s)
            if s.tied:
                return ResidualStack(copy.deepcopy(s.blocks[0]), n_new, tied=True, **kw)
            n0 = s.depth
            blocks = [copy.deepcopy(s.block(j * n0 // n_new)) for j in range(n_new)]
            return ResidualStack(blocks, **kw)

        return _rebuild(stage, fn)

    new, depths = _replace_stages(model, resample)
    _update_config(new, depths=depths)
    return new


def read_model_state(obj: Any) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """``(state dict, model config or None)`` of a checkpoint path, a checkpoint dict (with
    ``"model"`` and ``"model_config"``, as :mod:`resode.train` writes them) or a state dict."""
    if isinstance(obj, (str, os.PathLike)):
        # lazy: resode.checkpoint imports resode.models (rebuilds models from their configs)
        from ..checkpoint import read_file

        obj = read_file(obj)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        cfg = obj.get("model_config")
        return obj["model"], (ModelConfig.from_dict(cfg) if cfg else None)
    if isinstance(obj, dict):
        return obj, None
    raise TypeError(f"expected a checkpoint path, a checkpoint dict or a state dict, got {obj!r}")


def load_checkpoint_into(model: nn.Module, checkpoint: Any, resample: bool = False) -> nn.Module:
    """Load a checkpoint's weights into ``model``, possibly of another depth.

    Tied models: the parameters do not depend on the number of steps, so a checkpoint of a
    tied model loads into the same model at any depth. Untied models of another depth load
    only with ``resample=True``: the checkpoint's model is rebuilt from its config, resampled
    with :func:`resample_depth` to ``model``'s depths, then loaded.

    Args:
        checkpoint: a path, a checkpoint dict written by :func:`resode.train.train` (with
            ``"model"`` and ``"model_config"``), or a plain state dict.

    Returns:
        ``model`` (loaded in place).

    Raises:
        ValueError: the checkpoint does not fit ``model`` (names the mismatching keys).
    """
    state, cfg = read_model_state(checkpoint)
    target = unwrap(model)
    try:
        target.load_state_dict(state)
        return model
    except RuntimeError as e:
        err = e
    if resample and cfg is not None:
        src = create(cfg.name, cfg.kwargs)
        src.load_state_dict(state)
        depths = [s.depth for n, s in target.named_modules() if isinstance(s, Stage) and n]
        src = resample_depth(src, depths)
        try:
            target.load_state_dict(src.state_dict())
            return model
        except RuntimeError as e2:
            err = e2
    hint = (
        " (untied checkpoint of another depth: pass resample=True)"
        if cfg is not None and not resample
        else ""
    )
    first = str(err).strip().splitlines()
    raise ValueError(
        f"incompatible checkpoint for {type(target).__name__}"
        f"{' built as ' + repr(get_config(target)) if get_config(target) else ''}; "
        f"checkpoint model config: {cfg!r}{hint}. {' '.join(first[:4])}"
    ) from None
