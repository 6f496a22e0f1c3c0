"""Prediction tower pieces: Dice / PReLU activations and an MLP of Linear + activation layers."""

from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

from model import dice_native

T = TypeVar("T")


def state_key(module: nn.Module) -> Optional[tuple]:
    """(id, storage address, version counter) of each parameter and buffer of ``module`` and its submodules, for
    caching a value derived from them (an eval kernel's prepared weights) while serving; None where a tensor has no
    version counter (a model built under inference mode): then nothing can be cached.

    It changes when a tensor is replaced (``p.data = ...``, ``load_state_dict(assign=True)``) or written in place
    through autograd's version counter (an optimizer's non-fused step, ``load_state_dict``, running statistics). It
    does not see in-place writes that bypass the counter (through ``.data``, or a fused optimizer's kernel) nor a
    submodule replaced after the first call (the (submodule, slot) list is taken once per module, so a call is a loop
    over a few tensors rather than the ``parameters()`` / ``buffers()`` generator walks). So the
    callers cache only under inference mode, where a served model's weights are read, never written
    (``cached``)."""
    slots = module.__dict__.get("_state_slots")
    if slots is None:
        slots = [(child, kind, name) for child in module.modules() for kind in ("_parameters", "_buffers")
                 for name in getattr(child, kind)]
        module.__dict__["_state_slots"] = slots
    tensors = [t for t in (getattr(child, kind)[name] for child, kind, name in slots) if t is not None]
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def cached(module: nn.Module, name: str, build: Callable[[], T]) -> T:
    """``build()``, a value derived from ``module``'s parameters and buffers (an eval kernel's prepared weights), kept
    in ``module.__dict__[name]`` under inference mode (serving's ranks) until ``state_key`` changes, and built
    afresh on every call outside it (training, evaluation, tests that write weights through ``.data``)."""
    key = state_key(module) if torch.is_inference_mode_enabled() else None
    entry = module.__dict__.get(name)
    if key is not None and entry is not None and entry[0] == key:
        return entry[1]
    value = build()
    module.__dict__[name] = (key, value) if key is not None else None
    return value


class Dice(nn.Module):
    """Dice activation (DIN paper): ``p * x + (1 - p) * alpha * x`` with ``p = sigmoid(batchnorm(x))``.

    Input [..., dim]; statistics are taken over all leading positions (batch statistics while training,
    running statistics in eval). ``alpha`` [dim] starts at 0.
    """

    def __init__(self, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, device=device)
        self.alpha = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DMP materialises meta buffers as zeros and resets only modules holding parameters: reset the
        # statistics of the (parameter-free) norm here too.
        self.norm.reset_running_stats()
        nn.init.zeros_(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._running():
            # Eval: the same function in three fused passes instead of six: batchnorm(x) = x * inv + shift, and
            # p x + (1 - p) alpha x = x (alpha + p (1 - alpha)); equal up to float32 rounding. Without autograd,
            # a contiguous copy of x through the one-pass kernel of ``apply_`` (x itself is never written).
            if not torch.is_grad_enabled() and x.dim() == 2 and x.dtype == torch.float32 and dice_native.available():
                out = x.clone(memory_format=torch.contiguous_format)
                if dice_native.dice_(out, self.eval_parameters()):
                    return out
            return x * self._gate(x, None)
        p = torch.sigmoid(self.norm(x.reshape(-1, x.shape[-1]))).view_as(x)
        return x * (p + (1 - p) * self.alpha)

    def _running(self) -> bool:
        norm = self.norm
        return not self.training and norm.track_running_stats and norm.running_var is not None

    @torch.no_grad()
    def apply_(self, x: torch.Tensor, scratch: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Eval Dice written into ``x`` [..., dim] (returned), with ``scratch`` (same shape) as its only buffer, for
        callers that reuse their buffers (``DinAttention.shared_weights``): on a float32 matrix the one-pass C kernel
        (``model.dice_native``, equal to ``forward``'s eval path to a few float32 ulps), else ``forward``'s eval
        ops. params: ``eval_parameters()``, when the caller applies this Dice many times.
        No gradient; RuntimeError in training mode (batch statistics need the whole batch)."""
        if not self._running():
            raise RuntimeError("Dice.apply_: inference only (running statistics; call .eval() first)")
        if x.dim() == 2 and dice_native.dice_(x, params if params is not None else self.eval_parameters()):
            return x
        return x.mul_(self._gate(x, scratch))

    @torch.no_grad()
    def eval_parameters(self) -> torch.Tensor:
        """float32 [4, dim]: inv, shift (``_affine``), alpha, 1 - alpha, as ``apply_``'s kernel reads them. Under
        inference mode they are kept until a statistic or alpha changes (``cached``), not built on every call of
        a rank; elsewhere they are built on every call."""
        def build() -> torch.Tensor:
            with torch.inference_mode(False):  # a normal tensor even when built under inference mode
                return dice_native.parameters(*self._affine(), self.alpha)

        return cached(self, "_eval_parameters", build)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inv, shift) [dim] each, with batchnorm(x) = x * inv + shift under the running statistics."""
        norm = self.norm
        inv = torch.rsqrt(norm.running_var + norm.eps)
        return inv, -norm.running_mean * inv

    def _gate(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """alpha + sigmoid(x * inv + shift) (1 - alpha), the eval factor of x; written into ``out`` (returned) when
        given (no autograd), else a new tensor."""
        inv, shift = self._affine()
        if out is None:
            return torch.addcmul(self.alpha, torch.sigmoid(torch.addcmul(shift, x, inv)), 1 - self.alpha)
        torch.addcmul(shift, x, inv, out=out).sigmoid_()
        return torch.addcmul(self.alpha, out, 1 - self.alpha, out=out)


def make_activation(name: str, dim: int, device: torch.device | None = None) -> nn.Module:
    """``"dice"`` -> Dice(dim); ``"prelu"`` -> per-channel PReLU (applied on the last dimension)."""
    if name == "dice":
        return Dice(dim, device=device)
    if name == "prelu":
        return _LastDimPReLU(dim, device=device)
    raise ValueError(f"activation must be 'dice' or 'prelu', got {name!r}")


class _LastDimPReLU(nn.PReLU):
    """PReLU whose per-channel slope applies to the last dimension (nn.PReLU uses dimension 1)."""

    def __init__(self, dim: int, device: torch.device | None = None) -> None:
        super().__init__(num_parameters=dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, self.weight * x)


class MLP(nn.Sequential):
    """Linear + activation per hidden width: [..., in_dim] -> [..., dims[-1]]."""

    def __init__(self, in_dim: int, dims: Sequence[int], activation: str, device: torch.device | None = None) -> None:
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.Linear(in_dim, dim, device=device), make_activation(activation, dim, device=device)]
            in_dim = dim
        super().__init__(*layers)
        self.out_dim = in_dim
