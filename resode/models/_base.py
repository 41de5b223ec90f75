"""Common base of the registered models: feature/head split and access to the residual stages."""

from __future__ import annotations

from torch import Tensor, nn

from ..stack import Stage
from ._registry import ModelConfig


class StageModel(nn.Module):
    """A classifier whose residual stages are :class:`resode.Stage` modules.

    Subclasses define ``forward_features`` (input -> feature map, through every stage) and
    ``forward_head`` (feature map -> logits), and say how a change of stage depths or of
    tying maps to their config (:meth:`config_with`).
    """

    config: ModelConfig | None = None

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def named_residual_stacks(self) -> list[tuple[str, Stage]]:
        """``(qualified name, stage)`` for every residual stage, in forward order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Stage)]

    def residual_stacks(self) -> list[Stage]:
        """Every residual stage (``ResidualStack`` or fused stage), in forward order."""
        return [m for _, m in self.named_residual_stacks()]

    # alias, timm-ish
    stages = residual_stacks

    def config_with(self, depths: list[int] | None = None, tied: bool | None = None):
        """The config of this model with new stage ``depths`` and/or ``tied`` flag."""
        raise NotImplementedError
