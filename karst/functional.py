"""The KARST arithmetic on tensors: ΔW, the factored `ΔW x`, and the fused dense layer.

Shapes throughout: `C (N, f_out, f_in)`, `A (N, p, r)`, `B (N, r, q)` with
`p = d_out / f_out`, `q = d_in / f_in`; `x (..., d_in)`; `T` = tokens = `x.numel() / d_in`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Below this |1 + s1| the fused layer keeps the pre-scale output for the s1 gradient
#: instead of recovering it from the output by division.
_MIN_GAIN = 1e-3


def kronecker_delta(C: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """`scale · Σ_i kron(C_i, A_i @ B_i)`, shape `(d_out, d_in)`."""
    blocks = _kronecker_blocks(C, A, B, scale)
    f_out, p, f_in, q = blocks.shape
    return blocks.reshape(f_out * p, f_in * q)


def _kronecker_blocks(C: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """ΔW as a `(f_out, p, f_in, q)` view: one matmul over the kernels, no full-size copy.

    `ΔW[o·p + k, f·q + l] = scale · Σ_n C[n, o, f] (A_n B_n)[k, l]`; the scale is applied
    to the small `B`, never to a `d_out × d_in` tensor.
    """
    n, f_out, f_in = C.shape
    p, q = A.shape[1], B.shape[2]
    low_rank = torch.bmm(A, B * scale).reshape(n, p * q)
    blocks = C.reshape(n, f_out * f_in).t() @ low_rank  # (f_out·f_in, p·q)
    return blocks.view(f_out, f_in, p, q).transpose(1, 2)


def factored_delta(x: Tensor, C: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """`ΔW x` without building ΔW: B on each input group, C across groups, then A."""
    n, f_out, f_in = C.shape
    p, r, q = A.shape[1], A.shape[2], B.shape[2]
    C, A, B = (t.to(x.dtype) for t in (C, A, B))  # float32 adapters on a half-precision model
    _, z = _kron_inner(x.reshape(-1, f_in, q), C, B)
    y = z.reshape(-1, n * r) @ (A.transpose(1, 2).reshape(n * r, p) * scale)
    return y.reshape(*x.shape[:-1], f_out * p)


def _kron_inner(x_groups: Tensor, C: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """(T, f_in, q) → B on each group: z1 (T, f_in, N, r) → C across groups: z2 (T, f_out, N, r)."""
    n, r = B.shape[0], B.shape[1]
    z1 = (x_groups @ B.reshape(n * r, -1).t()).unflatten(-1, (n, r))
    return z1, torch.einsum("nof,tfnr->tonr", C, z1)


def dense_kronecker_linear(x: Tensor, weight: Tensor, bias: Tensor | None, C: Tensor,
                           A: Tensor, B: Tensor, scale: float, s1: Tensor | None = None,
                           s2: Tensor | None = None) -> Tensor:
    """`(1 + s1) ⊙ ((W0 + ΔW) x + b0) + s2` as one matmul (s1, s2 optional; see below)."""
    return _DenseKroneckerLinear.apply(x, weight, bias, C, A, B, s1, s2, scale)


class _DenseKroneckerLinear(torch.autograd.Function):
    """The dense form, fused with the re-scaling.

    Forward: one matmul with `W_s = diag(1 + s1)(W0 + ΔW)` and `b_s = (1 + s1) b0 + s2`, so
    the re-scaling costs no pass over the activations. Backward: the input gradient from the
    same matmul; the C/A/B gradients in factored form, so the `d_out × d_in` weight gradient
    a naive dense form pays is never computed; the s1 gradient from the saved output
    (`h = (y - s2) / (1 + s1)`). `W_s` is rebuilt in backward rather than kept: it costs a
    few passes over W0, far less than one activation matmul.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, C, A, B, s1, s2, scale):  # noqa: ANN001, ANN205
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.scale = scale
        merged, merged_bias = _fused_weights(weight, bias, C, A, B, s1, s2, scale)
        y = F.linear(x, merged, merged_bias)
        ctx.keep_h = s1 is not None and bool((1 + s1).abs().min() < _MIN_GAIN)
        if ctx.keep_h:  # rare: recovering h by division would be unstable
            kept = F.linear(x, *_fused_weights(weight, bias, C, A, B, None, None, scale))
        else:
            kept = y if s1 is not None else None
        ctx.save_for_backward(x, weight, bias, C, A, B, s1, s2, kept)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, bias, C, A, B, s1, s2, kept = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            grad_s1 = grad_s2 = None
            if s1 is not None:
                grad_s1, grad_s2 = _rescale_grads(grad_out, kept, ctx.keep_h, s1, s2)
                grad_out = grad_out * (1 + s1).to(grad_out.dtype)  # gradient w.r.t. h
            grads = _dense_grads(ctx, grad_out, x, weight, bias, C, A, B)
        return (*grads, grad_s1, grad_s2, None)


def _fused_weights(weight: Tensor, bias: Tensor | None, C: Tensor, A: Tensor, B: Tensor,
                   s1: Tensor | None, s2: Tensor | None,
                   scale: float) -> tuple[Tensor, Tensor | None]:
    """`W_s`, `b_s`: W0 + ΔW in one pass over W0, built in float32 even under autocast."""
    with torch.autocast(weight.device.type, enabled=False):
        blocks = _kronecker_blocks(C, A, B, scale).to(weight.dtype)
        merged = (weight.view(blocks.shape) + blocks).view(weight.shape)
        return (merged, bias) if s1 is None else fold_rescale(merged, bias, s1, s2)


def fold_rescale(weight: Tensor, bias: Tensor | None, s1: Tensor,
                 s2: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`diag(1 + s1) W`, `(1 + s1) b + s2`: the re-scaling folded into a linear layer."""
    gain = (1 + s1).to(weight.dtype)
    weight = weight * gain.unsqueeze(1)
    if bias is not None:
        bias = torch.addcmul(s2.to(bias.dtype), bias, gain)
    return weight, bias


def _rescale_grads(grad_out: Tensor, kept: Tensor, keep_h: bool, s1: Tensor,
                   s2: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`∂/∂s1 = Σ_t g ⊙ h`, `∂/∂s2 = Σ_t g`, reduced to the shape of s1 (channel or scalar)."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).float()
    kept = kept.reshape(g.shape).float()
    g_sum = g.sum(0)
    g_dot = (g * kept).sum(0)  # Σ g ⊙ h, or Σ g ⊙ y
    if not keep_h:  # h = (y - s2) / (1 + s1)
        if s2 is not None:
            g_dot = g_dot - s2.float() * g_sum
        g_dot = g_dot / (1 + s1.float())
    grad_s2 = None if s2 is None else g_sum.sum_to_size(s2.shape).to(s2.dtype)
    return g_dot.sum_to_size(s1.shape).to(s1.dtype), grad_s2


def _dense_grads(ctx, grad_h, x, weight, bias, C, A, B):  # noqa: ANN001, ANN202
    """Gradients for x, W0, b0, C, A, B given the gradient w.r.t. the pre-scale output h."""
    need = ctx.needs_input_grad
    grad_x = grad_w = grad_b = None
    if need[0]:
        merged, _ = _fused_weights(weight, None, C, A, B, None, None, ctx.scale)
        grad_x = (grad_h @ merged.to(grad_h.dtype)).to(x.dtype)
    flat = grad_h.reshape(-1, grad_h.shape[-1])
    if need[1]:
        grad_w = (flat.t() @ x.reshape(flat.shape[0], -1)).to(weight.dtype)
    if need[2]:
        grad_b = flat.sum(0).to(bias.dtype)
    kernels = _kernel_grads(grad_h, x, C, A, B, ctx.scale) if any(need[3:6]) else (None,) * 3
    return (grad_x, grad_w, grad_b, *kernels)


def _kernel_grads(grad_h: Tensor, x: Tensor, C: Tensor, A: Tensor, B: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """C/A/B gradients from the saved input, never forming the `d_out × d_in` weight grad."""
    n, f_out, f_in = C.shape
    p, r, q = A.shape[1], A.shape[2], B.shape[2]
    dtypes = C.dtype, A.dtype, B.dtype
    C, A, B = (t.to(grad_h.dtype) for t in (C, A, B))
    x_groups = x.reshape(-1, f_in, q)
    z1, z2 = _kron_inner(x_groups, C, B)
    g = grad_h.reshape(-1, p) * scale  # (T·f_out, p)
    grad_a = (z2.reshape(-1, n * r).t() @ g).reshape(n, r, p).transpose(1, 2)
    dz2 = (g @ A.transpose(1, 2).reshape(n * r, p).t()).reshape(-1, f_out, n, r)
    grad_c = torch.einsum("tonr,tfnr->nof", dz2, z1)
    dz1 = torch.einsum("nof,tonr->tfnr", C, dz2)
    grad_b = (dz1.reshape(-1, n * r).t() @ x_groups.reshape(-1, q)).reshape(n, r, q)
    return grad_c.to(dtypes[0]), grad_a.to(dtypes[1]), grad_b.to(dtypes[2])
