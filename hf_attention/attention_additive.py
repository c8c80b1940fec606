"""Bahdanau (additive) attention scores without the B x H x Lq x Lk x A tensor.

``score[b, h, i, j] = sum_a v[h, a] * tanh(qa[b, h, i, a] + ka[b, h, j, a])`` written as a broadcast
builds a five-dimensional tensor (about 6 GB forward+backward at 8 heads, 1024 tokens, A=64), and
autograd keeps it alive for the backward. Here a custom ``torch.autograd.Function`` reduces over
``a`` as it goes and its backward recomputes the elementwise part tile by tile, so memory stays
O(B H Lq Lk) like any dense attention.

Speed on CPU comes from an identity rather than from ``tanh`` itself (ATen's and inductor's tanh
are 3-10x slower than an exp or a division on this CPU): with ``E = exp(2 qa)`` and
``F = exp(2 ka)`` computed once per token,

    tanh(qa_i + ka_j) = 1 - 2 r_ij,   r_ij = 1 / (1 + E_i F_j),   1 - tanh^2 = 4 r_ij (1 - r_ij),

so each of the Lq x Lk x A elements costs a multiply-add and a reciprocal. The identity is exact
as long as ``exp(+-2 x)`` neither overflows nor underflows; ``qa`` and ``ka`` are first shifted by
opposite per-feature constants (which leaves every sum ``qa_i + ka_j`` unchanged) and when the
shifted values still leave the safe range, ``r = sigmoid(-2 (qa_i + ka_j))`` is used instead (no
range limit, still faster than tanh). The sigmoid form is also what runs on accelerators, where
the range check would cost a host sync.

Two executors share these formulas: a lazily built ``torch.compile`` kernel (fused reductions,
nothing five-dimensional is stored, used for large inputs) and an eager loop over tiles whose size
comes from a memory budget (always available; used for small inputs, when compiling fails, or
with ``HF_ATTENTION_DISABLE_COMPILE=1``).

This file is copied next to saved models and imported as remote code: torch, stdlib and its flat siblings.
`AdditiveScore` at the end is the `attention_type` class that owns the parameters and calls the kernel.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .scores_hf_attention import AttentionScore, register_attention_score

__all__ = ["AdditiveScore", "additive_attention", "additive_scores", "naive_additive_scores"]

#: Default size of one eager tile buffer. Every op on a tile is a parallel region whose cost on a
#: shared, busy CPU is dominated by waiting for the slowest thread, so fewer, larger tiles win:
#: at 8 heads x 1024 x 1024 x 64 with another process running, 64 MB tiles were 2.3x faster than
#: 16 MB ones (and within 20% of them on an idle machine). Memory stays far below the 5-D tensor.
DEFAULT_CHUNK_BYTES = 64 * 2**20
CHUNK_ENV = "HF_ATTENTION_ADDITIVE_CHUNK_MB"
DISABLE_COMPILE_ENV = "HF_ATTENTION_DISABLE_COMPILE"
#: "auto" compiles from this many (b, h, i, j, a) elements on (8 heads x 512 x 512 x 32): below
#: it the eager tiles take tens of ms, and the 10-40 s first compile would not pay for itself.
COMPILE_MIN_ELEMENTS = 2**26

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
# formulas shared by the eager tiles and the compiled kernels. Both forms produce
#   r_ij = 1 / (1 + exp(2 (qa_i + ka_j))),  tanh = 1 - 2 r,  1 - tanh^2 = 4 r (1 - r)
# from per-token inputs x [B, H, Lq, A], y [B, H, Lk, A] (and v [H, A]):
#   "exp":     x = exp(2 qa), y = exp(2 ka), r = 1 / (1 + x y)   (a multiply-add and a reciprocal)
#   "sigmoid": x = -2 qa,     y = -2 ka,     r = sigmoid(x + y)  (no range limit, ~3x slower on CPU)
# --------------------------------------------------------------------------------------------
def _r_exp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(1 + x[..., :, None, :] * y[..., None, :, :])


def _r_sigmoid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x[..., :, None, :] + y[..., None, :, :])


def _fwd_from_r(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # r [B, H, Lq, Lk, A], v [H, A]: score = sum_a v_a (1 - 2 r_a)
    return v.sum(-1)[:, None, None] - 2 * (r * v[:, None, None, :]).sum(-1)


def _bwd_from_r(
    r: torch.Tensor, v: torch.Tensor, ds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Written so that inductor emits two loop nests that recompute r (one reducing over keys for
    # dx, one over queries for dy and dv) and stores nothing of size B x H x Lq x Lk x A.
    g = ds[..., None] * r
    w = g - g * r  # g r (1 - r) = g (1 - tanh^2) / 4
    dx = 4 * v[:, None, :] * w.sum(3)
    dy = 4 * v[:, None, :] * w.sum(2)
    dv = ds.sum((0, 2, 3))[:, None] - 2 * g.sum(2).sum((0, 2))
    return dx, dy, dv


def _fwd_exp(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _fwd_from_r(_r_exp(x, y), v)


def _fwd_sigmoid(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _fwd_from_r(_r_sigmoid(x, y), v)


def _bwd_exp(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_from_r(_r_exp(x, y), v, ds)


def _bwd_sigmoid(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_from_r(_r_sigmoid(x, y), v, ds)


_KERNELS: dict[str, Callable[..., object]] = {
    "fwd_exp": _fwd_exp,
    "fwd_sigmoid": _fwd_sigmoid,
    "bwd_exp": _bwd_exp,
    "bwd_sigmoid": _bwd_sigmoid,
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


def _fail_on_recompile_limit() -> contextlib.AbstractContextManager[object]:
    """Past its recompile limit dynamo would silently run the plain broadcast (5-D memory): raise."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is None or not hasattr(config, "fail_on_recompile_limit_hit"):  # other torch versions
        return contextlib.nullcontext()
    return config.patch(fail_on_recompile_limit_hit=True)


def _run_compiled(name: str, *args: torch.Tensor) -> object | None:
    """Call a compiled kernel; ``None`` (after a one-time warning) if compiling is impossible."""
    if _compile_failed:
        return None
    fn = _get_compiled(name)
    if fn is None:
        return None
    try:
        with _fail_on_recompile_limit():
            return fn(*args)
    except Exception as err:  # noqa: BLE001 - inductor/toolchain errors of many kinds
        _warn_compile_failure(err)
        return None


# --------------------------------------------------------------------------------------------
# eager tiles
# --------------------------------------------------------------------------------------------
def _fill_r(out: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, form: str) -> torch.Tensor:
    """Write r for one tile into ``out`` ([m, nq, nk, A]) in two in-place passes."""
    if form == "exp":
        one = torch.ones((), dtype=out.dtype, device=out.device)
        return torch.addcmul(one, xs[:, :, None, :], ys[:, None, :, :], out=out).reciprocal_()
    return torch.add(xs[:, :, None, :], ys[:, None, :, :], out=out).sigmoid_()


def _eager_forward(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, form: str, plan: tuple[int, int, int]
) -> torch.Tensor:
    b, h, lq, a = x.shape
    lk = y.shape[2]
    n = b * h
    x, y, vn = x.reshape(n, lq, a), y.reshape(n, lk, a), v.repeat(b, 1)  # row b*H + h of vn is v[h]
    # Allocated 4-D (not a view of a 3-D result): callers may modify the scores in place.
    scores = x.new_empty(b, h, lq, lk)
    out = scores.view(n, lq, lk)
    buf = x.new_empty(math.prod(plan) * a)  # one tile buffer, reused
    for sn, sq, sk in _tiles(n, lq, lk, plan):
        xs, ys = x[sn, sq], y[sn, sk]
        m, nq, nk = xs.shape[0], xs.shape[1], ys.shape[1]
        r = _fill_r(buf[: m * nq * nk * a].view(m, nq, nk, a), xs, ys, form)
        torch.bmm(r.view(m, nq * nk, a), vn[sn, :, None], out=out[sn, sq, sk].view(m, nq * nk, 1))
    # score = sum_a v_a (1 - 2 r_a)
    return scores.mul_(-2).add_(v.sum(-1)[:, None, None])


def _eager_backward(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ds: torch.Tensor, form: str, plan: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, lq, a = x.shape
    lk = y.shape[2]
    n = b * h
    x, y, ds = x.reshape(n, lq, a), y.reshape(n, lk, a), ds.reshape(n, lq, lk)
    dx, dy, dv = torch.zeros_like(x), torch.zeros_like(y), x.new_zeros(n, a)
    buf = x.new_empty(math.prod(plan) * a)
    ones = x.new_ones(plan[0], 1, plan[1])
    # Every reduction over the tile is a batched vector-matrix product: faster than sum() here.
    for sn, sq, sk in _tiles(n, lq, lk, plan):
        xs, ys, g = x[sn, sq], y[sn, sk], ds[sn, sq, sk]
        m, nq, nk = g.shape
        r = _fill_r(buf[: m * nq * nk * a].view(m, nq, nk, a), xs, ys, form)
        # dv needs sum_ij g_ij r_ija
        dv[sn].add_(torch.bmm(g.reshape(m, 1, nq * nk), r.view(m, nq * nk, a)).view(m, a))
        s = r.addcmul_(r, r, value=-1)  # r (1 - r) = (1 - tanh^2) / 4
        # dx: sum_j g_ij s_ija;  dy: sum_i g_ij s_ija
        dx[sn, sq].add_(torch.bmm(g.reshape(m * nq, 1, nk), s.view(m * nq, nk, a)).view(m, nq, a))
        w = s.mul_(g[..., None]).view(m, nq, nk * a)
        dy[sn, sk].add_(torch.bmm(ones[:m, :, :nq], w).view(m, nk, a))
    scale = 4 * v[:, None, :]
    dx = dx.view(b, h, lq, a).mul_(scale)
    dy = dy.view(b, h, lk, a).mul_(scale)
    dv = ds.sum((1, 2)).view(b, h).sum(0)[:, None] - 2 * dv.view(b, h, a).sum(0)
    return dx, dy, dv


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _prepare(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pick the form and build its per-token inputs x, y (``[B, H, L, A]``, compute dtype).

    The exp form needs a data-dependent range check (a host sync), so it is only tried on CPU,
    where it is about 3x faster than the sigmoid form; accelerators always use sigmoid.
    """
    if q.device.type != "cpu" or q.numel() == 0 or k.numel() == 0:
        return -2 * q, -2 * k, "sigmoid"
    # Opposite per-feature shifts c leave every q_i + k_j unchanged and centre both ranges.
    q_min, q_max = torch.aminmax(q, dim=-2, keepdim=True)
    k_min, k_max = torch.aminmax(k, dim=-2, keepdim=True)
    c = (q_max + q_min - k_max - k_min) / 4
    # |x| <= limit keeps exp(+-2x) inside the normal range; a product of two such factors can
    # only overflow or underflow where tanh is saturated anyway (r is then exactly 0 or 1).
    limit = 0.45 * math.log(torch.finfo(q.dtype).max)
    bound = torch.stack([q_max - c, c - q_min, k_max + c, -c - k_min]).amax()
    if not bool(bound <= limit):  # also False for NaN, which the sigmoid form propagates
        return -2 * q, -2 * k, "sigmoid"
    return torch.exp((q - c).mul_(2)), torch.exp((k + c).mul_(2)), "exp"


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
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        b, h, lq, a = q_proj.shape
        lk = k_proj.shape[2]
        acc = _acc_dtype(torch.promote_types(torch.promote_types(q_proj.dtype, k_proj.dtype), v.dtype))
        x, y, form = _prepare(q_proj.to(acc), k_proj.to(acc))
        v_acc = v.to(acc)
        compiled = _use_compile(backend, b * h * lq * lk * a)
        scores = _run_compiled(f"fwd_{form}", x, y, v_acc) if compiled else None
        if scores is None:
            plan = plan_tiles(b * h, lq, lk, a, x.element_size(), chunk_bytes)
            scores = _eager_forward(x, y, v_acc, form, plan)
        ctx.save_for_backward(x, y, v_acc)
        ctx.form, ctx.compiled, ctx.chunk_bytes = form, compiled, chunk_bytes
        ctx.dtypes = (q_proj.dtype, k_proj.dtype, v.dtype)
        if scores._base is not None:  # type: ignore[union-attr]
            scores = scores.clone()  # type: ignore[union-attr]  # a view could not be modified in place
        return scores.to(out_dtype)  # type: ignore[union-attr]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, y, v = ctx.saved_tensors
        ds = grad.to(x.dtype).contiguous()
        grads = _run_compiled(f"bwd_{ctx.form}", x, y, v, ds) if ctx.compiled else None
        if grads is None:
            b, h, lq, a = x.shape
            plan = plan_tiles(b * h, lq, y.shape[2], a, x.element_size(), ctx.chunk_bytes)
            grads = _eager_backward(x, y, v, ds, ctx.form, plan)
        dx, dy, dv = grads  # type: ignore[misc]
        return dx.to(ctx.dtypes[0]), dy.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), None, None, None


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
    tile (default 64 MB, or ``HF_ATTENTION_ADDITIVE_CHUNK_MB``).
    """
    return _scores(q_proj, k_proj, v, backend, chunk_bytes, q_proj.dtype)


def _scores(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    chunk_bytes: int | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if q_proj.dim() != 4 or k_proj.dim() != 4:
        shapes = f"{tuple(q_proj.shape)}, {tuple(k_proj.shape)}"
        raise ValueError(f"q_proj and k_proj must be [B, H, L, A], got {shapes}")
    b, h, _, a = q_proj.shape
    if k_proj.shape[:2] != q_proj.shape[:2] or k_proj.shape[-1] != a:
        raise ValueError(f"k_proj {tuple(k_proj.shape)} does not match q_proj {tuple(q_proj.shape)}")
    if v.shape != (h, a):
        raise ValueError(f"v must be [H, A] = [{h}, {a}], got {tuple(v.shape)}")
    budget = _chunk_bytes(chunk_bytes)
    if torch.compiler.is_compiling():
        # Inside a user's torch.compile the outer compiler fuses the broadcast forward itself.
        return naive_additive_scores(q_proj, k_proj, v).to(out_dtype)
    return _AdditiveScores.apply(q_proj, k_proj, v, backend, budget, out_dtype)


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
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    output_attentions: bool = False,
    *,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive attention: returns ``(out [B, Lq, H, Dv], probs [B, H, Lq, Lk] or None)``.

    query [B,H,Lq,D], key [B,H,Lk,D], value [B,H,Lk,Dv]; w_q/w_k [H,D,A], b [H,A] or None, v [H,A].
    ``attention_mask`` is added to the scores (broadcastable to [B,H,Lq,Lk]): padding masks as
    ``finfo.min`` (a fully masked row then attends uniformly, like transformers' eager kernels) or
    ``-inf`` (a fully masked row then gives zeros, never NaN); a boolean mask follows SDPA (True =
    attend). Softmax runs in float32 for half/bfloat16. ``out`` is transposed like transformers'
    attention kernels return it.
    """
    qa = torch.matmul(query, w_q.unsqueeze(0))
    if b is not None:
        qa = qa + b[:, None, :]
    ka = torch.matmul(key, w_k.unsqueeze(0))
    # float32 scores straight from the kernel for half/bf16 (no round trip through half); the
    # result is a fresh tensor that autograd does not save, so the bias can be added in place.
    scores = _scores(qa, ka, v, backend, chunk_bytes, _acc_dtype(qa.dtype))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
                ~attention_mask, float("-inf")
            )
        attention_mask = attention_mask.to(scores.dtype)
        if torch.broadcast_shapes(scores.shape, attention_mask.shape) == scores.shape:
            scores = scores.add_(attention_mask)
        else:
            scores = scores + attention_mask
    if attention_mask is None or scores.shape[-1] == 0:
        probs = torch.softmax(scores, dim=-1)  # scores are bounded by sum |v|: never all -inf
    else:
        # Rows whose every score is -inf would be NaN: make them finite, then zero their weights.
        # On CPU the check is free, so the two extra passes only run when such a row exists.
        dead = scores.amax(-1, keepdim=True) == float("-inf")
        if scores.device.type != "cpu" or bool(dead.any()):
            probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
        else:
            probs = torch.softmax(scores, dim=-1)
    probs = probs.to(value.dtype)
    if training and dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, (probs if output_attentions else None)


@register_attention_score
class AdditiveScore(AttentionScore):
    """Bahdanau scoring per head, score = v^T tanh(W_q q + W_k k + b), softmax over keys.

    Score biases and sparse patterns enter as the additive mask, so additive + a pattern equals additive under
    the pattern's dense mask (it skips no computation: this kernel is dense).
    """

    name = "additive"
    has_parameters = True
    fast_kernel = False

    def __init__(self, config):
        super().__init__(config)
        a = config.additive_hidden_size
        self.w_q = nn.Parameter(torch.empty(self.num_heads, self.head_dim, a))
        self.w_k = nn.Parameter(torch.empty(self.num_heads, self.head_dim, a))
        self.b = nn.Parameter(torch.empty(self.num_heads, a))
        self.v = nn.Parameter(torch.empty(self.num_heads, a))

    def init_weights(self, config) -> None:
        init.normal_(self.w_q, mean=0.0, std=self.head_dim**-0.5)
        init.normal_(self.w_k, mean=0.0, std=self.head_dim**-0.5)
        init.zeros_(self.b)
        init.normal_(self.v, mean=0.0, std=self.v.shape[-1] ** -0.5)

    def forward(self, attention, query, key, value, inputs, dropout=0.0, output_attentions=False, **kwargs):
        return additive_attention(
            query, key, value, self.w_q, self.w_k, self.b, self.v,
            attention_mask=inputs.mask_with_bias(query.dtype, query.device),
            dropout=dropout, training=attention.training, output_attentions=output_attentions,
        )
