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

#: `"auto"` forward rule: the dense form (ΔW folded into one matmul) wins once
#: `tokens * rank * (d_in + d_out) >= DENSE_RULE * d_in * d_out`, i.e. when the factored
#: path's per-token work outgrows building ΔW once per call. Measured with
#: `bench/forward_rule.py` on ViT-B/16 layer shapes (see docs/performance.md).
DENSE_RULE_TRAIN = 2.0
DENSE_RULE_EVAL = 1.0


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
        """`ΔW x` without building ΔW: B per input group, C across groups, then A."""
        return _factored_delta(x, self.C, self.A, self.B, self.scale)

    def linear(self, x: Tensor, base: nn.Linear, mode: str) -> Tensor:
        """`(W0 + ΔW) x + b0` by the dense or factored form (see `DENSE_RULE_TRAIN`)."""
        if mode == "auto":
            mode = "dense" if self._dense_pays(x) else "factored"
        if mode == "dense":
            return _DenseKroneckerLinear.apply(x, base.weight, base.bias, self.C, self.A,
                                               self.B, self.scale)
        return base(x) + self(x)

    def _dense_pays(self, x: Tensor) -> bool:
        d_in, d_out = x.shape[-1], self.A.shape[1] * self.factor[0]
        tokens = x.numel() // d_in
        rule = DENSE_RULE_TRAIN if torch.is_grad_enabled() and self.B.requires_grad \
            else DENSE_RULE_EVAL
        return tokens * self.rank * (d_in + d_out) >= rule * d_in * d_out


def kronecker_delta(C: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """`scale · Σ_i kron(C_i, A_i @ B_i)` as one contraction over the kernels."""
    n, f_out, f_in = C.shape
    p, q = A.shape[1], B.shape[2]
    low_rank = torch.bmm(A, B)  # (N, p, q)
    delta = torch.einsum("nof,nkl->okfl", C, low_rank)
    return delta.reshape(f_out * p, f_in * q) * scale


def _factored_delta(x: Tensor, C: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    n, f_out, f_in = C.shape
    p, r, q = A.shape[1], A.shape[2], B.shape[2]
    lead = x.shape[:-1]
    _, z = _kron_inner(x.reshape(-1, f_in, q), C, B)
    y = z.reshape(-1, n * r) @ (A.transpose(1, 2).reshape(n * r, p) * scale)
    return y.reshape(*lead, f_out * p)


def _kron_inner(x_groups: Tensor, C: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """(T, f_in, q) → B on each group: z1 (T, f_in, N, r) → C across groups: z2 (T, f_out, N, r)."""
    n, r = B.shape[0], B.shape[1]
    z1 = (x_groups @ B.reshape(n * r, -1).t()).unflatten(-1, (n, r))
    return z1, torch.einsum("nof,tfnr->tonr", C, z1)


class _DenseKroneckerLinear(torch.autograd.Function):
    """Forward: one matmul with `W0 + ΔW`. Backward: the input gradient from that same
    matmul, the C/A/B gradients in factored form, so the `d_out × d_in` weight gradient
    that a naive dense form pays is never computed. ΔW is rebuilt in backward rather
    than kept (it costs `N·d_out·d_in`, far less than one activation matmul)."""

    @staticmethod
    def forward(ctx, x, weight, bias, C, A, B, scale):  # noqa: ANN001, ANN205
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.scale = scale
        ctx.save_for_backward(x, weight, bias, C, A, B)
        return F.linear(x, _dense_weight(weight, C, A, B, scale), bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, bias, C, A, B = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            return _dense_kronecker_backward(ctx, grad_out, x, weight, bias, C, A, B)


def _dense_weight(weight: Tensor, C: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """`W0 + ΔW`, with ΔW built in float32 even under autocast."""
    with torch.autocast(weight.device.type, enabled=False):
        return weight + kronecker_delta(C, A, B, scale).to(weight.dtype)


def _dense_kronecker_backward(ctx, grad_out, x, weight, bias, C, A, B):  # noqa: ANN001, ANN202
    n, f_out, f_in = C.shape
    p, r, q = A.shape[1], A.shape[2], B.shape[2]
    scale = ctx.scale
    need = ctx.needs_input_grad
    grad_x = grad_w = grad_b = None
    if need[0]:
        grad_x = (grad_out @ _dense_weight(weight, C, A, B, scale)).to(x.dtype)
    g = grad_out.reshape(-1, f_out, p)
    if need[1]:
        grad_w = (g.reshape(-1, f_out * p).t() @ x.reshape(g.shape[0], -1)).to(weight.dtype)
    if need[2]:
        grad_b = g.reshape(g.shape[0], -1).sum(0).to(bias.dtype)
    if not any(need[3:6]):
        return grad_x, grad_w, grad_b, None, None, None, None
    x_groups = x.reshape(-1, f_in, q)
    z1, z2 = _kron_inner(x_groups, C, B)
    a_flat = A.transpose(1, 2).reshape(n * r, p)
    g_flat = g.reshape(-1, p) * scale
    grad_a = (z2.reshape(-1, n * r).t() @ g_flat).reshape(n, r, p).transpose(1, 2)
    dz2 = (g_flat @ a_flat.to(g_flat.dtype).t()).reshape(-1, f_out, n, r)
    grad_c = torch.einsum("tonr,tfnr->nof", dz2, z1)
    dz1 = torch.einsum("nof,tonr->tfnr", C, dz2)
    grad_b_kernels = (dz1.reshape(-1, n * r).t() @ x_groups.reshape(-1, q)).reshape(n, r, q)
    return (grad_x, grad_w, grad_b, grad_c.to(C.dtype), grad_a.to(A.dtype),
            grad_b_kernels.to(B.dtype), None)


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

    def linear(self, x: Tensor, base: nn.Linear, mode: str) -> Tensor:
        return base(x) + self(x)


class NoDelta(nn.Module):
    """Stands in for a delta when only the re-scaling trains (SSF-style baseline)."""

    def delta_weight(self) -> None:
        return None

    def linear(self, x: Tensor, base: nn.Linear, mode: str) -> Tensor:
        return base(x)


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
        gain = 1 + self.s1.float()
        weight = weight * gain.unsqueeze(1)
        if bias is not None:
            bias = bias * gain + self.s2.float()
        return weight, bias


class NoRescale(nn.Identity):
    """`rescale="none"`: an identity whose fold changes nothing."""

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight, bias


class AdaptedLinear(nn.Module):
    """A frozen `nn.Linear` plus a delta and a re-scaling: `rescale(base(x) + ΔW x)`.

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
        return self.rescale(self.delta.linear(x, self.base_layer, self.forward_mode))

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
