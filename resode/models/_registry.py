"""Model registry: thin entry points over one configurable class per family (timm style).

Every entry point is registered with :func:`register_model`. Calling it (directly or through
:func:`create`) attaches a :class:`ModelConfig` to the model, so ``create(**asdict(config))``
rebuilds the same architecture, and a checkpoint that stores the config rebuilds its model.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclasses.dataclass
class ModelConfig:
    """What rebuilds a model: the registered ``name`` and the full keyword arguments.

    ``resode.models.create(**dataclasses.asdict(config))`` (or ``config.build()``) gives a model
    with the same architecture; weights come from a checkpoint.
    """

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | ModelConfig) -> ModelConfig:
        if isinstance(d, ModelConfig):
            return cls(d.name, copy.deepcopy(d.kwargs))
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"not a model config (need a dict with 'name' and 'kwargs'): {d!r}")
        return cls(d["name"], copy.deepcopy(dict(d.get("kwargs") or {})))

    def replace(self, **kwargs: Any) -> ModelConfig:
        """A copy with some keyword arguments changed."""
        new = copy.deepcopy(self.kwargs)
        new.update(kwargs)
        return ModelConfig(self.name, new)

    def build(self) -> nn.Module:
        return create(self.name, self.kwargs)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register an entry point under its function name.

    The wrapped entry point binds its arguments (defaults included) and stores them as
    ``model.config = ModelConfig(name, kwargs)``. Entry points take keyword arguments only
    (a leading ``depth`` may be positional).
    """
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> nn.Module:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        full = {k: _jsonable(v) for k, v in bound.arguments.items()}
        model = fn(**full)
        model.config = ModelConfig(name, copy.deepcopy(full))
        return model

    _REGISTRY[name] = entry
    return entry


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``."""
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def is_model(name: str) -> bool:
    return name in _REGISTRY


def model_parameters(name: str) -> tuple[str, ...]:
    """The keyword arguments the registered entry ``name`` takes."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return tuple(inspect.signature(_REGISTRY[name]).parameters)


def create(name: str, kwargs: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        kwargs: keyword arguments as stored in a :class:`ModelConfig` (so that
            ``create(**asdict(config))`` works).
        **overrides: more keyword arguments; they win over ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the choices) or bad arguments.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    merged = dict(kwargs or {})
    merged.update(overrides)
    entry = _REGISTRY[name]
    try:
        inspect.signature(entry).bind(**merged)
    except TypeError as e:
        params = ", ".join(inspect.signature(entry).parameters)
        raise ValueError(f"bad arguments for model {name!r}: {e}; it takes: {params}") from None
    return entry(**merged)


def get_config(model: nn.Module) -> ModelConfig | None:
    """The :class:`ModelConfig` of a model built by the registry (unwraps DDP/compile)."""
    model = unwrap(model)
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, ModelConfig) else None


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP- and/or ``torch.compile``-wrapped model."""
    for _ in range(4):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    return model
