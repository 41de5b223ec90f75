"""Common base of the registered models: feature/head split and access to the residual stages."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..stack import ResidualStack, Stage
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

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, and also accepts the other engine's stage keys.

        A checkpoint written with a fused stage (``layer1.w1``, ``layer1.conv1_weight``...) loads
        into a generic model (``layer1.blocks.0.0.weight``...) and the other way round.
        """
        return super().load_state_dict(self._convert_stage_keys(state_dict), strict, assign)

    def _convert_stage_keys(self, state_dict: Mapping) -> Mapping:
        out = state_dict
        for name, stage in self.named_residual_stacks():
            pre = name + "."
            sub = {k[len(pre) :]: v for k, v in out.items() if k.startswith(pre)}
            new = _from_other_engine(stage, sub)
            if new is not None:
                out = {k: v for k, v in out.items() if not k.startswith(pre)}
                out.update({pre + k: v for k, v in new.items()})
        return out

    def named_residual_stacks(self) -> list[tuple[str, Stage]]:
        """``(qualified name, stage)`` for every residual stage, in forward order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Stage)]

    def residual_stacks(self) -> list[Stage]:
        """Every residual stage (``ResidualStack`` or fused stage), in forward order."""
        return [m for _, m in self.named_residual_stacks()]

    # alias, timm-ish
    stages = residual_stacks

    def config_with(self, depths: list[int] | None = None, tied: bool | None = None):
        """The config of this model with new stage ``depths`` and/or ``tied`` flag.

        This default serves models with one stage whose depth is the entry's ``depth`` keyword;
        models with several stages override it.
        """
        kw = {}
        if depths is not None:
            (kw["depth"],) = depths
        if tied is not None:
            kw["tied"] = tied
        return self.config.replace(**kw)


def _from_other_engine(stage: Stage, sub: dict) -> dict | None:
    """``sub`` (one stage's entries of a state dict written by the other engine) as ``stage``'s
    own state dict; ``None`` when the keys already match or cannot be converted."""
    if not sub or set(sub) == set(stage.state_dict()):
        return None
    # Lazy import: resode.fused imports resode.models.blocks (an import cycle at import time).
    from .. import fused

    if isinstance(stage, ResidualStack):  # fused checkpoint -> generic model
        for cls in (fused.MLPStack, fused.ConvStack):
            try:
                twin = cls.from_generic(stage)
            except TypeError:
                continue
            if set(sub) == set(twin.state_dict()):
                twin.load_state_dict(sub)
                return twin.to_generic().state_dict()
        return None
    if hasattr(stage, "to_generic"):  # generic checkpoint -> fused model
        generic = stage.to_generic()
        if set(sub) == set(generic.state_dict()):
            generic.load_state_dict(sub)
            return type(stage).from_generic(generic).state_dict()
    return None
