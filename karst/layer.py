"""Adapter layers: deltas (Kronecker, low-rank), re-scaling, and the wrapper around `nn.Linear`.

`AdaptedLinear` wraps a frozen `nn.Linear` (`base_layer`) as peft's tuner layers do:
`y = rescale(base(x) + ΔW x)`, with `merge` / `unmerge` folding everything into the base
weights. Each delta owns the one function that builds its ΔW (`delta_weight`), used by the
dense forward, the merge and the tests alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from karst.functional import (
    dense_kronecker_linear,
    factored_delta,
    fold_rescale,
    kronecker_delta,
)

#: The `"auto"` forward picks the dense form (ΔW and the re-scaling folded into the frozen
#: weight, one matmul) from this many tokens per call (batch × sequence), the factored form
#: below it. Measured with `bench/forward_rule.py` on ViT-B/16 layer shapes, fp32 CPU: dense
#: is 1.5–4.7× slower at 16–256 tokens (it builds ΔW whatever the batch), even around
#: 1 000, and 5–15 % faster from ~1 500 on, in training and inference alike, nearly
#: independent of N, f, r and the layer's shape (docs/performance.md).
DENSE_MIN_TOKENS = 1536


def _init_(tensor: Tensor, fan_in: int, init: str) -> None:
    """`kaiming`: U(±1/√fan_in), nn.Linear's default; `gaussian`: N(0, 1/fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    if init == "kaiming":
        nn.init.uniform_(tensor, -bound, bound)
    else:
        nn.init.normal_(tensor, std=bound)


class KroneckerDelta(nn.Module):
    """`ΔW = scale · Σ_i C_i ⊗ (A_i B_i)`, the KARST multi-kernel Kronecker adapter.

    Shapes: `C (N, f_out, f_in)`, `A (N, d_out/f_out, r)`, `B (N, r, d_in/f_in)`. `B` starts
    at zero so that ΔW = 0 and the adapted model starts as the pretrained one.
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        *,
        num_kernels: int,
        factor: tuple[int, int],
        rank: int,
        scale: float,
        init: str = "gaussian",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        f_out, f_in = factor
        self.factor = factor
        self.rank = rank
        self.scale = scale
        self.init = init
        kw = {"device": device, "dtype": torch.float32}
        self.C = nn.Parameter(torch.empty(num_kernels, f_out, f_in, **kw))
        self.A = nn.Parameter(torch.empty(num_kernels, d_out // f_out, rank, **kw))
        self.B = nn.Parameter(torch.empty(num_kernels, rank, d_in // f_in, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_(self.C, self.C.shape[-1], self.init)
        _init_(self.A, self.rank, self.init)
        nn.init.zeros_(self.B)

    @staticmethod
    def num_parameters(d_out: int, d_in: int, num_kernels: int, factor: tuple[int, int],
                       rank: int) -> int:
        f_out, f_in = factor
        return num_kernels * (f_out * f_in + rank * (d_out // f_out + d_in // f_in))

    def delta_weight(self) -> Tensor:
        return kronecker_delta(self.C, self.A, self.B, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """`ΔW x` without building ΔW."""
        return factored_delta(x, self.C, self.A, self.B, self.scale)

    def linear(self, x: Tensor, base: nn.Linear, rescale: nn.Module, mode: str) -> Tensor:
        """`rescale((W0 + ΔW) x + b0)`, dense or factored (see `DENSE_MIN_TOKENS`)."""
        if mode == "auto":
            mode = "dense" if self._dense_pays(x) else "factored"
        if mode == "dense":
            s1, s2 = getattr(rescale, "s1", None), getattr(rescale, "s2", None)
            return dense_kronecker_linear(x, base.weight, base.bias, self.C, self.A, self.B,
                                          self.scale, s1, s2)
        return rescale(base(x) + self(x))

    def _dense_pays(self, x: Tensor) -> bool:
        return x.numel() // x.shape[-1] >= DENSE_MIN_TOKENS


class LowRankDelta(nn.Module):
    """LoRA's `ΔW = scale · B A`; `A (r, d_in)` Kaiming-uniform, `B (d_out, r)` zero."""

    def __init__(self, d_out: int, d_in: int, *, rank: int, scale: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device))
        self.B = nn.Parameter(torch.empty(d_out, rank, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_(self.A, self.A.shape[1], "kaiming")
        nn.init.zeros_(self.B)

    @staticmethod
    def num_parameters(d_out: int, d_in: int, rank: int) -> int:
        return rank * (d_out + d_in)

    def delta_weight(self) -> Tensor:
        return (self.B @ self.A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def linear(self, x: Tensor, base: nn.Linear, rescale: nn.Module, mode: str) -> Tensor:
        return rescale(base(x) + self(x))


class NoDelta(nn.Module):
    """Stands in for a delta when only the re-scaling trains (SSF-style baseline)."""

    def delta_weight(self) -> None:
        return None

    def linear(self, x: Tensor, base: nn.Linear, rescale: nn.Module, mode: str) -> Tensor:
        return rescale(base(x))


class Rescale(nn.Module):
    """Re-scaling transmission `(1 + s1) ⊙ y + s2`, per channel or one scalar pair.

    `s2` exists only when the wrapped layer has a bias, so merging never adds one.
    """

    def __init__(self, d_out: int, *, mode: str, has_bias: bool,
                 device: torch.device | None = None) -> None:
        super().__init__()
        shape = (d_out,) if mode == "channel" else (1,)
        self.s1 = nn.Parameter(torch.zeros(shape, device=device))
        self.s2 = nn.Parameter(torch.zeros(shape, device=device)) if has_bias else None

    @staticmethod
    def num_parameters(d_out: int, mode: str, has_bias: bool) -> int:
        per_tensor = {"channel": d_out, "scalar": 1, "none": 0}[mode]
        return per_tensor * (2 if has_bias else 1)

    def forward(self, y: Tensor) -> Tensor:
        gain = (1 + self.s1).to(y.dtype)
        if self.s2 is None:
            return y * gain
        return torch.addcmul(self.s2.to(y.dtype), y, gain)

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return fold_rescale(weight, bias, self.s1.to(weight.dtype),
                            None if self.s2 is None else self.s2.to(weight.dtype))


class NoRescale(nn.Identity):
    """`rescale="none"`: an identity whose fold changes nothing."""

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight, bias


class AdaptedLinear(nn.Module):
    """A frozen `nn.Linear` plus a delta and a re-scaling: `rescale(base(x) + ΔW x)`.

    The delta computes the whole thing (`delta.linear`), so that a form which folds the
    re-scaling into its matmul can do so.

    `merge()` folds both into `base_layer`'s weight and bias (in float32) and keeps the
    originals so `unmerge()` restores them bit for bit.
    """

    def __init__(self, base_layer: nn.Linear, delta: nn.Module, rescale: nn.Module,
                 forward_mode: str = "auto") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta = delta
        self.rescale = rescale
        self.forward_mode = forward_mode
        self._original: tuple[Tensor, Tensor | None] | None = None

    @property
    def merged(self) -> bool:
        return self._original is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.delta.linear(x, self.base_layer, self.rescale, self.forward_mode)

    def merged_weights(self) -> tuple[Tensor, Tensor | None]:
        """`W_m = diag(1 + s1)(W0 + ΔW)`, `b_m = (1 + s1) b0 + s2`, computed in float32."""
        base = self.base_layer
        weight = base.weight.detach().float()
        bias = None if base.bias is None else base.bias.detach().float()
        if self.merged:
            return weight, bias
        delta = self.delta.delta_weight()
        if delta is not None:
            weight = weight + delta.detach().float()
        weight, bias = self.rescale.fold(weight, bias)
        if not weight.isfinite().all() or (bias is not None and not bias.isfinite().all()):
            raise ValueError("merging would write non-finite weights: the adapter has diverged.")
        return weight.detach(), None if bias is None else bias.detach()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("this layer is already merged; call unmerge() first.")
        weight, bias = self.merged_weights()
        base = self.base_layer
        self._original = (base.weight.detach().clone(),
                          None if base.bias is None else base.bias.detach().clone())
        base.weight.copy_(weight.to(base.weight.dtype))
        if bias is not None:
            base.bias.copy_(bias.to(base.bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this layer is not merged.")
        weight, bias = self._original
        self.base_layer.weight.copy_(weight)
        if bias is not None:
            self.base_layer.bias.copy_(bias)
        self._original = None

    def extra_repr(self) -> str:
        return f"forward_mode={self.forward_mode!r}, merged={self.merged}"
