"""The network and the methods that ``peers.py`` compares (no measurement here).

One residual network for everyone: ``N`` untied blocks, ``x <- x + f_n(x) / N``, the blocks
being :func:`resode.models.blocks.mlp_block` or :func:`resode.models.blocks.conv_block`. Each
:class:`Method` builds a module over the *same* blocks (the fused engine copies them into its
own layout), so every method computes the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import resode
from resode.diagnostics import saved_tensor_bytes
from resode.models.blocks import conv_block, mlp_block, smooth_in_depth_


# --------------------------------------------------------------------------- network
def make_block(cfg: dict[str, Any]) -> nn.Module:
    """One residual function of the workload: the library's MLP or conv block."""
    if cfg["kind"] == "mlp":
        return mlp_block(cfg["dim"], cfg["hidden"])
    return conv_block(cfg["channels"])


def make_blocks(
    cfg: dict[str, Any],
    depth: int,
    *,
    seed: int = 0,
    smooth: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> nn.ModuleList:
    """``depth`` blocks with iid default-initialised weights, or weights smooth in depth
    (:func:`resode.models.blocks.smooth_in_depth_` with ``seed``:
    ``||theta_{n+1} - theta_n|| = O(1/N)``)."""
    torch.manual_seed(seed)
    blocks = nn.ModuleList(make_block(cfg) for _ in range(depth)).to(device=device, dtype=dtype)
    if smooth:  # (after the cast: float64 weights are not rounded to float32)
        smooth_in_depth_(blocks, seed=seed)
    return blocks


def make_input(
    cfg: dict[str, Any], *, seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Tensor:
    """A random batch of the workload's state: ``(B, D)`` or ``(B, C, H, W)``."""
    g = torch.Generator().manual_seed(seed)
    if cfg["kind"] == "mlp":
        shape = (cfg["batch"], cfg["dim"])  # (B, D)
    else:
        shape = (cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])  # (B, C, H, W)
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


# --------------------------------------------------------------------------- peers
class PlainLoop(nn.Module):
    """Hand-written autograd loop: ``x <- x + f_n(x) / N``."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: Tensor) -> Tensor:
        h = 1.0 / len(self.blocks)
        for b in self.blocks:
            x = x + h * b(x)
        return x


class CheckpointLoop(PlainLoop):
    """Each block under ``torch.utils.checkpoint`` (non-reentrant): stores each block's input."""

    def forward(self, x: Tensor) -> Tensor:
        h = 1.0 / len(self.blocks)
        for b in self.blocks:
            x = x + h * checkpoint(b, x, use_reentrant=False)
        return x


class PiecewiseField(nn.Module):
    """Vector field ``f(t, x) = f_{floor(t N)}(x)`` (clamped to ``N - 1``); counts evaluations."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks
        self.evaluations = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        n = len(self.blocks)
        # the Euler grid is t_k = k / N; the small offset guards against t*N = k - ulp
        i = min(int(math.floor(float(t.detach()) * n + 1e-3)), n - 1)
        self.evaluations += 1
        return self.blocks[i](x)


class TorchdiffeqAdjoint(nn.Module):
    """``torchdiffeq.odeint_adjoint`` with fixed-step Euler, ``h = 1/N``, on ``[0, 1]``.

    Forward: exactly the Euler ResNet. Backward: the continuous adjoint ODE integrated backwards
    with the same Euler grid; its reverse step from ``t_{k+1}`` evaluates the field at
    ``t_{k+1}``, i.e. block ``k + 1`` where the forward used block ``k``, which is where its
    gradient error on a piecewise-constant network comes from. Every reverse step carries the
    adjoint of *all* ``N`` blocks' parameters, so a step costs ``O(N^2)`` parameter-sized work.
    """

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.field = PiecewiseField(blocks)

    def forward(self, x: Tensor) -> Tensor:
        from torchdiffeq import odeint_adjoint

        n = len(self.field.blocks)
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        params = tuple(p for p in self.field.blocks.parameters() if p.requires_grad)
        ys = odeint_adjoint(
            self.field, x, t, method="euler", options={"step_size": 1.0 / n}, adjoint_params=params
        )  # (2, *x.shape)
        return ys[-1]


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One way to train the network: ``family`` plain | checkpoint | torchdiffeq | generic |
    fused, and for resode's engines the ``scheme`` and ``backward`` mode."""

    key: str
    family: str
    scheme: str = "euler"
    backward: str = "autograd"


METHODS: tuple[Method, ...] = (
    Method("plain", "plain"),
    Method("checkpoint", "checkpoint"),
    Method("torchdiffeq", "torchdiffeq", backward="adjoint"),
    *(
        Method(f"{fam}-{s}-{b}", fam, s, b)
        for fam in ("generic", "fused")
        for s in ("euler", "heun")
        for b in ("autograd", "adjoint")
    ),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}


class Unavailable(RuntimeError):
    """The method cannot run here (e.g. the extension is not built)."""


def fused_status(device: str = "cpu") -> str:
    """``"available"``, or why the fused engine cannot run on ``device``
    (:func:`resode.fused.available_for`)."""
    try:
        from resode import fused
    except ImportError as e:
        return f"not built (import failed: {e})"
    try:
        if fused.available_for(device):
            return "available"
        status = fused.extension_available()
    except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
        return f"not built ({type(e).__name__}: {e})"
    return f"not built ({status.reason or 'unavailable on ' + str(device)})"


def build_method(method: Method, blocks: nn.ModuleList, cfg: dict[str, Any]) -> nn.Module:
    """The network of ``method`` over ``blocks`` (shared parameters, except for the fused
    engine, which copies them into its own layout with ``from_generic``)."""
    if method.family == "plain":
        return PlainLoop(blocks)
    if method.family == "checkpoint":
        return CheckpointLoop(blocks)
    if method.family == "torchdiffeq":
        return TorchdiffeqAdjoint(blocks)
    stack = resode.ResidualStack(list(blocks), scheme=method.scheme, backward=method.backward)
    if method.family == "generic":
        return stack
    device = next(blocks.parameters()).device
    status = fused_status(device.type)
    if status != "available":
        raise Unavailable(status)
    from resode import fused

    cls = fused.MLPStack if cfg["kind"] == "mlp" else fused.ConvStack
    try:
        return cls.from_generic(stack)  # (same scheme and backward as the stack)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"from_generic failed: {type(e).__name__}: {e}") from e


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters that require gradients, each once."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def extra_saved_bytes(model: nn.Module) -> int:
    """Bytes a stage reports holding for backward outside ``save_for_backward`` (fused)."""
    return sum(int(getattr(m, "extra_saved_bytes", 0)) for m in model.modules())


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes kept for backward by one forward (hooks + what stages report), params excluded."""
    params = trainable(model)
    return saved_tensor_bytes(model, x, exclude=params) + extra_saved_bytes(model)


def make_train_step(model: nn.Module, x: Tensor, lr: float = 1e-4):
    """One training step: zero grads, forward, mean-square loss, backward, SGD update."""
    params = trainable(model)

    def step() -> float:
        for p in params:
            p.grad = None
        y = model(x)
        loss = y.square().mean()
        loss.backward()
        with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: seconds)
            grads = [(p, p.grad) for p in params if p.grad is not None]
            torch._foreach_add_([p for p, _ in grads], [g for _, g in grads], alpha=-lr)
        return float(loss.detach())

    return step
