"""Bahdanau (additive) attention scores without the B x H x Lq x Lk x A tensor.

``score[b, h, i, j] = sum_a v[h, a] * tanh(qa[b, h, i, a] + ka[b, h, j, a])`` written as a broadcast
builds a five-dimensional tensor (about 6 GB forward+backward at 8 heads, 1024 tokens, A=64), and
autograd keeps it alive for the backward. Here a custom ``torch.autograd.Function`` reduces over
``a`` as it goes and its backward recomputes the elementwise part tile by tile, so memory stays
O(B H Lq Lk) like any dense attention.

Speed on CPU comes from an identity rather than from ``tanh`` itself (ATen's vectorised tanh is
about 4x slower than an exp or a division on this kind of CPU): with ``E = exp(2 qa)`` and
``F = exp(2 ka)`` computed once per token,

    tanh(qa_i + ka_j) = 1 - 2 r_ij,   r_ij = 1 / (1 + E_i F_j),   1 - tanh^2 = 4 r_ij (1 - r_ij),

so each of the Lq x Lk x A elements costs a multiply-add and a reciprocal. The identity is exact
as long as ``exp(+-2 x)`` neither overflows nor underflows; ``qa`` and ``ka`` are first shifted by
opposite per-feature constants (which leaves every sum ``qa_i + ka_j`` unchanged) and the tanh form
is used whenever the shifted values still leave the safe range. The tanh form is also what runs on
accelerators (where tanh is cheap and a range check would cost a host sync).

Two executors share these formulas: a lazily built ``torch.compile`` kernel (fused reductions,
nothing five-dimensional is stored, used for large inputs) and an eager loop over tiles whose size
comes from a memory budget (always available; used for small inputs, when compiling fails, or
with ``HF_ATTENTION_DISABLE_COMPILE=1``).

This file is copied next to saved models and imported as remote code: torch and stdlib only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["additive_attention", "additive_scores", "naive_additive_scores"]

#: Default size of one eager tile buffer. A few MB keeps the tile in the L2/L3 cache, where the
#: several passes per tile are cheap, while keeping per-op Python overhead small.
DEFAULT_CHUNK_BYTES = 4 * 2**20
CHUNK_ENV = "HF_ATTENTION_ADDITIVE_CHUNK_MB"
DISABLE_COMPILE_ENV = "HF_ATTENTION_DISABLE_COMPILE"
#: Below this many (b, h, i, j, a) elements the eager loop is faster than paying a compile.
COMPILE_MIN_ELEMENTS = 2**24

_BACKENDS = ("auto", "eager", "compile")
_compiled: dict[str, Callable[..., object]] = {}
_compile_failed = False


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def naive_additive_scores(q_proj: torch.Tensor, k_proj: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain broadcast formula: the reference for tests (memory O(B H Lq Lk A))."""
    hidden = torch.tanh(q_proj.unsqueeze(-2) + k_proj.unsqueeze(-3))  # [B, H, Lq, Lk, A]
    return (hidden * v[:, None, None, :]).sum(-1)


# --------------------------------------------------------------------------------------------
# configuration helpers
# --------------------------------------------------------------------------------------------
def _chunk_bytes(chunk_bytes: int | None) -> int:
    """Tile budget: explicit argument, else ``HF_ATTENTION_ADDITIVE_CHUNK_MB``, else the default."""
    if chunk_bytes is None:
        env = os.environ.get(CHUNK_ENV)
        chunk_bytes = int(float(env) * 2**20) if env else DEFAULT_CHUNK_BYTES
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return int(chunk_bytes)


def _compile_disabled() -> bool:
    return os.environ.get(DISABLE_COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and bfloat16 inputs are computed in float32 (exp/tanh of them lose too much)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def plan_tiles(n: int, lq: int, lk: int, a: int, itemsize: int, chunk_bytes: int) -> tuple[int, int, int]:
    """Tile sizes ``(heads, queries, keys)`` so that one ``heads x queries x keys x a`` buffer fits.

    Keys are kept whole when one query row fits (so no partial-key bookkeeping is needed), then as
    many queries and, if all queries fit, as many (batch, head) pairs as the budget allows. A single
    element row always runs even when it alone is larger than the budget.
    """
    budget = max(1, chunk_bytes // max(1, itemsize * a))  # elements of a [.., keys] plane
    tk = max(1, min(lk, budget))
    tq = max(1, min(lq, budget // tk))
    tn = max(1, min(n, budget // (tk * tq))) if tq == lq else 1
    return tn, tq, tk


def _tiles(n: int, lq: int, lk: int, plan: tuple[int, int, int]) -> Iterator[tuple[slice, slice, slice]]:
    tn, tq, tk = plan
    for n0 in range(0, n, tn):
        for q0 in range(0, lq, tq):
            for k0 in range(0, lk, tk):
                yield slice(n0, min(n, n0 + tn)), slice(q0, min(lq, q0 + tq)), slice(k0, min(lk, k0 + tk))


# --------------------------------------------------------------------------------------------
# formulas shared by the eager tiles and the compiled kernels
#   "exp":  inputs are E = exp(2 qa), F = exp(2 ka); r = 1 / (1 + E F); tanh = 1 - 2 r
#   "tanh": inputs are qa, ka;                      t = tanh(qa + ka)
# --------------------------------------------------------------------------------------------
def _fwd_exp(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r = torch.reciprocal(1 + x[:, :, None, :] * y[:, None, :, :])
    return v.sum(-1)[:, None, None] - 2 * (r * v[:, None, None, :]).sum(-1)


def _fwd_tanh(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x[:, :, None, :] + y[:, None, :, :]) * v[:, None, None, :]).sum(-1)


def _bwd_exp(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = torch.reciprocal(1 + x[:, :, None, :] * y[:, None, :, :])
    w = ds[..., None] * (r - r * r)
    dx = 4 * v[:, None, :] * w.sum(2)
    dy = 4 * v[:, None, :] * w.sum(1)
    dv = ds.sum((1, 2))[:, None] - 2 * (ds[..., None] * r).sum((1, 2))
    return dx, dy, dv


def _bwd_tanh(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = torch.tanh(x[:, :, None, :] + y[:, None, :, :])
    w = ds[..., None] * (1 - t * t)
    dx = v[:, None, :] * w.sum(2)
    dy = v[:, None, :] * w.sum(1)
    dv = (ds[..., None] * t).sum((1, 2))
    return dx, dy, dv


_KERNELS: dict[str, Callable[..., object]] = {
    "fwd_exp": _fwd_exp,
    "fwd_tanh": _fwd_tanh,
    "bwd_exp": _bwd_exp,
    "bwd_tanh": _bwd_tanh,
}


def _get_compiled(name: str) -> Callable[..., object] | None:
    """Build the compiled kernel on first use, so importing this module stays cheap."""
    if name not in _compiled:
        try:
            _compiled[name] = torch.compile(_KERNELS[name], fullgraph=True)
        except Exception as err:  # noqa: BLE001 - e.g. no dynamo on this platform / Python
            _warn_compile_failure(err)
            return None
    return _compiled[name]


def _warn_compile_failure(err: BaseException) -> None:
    global _compile_failed
    if not _compile_failed:
        warnings.warn(
            f"additive attention: torch.compile failed ({type(err).__name__}: {err}); using the "
            f"eager tiled kernel from now on (set {DISABLE_COMPILE_ENV}=1 to skip compiling).",
            RuntimeWarning,
            stacklevel=3,
        )
    _compile_failed = True


def _run_compiled(name: str, *args: torch.Tensor) -> object | None:
    """Call a compiled kernel; ``None`` (after a one-time warning) if compiling is impossible."""
    if _compile_failed:
        return None
    fn = _get_compiled(name)
    if fn is None:
        return None
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - inductor/toolchain errors of many kinds
        _warn_compile_failure(err)
        return None


# --------------------------------------------------------------------------------------------
# eager tiles
# --------------------------------------------------------------------------------------------
def _eager_forward(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, form: str, plan: tuple[int, int, int]
) -> torch.Tensor:
    n, lq, a = x.shape
    lk = y.shape[1]
    out = x.new_empty(n, lq, lk)
    vsum = v.sum(-1)
    tn, tq, tk = plan
    buf = x.new_empty(tn * tq * tk * a)
    one = x.new_ones(())
    for sn, sq, sk in _tiles(n, lq, lk, plan):
        xs, ys, vs = x[sn, sq], y[sn, sk], v[sn]
        t = buf[: xs.shape[0] * xs.shape[1] * ys.shape[1] * a].view(xs.shape[0], xs.shape[1], ys.shape[1], a)
        if form == "exp":
            torch.addcmul(one, xs[:, :, None, :], ys[:, None, :, :], out=t).reciprocal_()
        else:
            torch.add(xs[:, :, None, :], ys[:, None, :, :], out=t).tanh_()
        red = torch.bmm(t.view(t.shape[0], -1, a), vs[:, :, None]).view(t.shape[:3])
        if form == "exp":
            red = vsum[sn, None, None] - 2 * red
        out[sn, sq, sk] = red
    return out


def _eager_backward(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ds: torch.Tensor, form: str, plan: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, lq, a = x.shape
    lk = y.shape[1]
    dx, dy, dv = torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(v)
    tn, tq, tk = plan
    buf = x.new_empty(tn * tq * tk * a)
    one = x.new_ones(())
    for sn, sq, sk in _tiles(n, lq, lk, plan):
        xs, ys, g = x[sn, sq], y[sn, sk], ds[sn, sq, sk]
        m, nq, nk = g.shape
        t = buf[: m * nq * nk * a].view(m, nq, nk, a)
        if form == "exp":
            torch.addcmul(one, xs[:, :, None, :], ys[:, None, :, :], out=t).reciprocal_()  # r
        else:
            torch.add(xs[:, :, None, :], ys[:, None, :, :], out=t).tanh_()  # t
        # dv: sum_ij g_ij * t_ija, one (1 x nq nk) @ (nq nk x a) product per head
        dv[sn] += torch.bmm(g.reshape(m, 1, nq * nk), t.view(m, nq * nk, a)).view(m, a)
        if form == "exp":
            t.addcmul_(t, t, value=-1)  # r (1 - r) = (1 - tanh^2) / 4
        else:
            torch.addcmul(one, t, t, value=-1, out=t)  # 1 - tanh^2
        # dx: sum_j g_ij s_ija, one (1 x nk) @ (nk x a) product per (head, query)
        dx[sn, sq] += torch.bmm(g.reshape(m * nq, 1, nk), t.view(m * nq, nk, a)).view(m, nq, a)
        dy[sn, sk] += t.mul_(g[..., None]).sum(1)
    scale = 4.0 if form == "exp" else 1.0
    dx.mul_(v[:, None, :] * scale)
    dy.mul_(v[:, None, :] * scale)
    if form == "exp":
        dv = ds.sum((1, 2))[:, None] - 2 * dv
    return dx, dy, dv


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _prepare(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pick the formula and build its per-token inputs (``[N, L, A]`` in the compute dtype)."""
    if q.device.type != "cpu" or q.numel() == 0 or k.numel() == 0:
        return q, k, "tanh"
    # Opposite per-feature shifts leave every q_i + k_j unchanged and centre both ranges.
    c = (q.amax(1, keepdim=True) + q.amin(1, keepdim=True) - k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / 4
    qs, ks = q - c, k + c
    # |x| <= limit keeps exp(+-2x) and the products of two of them inside the normal range
    # except where tanh is saturated anyway (then r is exactly 0 or 1, which is right).
    limit = 0.45 * math.log(torch.finfo(q.dtype).max)
    bound = torch.maximum(qs.abs().amax(), ks.abs().amax())
    if not bool(bound <= limit):  # also False for NaN: the tanh form propagates it
        return q, k, "tanh"
    return torch.exp(2 * qs), torch.exp(2 * ks), "exp"


def _use_compile(backend: str, elements: int) -> bool:
    if backend == "eager" or _compile_failed or _compile_disabled():
        return False
    return backend == "compile" or elements >= COMPILE_MIN_ELEMENTS


class _AdditiveScores(torch.autograd.Function):
    """Scores forward, and a backward that recomputes the elementwise part instead of storing it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q_proj: torch.Tensor,
        k_proj: torch.Tensor,
        v: torch.Tensor,
        backend: str,
        chunk_bytes: int,
    ) -> torch.Tensor:
        b, h, lq, a = q_proj.shape
        lk = k_proj.shape[2]
        acc = _acc_dtype(torch.promote_types(torch.promote_types(q_proj.dtype, k_proj.dtype), v.dtype))
        q = q_proj.reshape(b * h, lq, a).to(acc)
        k = k_proj.reshape(b * h, lk, a).to(acc)
        vn = v.to(acc).repeat(b, 1)  # [B*H, A], row b*H + h is v[h]
        x, y, form = _prepare(q, k)
        compiled = _use_compile(backend, b * h * lq * lk * a)
        scores = _run_compiled(f"fwd_{form}", x, y, vn) if compiled else None
        if scores is None:
            plan = plan_tiles(b * h, lq, lk, a, x.element_size(), chunk_bytes)
            scores = _eager_forward(x, y, vn, form, plan)
        ctx.save_for_backward(x, y, vn)
        ctx.form, ctx.compiled, ctx.chunk_bytes = form, compiled, chunk_bytes
        ctx.shapes = (b, h, lq, lk, a)
        ctx.dtypes = (q_proj.dtype, k_proj.dtype, v.dtype)
        return scores.view(b, h, lq, lk).to(q_proj.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, y, vn = ctx.saved_tensors
        b, h, lq, lk, a = ctx.shapes
        ds = grad.reshape(b * h, lq, lk).to(x.dtype)
        grads = _run_compiled(f"bwd_{ctx.form}", x, y, vn, ds) if ctx.compiled else None
        if grads is None:
            plan = plan_tiles(b * h, lq, lk, a, x.element_size(), ctx.chunk_bytes)
            grads = _eager_backward(x, y, vn, ds, ctx.form, plan)
        dx, dy, dv = grads  # type: ignore[misc]
        dq = dx.view(b, h, lq, a).to(ctx.dtypes[0])
        dk = dy.view(b, h, lk, a).to(ctx.dtypes[1])
        dvh = dv.view(b, h, a).sum(0).to(ctx.dtypes[2])
        return dq, dk, dvh, None, None


def additive_scores(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """q_proj [B,H,Lq,A], k_proj [B,H,Lk,A], v [H,A] -> scores [B,H,Lq,Lk].

    Never materialises the full B x H x Lq x Lk x A tensor, forward nor backward.
    ``backend``: "auto" compiles for large inputs (falls back to eager if compiling fails),
    "eager" always tiles, "compile" compiles whatever the size. ``chunk_bytes`` bounds one eager
    tile (default 4 MB, or ``HF_ATTENTION_ADDITIVE_CHUNK_MB``).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if q_proj.dim() != 4 or k_proj.dim() != 4:
        raise ValueError(f"q_proj and k_proj must be [B, H, L, A], got {tuple(q_proj.shape)}, {tuple(k_proj.shape)}")
    b, h, _, a = q_proj.shape
    if k_proj.shape[:2] != q_proj.shape[:2] or k_proj.shape[-1] != a:
        raise ValueError(f"k_proj {tuple(k_proj.shape)} does not match q_proj {tuple(q_proj.shape)}")
    if v.shape != (h, a):
        raise ValueError(f"v must be [H, A] = [{h}, {a}], got {tuple(v.shape)}")
    budget = _chunk_bytes(chunk_bytes)
    if torch.compiler.is_compiling():
        # Inside a user's torch.compile the outer compiler fuses the broadcast forward itself.
        return naive_additive_scores(q_proj, k_proj, v)
    return _AdditiveScores.apply(q_proj, k_proj, v, backend, budget)


# --------------------------------------------------------------------------------------------
# full attention
# --------------------------------------------------------------------------------------------
def additive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    b: torch.Tensor | None,
    v: torch.Tensor,
    attention_bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    output_attentions: bool = False,
    *,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive attention: returns ``(out [B, Lq, H, Dv], probs [B, H, Lq, Lk] or None)``.

    query [B,H,Lq,D], key [B,H,Lk,D], value [B,H,Lk,Dv]; w_q/w_k [H,D,A], b [H,A] or None, v [H,A].
    ``attention_bias`` is added to the scores (broadcastable to [B,H,Lq,Lk]): padding masks as
    ``finfo.min`` (a fully masked row then attends uniformly, like transformers' eager kernels) or
    ``-inf`` (a fully masked row then gives zeros, never NaN); a boolean mask follows SDPA (True =
    attend). Softmax runs in float32 for half/bfloat16. ``out`` is transposed like transformers'
    attention kernels return it.
    """
    qa = torch.matmul(query, w_q.unsqueeze(0))
    if b is not None:
        qa = qa + b[:, None, :]
    ka = torch.matmul(key, w_k.unsqueeze(0))
    scores = additive_scores(qa, ka, v, backend=backend, chunk_bytes=chunk_bytes)
    scores = scores.to(_acc_dtype(scores.dtype))
    if attention_bias is not None:
        if attention_bias.dtype == torch.bool:
            attention_bias = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
                ~attention_bias, float("-inf")
            )
        scores = scores + attention_bias.to(scores.dtype)
    if scores.shape[-1] == 0:
        probs = scores
    else:
        # Rows whose every score is -inf would be NaN; make them finite, then zero their weights.
        dead = scores.amax(-1, keepdim=True) == float("-inf")
        probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    probs = probs.to(value.dtype)
    if training and dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, (probs if output_attentions else None)
