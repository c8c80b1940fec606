"""Nadaraya-Watson (Gaussian-kernel) attention at dot-product speed.

``softmax_j(-||q_i - k_j||^2 / (2 sigma_h^2)) V`` is a kernel regression with an RBF kernel and one
bandwidth ``sigma_h`` per head. Expanding the square,

    -||q - k||^2 / (2 s^2) = (q.k - ||k||^2 / 2) / s^2  -  ||q||^2 / (2 s^2),

and the last term is the same for every key of a query, so the softmax drops it. The rest is one dot
product in ``D + 1`` dimensions,

    q' = [q / s^2, 1 / s^2],   k' = [k, -||k||^2 / 2],   q'.k' = (q.k - ||k||^2 / 2) / s^2,

so any dot-product kernel (SDPA, flash, flex, the eager matmul) computes it exactly with scaling 1.0,
and nothing of size B x H x Lq x Lk x D is ever built. The per-head ``1 / s^2`` sits on the query side,
so keys (and a KV cache of them) do not depend on ``sigma``. The head dimension is zero-padded to a
multiple of 8, which GPU kernels want. torch's SDPA accepts a value head dimension ``Dv != Dk`` (on
CPU, and in its memory-efficient CUDA backend), but its flash kernels need ``Dk == Dv``: on this CPU
(2 threads, 1 x 4 x 2048 x 32, fwd+bwd) ``Dk=40, Dv=32`` took 327 ms against 247 ms for 40/40 and
172-208 ms for plain 32/32. So by default (``pad_value=True``) the value is zero-padded to the key's
width and the output sliced back; ``pad_value=False`` passes it unpadded.

Precision: distances are translation invariant, so by default queries and keys are first centred on the
mean key of each (batch, head) (``center=True``; the mean is detached, its exact gradient is zero).
That keeps ``||k||^2 / 2`` small next to ``q.k``, which matters in half precision, where rounding
``||k||^2 / 2`` costs ``ulp(||k||^2) / s^2`` in every score.

Copied next to saved models: torch, transformers' init helpers and flat siblings only. `GaussianScore` at the
end is the `attention_type` class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .scores_hf_attention import StandardScore, register_attention_score

__all__ = ["GaussianScore", "gaussian_as_dot", "gaussian_attention", "HEAD_DIM_MULTIPLE"]

#: Augmented head dimensions are padded to a multiple of this (tensor-core kernels need it).
HEAD_DIM_MULTIPLE = 8
_KERNELS = ("sdpa", "eager")


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sigma_per_head(sigma: torch.Tensor | float, num_heads: int, like: torch.Tensor) -> torch.Tensor:
    """sigma (float, [1] or [H]) -> [1, H, 1, 1] in the query's dtype/device (differentiable)."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.dim() > 1 or sigma.numel() not in (1, num_heads):
        raise ValueError(f"sigma must be a scalar or have one value per head ({num_heads}), got {tuple(sigma.shape)}")
    return sigma.to(like.dtype).reshape(1, -1, 1, 1)


def gaussian_as_dot(
    query: torch.Tensor,
    key: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    center: bool = True,
    multiple: int = HEAD_DIM_MULTIPLE,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(query_aug, key_aug, scaling) with ``softmax(query_aug @ key_aug^T * scaling) == softmax(-||q-k||^2/(2 s^2))``.

    query [B, H, Lq, D], key [B, H, Lk, D], sigma scalar or [H] (positive; the caller owns the
    parametrisation, e.g. ``exp(log_sigma)``). Returns tensors of head dimension
    ``round_up(D + 1, multiple)`` and ``scaling = 1.0``. ``q'.k'`` equals ``(q.k - ||k||^2/2) / s^2``
    exactly; with ``center`` both sides are shifted by the detached mean key first (same distances).
    """
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key head dims differ: {query.shape[-1]} vs {key.shape[-1]}")
    inv_var = _sigma_per_head(sigma, query.shape[1], query).pow(-2)  # [1, H, 1, 1]
    if center:
        shift = key.mean(dim=-2, keepdim=True).detach()
        query, key = query - shift, key - shift
    # ||k||^2 in float32 at least: it is the one coordinate whose rounding is not relative to q.k.
    acc = torch.promote_types(key.dtype, torch.float32)
    half_sq_norm = (key.to(acc).pow(2).sum(-1, keepdim=True) * -0.5).to(key.dtype)
    size = _round_up(query.shape[-1] + 1, multiple)
    query_aug = _pad_last(torch.cat([query * inv_var, inv_var.expand(*query.shape[:-1], 1)], dim=-1), size)
    key_aug = _pad_last(torch.cat([key, half_sq_norm], dim=-1), size)
    return query_aug, key_aug, 1.0


def _merged_mask(
    attention_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    lq: int,
    lk: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """One additive float mask (0 / finfo.min) from the float mask, padding and causality (bottom-right)."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)[None, None]
        allowed = causal if allowed is None else allowed & causal
    mask = None if attention_mask is None else attention_mask.to(device=device, dtype=dtype)
    if allowed is None:
        return mask
    base = torch.zeros((), dtype=dtype, device=device) if mask is None else mask
    # masked_fill, not addition: finfo.min + finfo.min is -inf, and a row of -inf is NaN in softmax.
    return base.masked_fill(~allowed, torch.finfo(dtype).min)


def gaussian_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sigma: torch.Tensor | float,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    output_attentions: bool = False,
    kernel: str = "sdpa",
    *,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    center: bool = True,
    pad_value: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(-||q_i - k_j||^2 / (2 sigma_h^2) + mask) V through a dot-product kernel.

    query/key [B, H, L, D], value [B, H, Lk, Dv]; sigma scalar or [H]. ``attention_mask`` is an additive
    float mask [B|1, 1|H, Lq, Lk] (0 / finfo.min), ``key_padding_mask`` bool [B, Lk] (True = real token),
    ``is_causal`` aligns the last query with the last key (cached decoding). ``pad_value`` pads the value
    to the augmented head dim inside SDPA (flash kernels need equal dims). ``kernel`` "sdpa" runs
    torch's scaled_dot_product_attention, "eager" a matmul + float32 softmax; ``output_attentions`` forces
    eager, as the weights exist only there. Returns (out [B, Lq, H, Dv], weights [B, H, Lq, Lk] or None).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    lq, lk, dv = query.shape[-2], key.shape[-2], value.shape[-1]
    q_aug, k_aug, scaling = gaussian_as_dot(query, key, sigma, center=center)
    p = dropout if training else 0.0
    if output_attentions:
        kernel = "eager"
    # SDPA's own is_causal is top-left aligned, right only when Lq == Lk; otherwise the mask carries it.
    sdpa_causal = kernel == "sdpa" and is_causal and lq == lk and attention_mask is None and key_padding_mask is None
    # The eager path adds scores and mask in float32 at least (in half precision finfo.min + a negative
    # score is -inf, and a fully masked row of -inf is NaN); SDPA wants the mask in the query's dtype.
    acc = torch.promote_types(q_aug.dtype, torch.float32)
    mask = _merged_mask(
        attention_mask, key_padding_mask, is_causal and not sdpa_causal, lq, lk,
        q_aug.dtype if kernel == "sdpa" else acc, q_aug.device,
    )
    if kernel == "sdpa":
        v = _pad_last(value, k_aug.shape[-1]) if pad_value and dv < k_aug.shape[-1] else value
        out = F.scaled_dot_product_attention(
            q_aug, k_aug, v, attn_mask=mask, dropout_p=p, is_causal=sdpa_causal, scale=scaling
        )[..., :dv]
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(q_aug, k_aug.transpose(-1, -2)).to(acc) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=p, training=p > 0)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, (probs if output_attentions else None)



@register_attention_score
class GaussianScore(StandardScore):
    """Nadaraya-Watson attention, softmax(-||q - k||^2 / (2 sigma_h^2) + bias) V, at dot-product speed.

    One appended coordinate turns the kernel into a dot product (`gaussian_as_dot`), so every kernel the standard
    score runs (eager, SDPA, FlexAttention, the block-skipping sparse kernels) runs it unchanged; nothing
    B x H x N x N x d is built. The bandwidth is learned per head (`log_sigma`, initialised so 1 / sigma^2 =
    1 / sqrt(d), the standard score's scale) unless `config.gaussian_bandwidth` fixes it.
    """

    name = "gaussian"

    def __init__(self, config):
        super().__init__(config)
        self.fixed_bandwidth = config.gaussian_bandwidth
        self.log_sigma = None if self.fixed_bandwidth is not None else nn.Parameter(torch.empty(self.num_heads))
        self.scaling = 1.0

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.gaussian_bandwidth is not None and not config.gaussian_bandwidth > 0:
            raise ValueError(f"gaussian_bandwidth={config.gaussian_bandwidth!r} is not valid; it must be positive "
                             "(or None to learn one per head).")

    def init_weights(self, config) -> None:
        if self.log_sigma is not None:
            init.constant_(self.log_sigma, 0.25 * math.log(self.head_dim))  # sigma^2 = sqrt(d)

    def sigma(self) -> torch.Tensor | float:
        return self.fixed_bandwidth if self.log_sigma is None else self.log_sigma.exp()

    def forward(self, attention, query, key, value, inputs, dropout=0.0, output_attentions=False, **kwargs):
        query, key, _ = gaussian_as_dot(query, key, self.sigma())
        return super().forward(attention, query, key, value, inputs, dropout, output_attentions)
