"""Models of the paper, found through a small registry (timm style).

    model = resode.models.create("tiny_resnet", depth=32, scheme="heun", backward="adjoint")
    mlp = resode.models.create("mlp_resnet", depth=16, engine="fused")  # C++ stage
    resode.models.list()            # registered names
    untied = resode.models.untie(tied_model)
    deeper = resode.models.resample_depth(model, 64)

Every model built by the registry carries ``model.config`` (a :class:`ModelConfig`), saved in
checkpoints so that a checkpoint alone rebuilds its model (``create(**asdict(config))``).
Every entry takes ``engine=`` (:data:`ENGINES`: ``"auto"``, ``"generic"``, ``"fused"``); a
checkpoint written under one engine loads into the model built with the other.
"""

from ._base import StageModel
from ._engine import ENGINES
from ._registry import (
    ModelConfig,
    create,
    get_config,
    is_model,
    list_models,
    model_parameters,
    register_model,
    unwrap,
)
from ._surgery import load_checkpoint_into, read_model_state, resample_depth, untie
from .mlp import MLPResNet, mlp_resnet
from .resnet import ODEResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .tiny import TinyResNet, tiny_resnet

# ``resode.models.resnet`` stays the submodule; the custom-depth entry is ``create("resnet", ...)``.

#: ``resode.models.list()`` (alias of :func:`list_models`; not in ``__all__`` so that a star
#: import does not shadow the builtin).
list = list_models  # noqa: A001

__all__ = [
    "ENGINES",
    "MLPResNet",
    "ModelConfig",
    "ODEResNet",
    "StageModel",
    "TinyResNet",
    "create",
    "get_config",
    "is_model",
    "list_models",
    "load_checkpoint_into",
    "mlp_resnet",
    "model_parameters",
    "read_model_state",
    "register_model",
    "resample_depth",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "tiny_resnet",
    "untie",
    "unwrap",
]
