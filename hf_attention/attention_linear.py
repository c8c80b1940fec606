"""Linear attention (Katharopoulos et al., 2020): softmax replaced by a feature-map kernel.

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)

Associating the product this way costs O(N M Dv) instead of O(N^2 D) (M = feature dimension), and a
causal decoder needs only the running sums ``S = sum_j phi(k_j) v_j^T`` [B, H, M, Dv] and
``z = sum_j phi(k_j)`` [B, H, M]: a constant-size state instead of a KV cache.

Forms, all equal to the same O(N^2) formula (the tests check it against an explicit, masked,
normalised ``phi(Q) phi(K)^T`` matrix):

* bidirectional: ``S`` and ``z`` over all (real) keys, then one product per query;
* causal, chunked: inside a chunk of ``chunk_size`` tokens the quadratic form under a triangular mask,
  across chunks an exclusive prefix sum of the per-chunk ``S`` (O(N M Dv) time, O(N M Dv / chunk)
  memory); the denominator is a plain prefix sum of ``phi(k)``;
* recurrent: :func:`linear_attention_step` continues a :class:`LinearAttentionState` with L >= 1 new
  tokens (causal among themselves), through the same chunked code with the state as initial value.

Padding keys contribute nothing (their ``phi(k)`` is zeroed), so a padded batch equals each sequence
alone, left or right padded. Feature maps come from a small registry (:data:`FEATURE_MAPS`):
``"elu"`` (elu + 1, the paper's), ``"relu"`` and ``"performer"`` (FAVOR+, see
:class:`PerformerFeatureMap`). Features, sums and states are kept in float32 for half-precision inputs
(sums over thousands of tokens lose too much in 16 bits).

RoPE (RoFormer's linear variant, Su et al. 2021, eq. 19): the rotation acts on ``phi(q)``/``phi(k)`` in
the numerator only and the denominator keeps the unrotated features, so it stays positive. The
numerator state then holds rotated keys, ``S = sum_j R_j phi(k_j) v_j^T``, while ``z`` is unrotated.
The implied weights (``output_attentions``) are then rotated numerator / unrotated denominator, which
is what multiplies V, but their rows no longer sum to exactly 1.

Generation cache integration (transformers 5.24, ``transformers.cache_utils``)
-----------------------------------------------------------------------------
``generate()`` builds a ``DynamicCache(config=...)`` (a list of per-layer ``DynamicLayer``), passes it
to every forward as ``cache``, and relies on three things:

1. ``cache.get_seq_length()`` (layer 0) gives the number of cached token *slots* (padding included).
   Our decoder derives the new tokens' position ids and the expected ``attention_mask`` width
   (past + new) from it, and generate() slices the next input with it.
2. Beam search calls ``cache.reorder_cache(beam_idx)``; other paths call
   ``cache.batch_select_indices(indices)`` / ``cache.batch_repeat_interleave(repeats)``; ``Cache`` just
   forwards these to each ``cache.layers[i]``.
3. Assisted / speculative decoding calls ``cache.crop(-n)`` and checks ``cache.is_croppable`` first.

transformers' own ``LinearAttentionLayer`` (for Mamba-style models) does not fit: it is not a
``CacheLayerMixin``, so ``Cache.get_seq_length()`` raises on a cache made only of them and generate()
switches to its ``is_linear`` code path, and it has no ``batch_select_indices``. So the state lives in
:class:`LinearAttentionCacheLayer`, a ``CacheLayerMixin`` that holds one :class:`LinearAttentionState`
(no keys, no values) and answers every layer method itself:

* ``get_seq_length()`` = slots consumed so far (``state.num_tokens``, counting padding as a
  ``DynamicLayer`` would), ``get_mask_sizes(q) = (past + q, 0)``, ``get_max_length() = -1``;
* ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` act on ``S`` and ``z``
  along the batch dimension, so beam search and friends carry the state along;
* ``crop`` refuses (a running sum cannot forget tokens) and ``is_croppable`` is False, so generate()
  never picks paths that would need it; ``reset`` drops the state.

A layer uses it as: ``layer = linear_cache_layer(cache, self.layer_idx)`` (swaps the still-empty
``DynamicLayer`` that ``DynamicCache(config=...)`` created at that index for ours; for an
``EncoderDecoderCache`` pass its ``self_attention_cache``), then
``out = layer.step(query, key, value, feature_map, key_padding_mask=..., rotary=...)``; without a cache
it calls :func:`linear_attention` with ``causal=True``. ``key_padding_mask`` may be the model's full
[B, past + new] mask; the step uses its last L columns. ``rotary`` is the (cos, sin) of the new tokens'
positions (queries and keys are the same tokens). No transformers registry is modified: nothing is
registered under a ``layer_types`` name, so saved configs stay loadable without this module.
``output_attentions`` with a cache is not available (past keys are gone); a layer should refuse it.

Torch and stdlib only, except :class:`LinearAttentionCacheLayer`, which subclasses transformers'
``CacheLayerMixin``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .positions_hf_attention import apply_rotary

__all__ = [
    "FEATURE_MAPS",
    "EluFeatureMap",
    "FeatureMap",
    "LinearAttentionCacheLayer",
    "LinearAttentionState",
    "PerformerFeatureMap",
    "ReluFeatureMap",
    "get_feature_map",
    "linear_attention",
    "linear_attention_step",
    "linear_cache_layer",
]

Rotary = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# feature maps
# --------------------------------------------------------------------------------------------
class FeatureMap:
    """phi: [..., D] -> [..., M], non-negative, so that the normaliser sum_j phi(q)^T phi(k_j) is positive."""

    name = "base"

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def __call__(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EluFeatureMap(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al.): positive everywhere, so no row ever has a zero normaliser."""

    name = "elu"

    def __call__(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return F.elu(x) + 1


class ReluFeatureMap(FeatureMap):
    """relu(x): sparse features; a query orthogonal to every key gets out = 0 (the eps guards 0 / 0)."""

    name = "relu"

    def __call__(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return F.relu(x)


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al., 2021).

    ``phi(x) = exp(W x' - ||x'||^2 / 2) / sqrt(M)`` with ``x' = x / D^(1/4)`` and ``W`` [M, D] Gaussian
    rows (block-orthogonal by default, each row rescaled to a chi(D) norm so its marginal stays
    N(0, I)). Then ``E[phi(q)^T phi(k)] = exp(q^T k / sqrt(D))``: normalised linear attention is an
    unbiased-kernel (and consistent, error ~ 1/sqrt(M)) estimate of ``softmax(Q K^T / sqrt(D)) V``.
    ``W`` is drawn from ``seed`` on the CPU in float64, so it is the same on every device and run and
    needs no buffer in the checkpoint. Queries are stabilised by their own max (a per-query factor,
    which cancels between numerator and denominator); keys are not, as a per-key factor would not
    cancel and a global one would break the recurrence: keys with ``||k||^2 / sqrt(D)`` beyond ~170
    overflow float32.
    """

    name = "performer"

    def __init__(self, num_features: int | None = None, seed: int = 0, orthogonal: bool = True):
        if num_features is not None and num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.seed = int(seed)
        self.orthogonal = orthogonal
        self._projections: dict[tuple, torch.Tensor] = {}

    def feature_dim(self, head_dim: int) -> int:
        """The paper's default M = D log D (at least D)."""
        return self.num_features or max(head_dim, int(head_dim * math.log(head_dim)))

    def projection(self, head_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (head_dim, str(device), dtype)
        if key not in self._projections:
            m = self.feature_dim(head_dim)
            gen = torch.Generator().manual_seed(self.seed)
            if self.orthogonal:
                blocks = []
                for _ in range(-(-m // head_dim)):
                    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
                    # sign fix: only then is Q Haar-distributed (LAPACK's Q alone is biased), so rows are uniform
                    blocks.append((q * torch.sign(torch.diagonal(r))).T)
                norms = torch.randn(m, head_dim, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
                w = torch.cat(blocks)[:m] * norms
            else:
                w = torch.randn(m, head_dim, generator=gen, dtype=torch.float64)
            self._projections[key] = w.to(device=device, dtype=dtype)
        return self._projections[key]

    def __call__(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        d = x.shape[-1]
        x = x * d**-0.25
        w = self.projection(d, x.device, x.dtype)
        logits = x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2
        if is_query:
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) * w.shape[0] ** -0.5

    def __repr__(self) -> str:
        return f"PerformerFeatureMap(num_features={self.num_features}, seed={self.seed}, orthogonal={self.orthogonal})"


#: Name -> factory. ``get_feature_map("performer", num_features=256, seed=1)`` passes the options on.
FEATURE_MAPS: dict[str, Callable[..., FeatureMap]] = {
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "performer": PerformerFeatureMap,
}
_DEFAULT_INSTANCES: dict[str, FeatureMap] = {}


def get_feature_map(spec: str | FeatureMap, **kwargs) -> FeatureMap:
    """A feature map by registry name (one shared instance per name without options) or as given."""
    if isinstance(spec, FeatureMap):
        if kwargs:
            raise ValueError("options are for a feature map given by name")
        return spec
    if spec not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {spec!r}; choose one of {sorted(FEATURE_MAPS)}")
    if kwargs:
        return FEATURE_MAPS[spec](**kwargs)
    if spec not in _DEFAULT_INSTANCES:  # shared, so the performer projection is built once
        _DEFAULT_INSTANCES[spec] = FEATURE_MAPS[spec]()
    return _DEFAULT_INSTANCES[spec]


# --------------------------------------------------------------------------------------------
# recurrent state
# --------------------------------------------------------------------------------------------
@dataclass
class LinearAttentionState:
    """Running sums of a causal linear attention: ``kv`` = sum phi(k) v^T [B, H, M, Dv] (rotated phi(k)
    under RoPE), ``z`` = sum phi(k) [B, H, M], and ``num_tokens`` = token slots consumed (padding included)."""

    kv: torch.Tensor
    z: torch.Tensor
    num_tokens: int = 0

    @classmethod
    def zeros(
        cls, batch: int, heads: int, feature_dim: int, value_dim: int, *,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> LinearAttentionState:
        return cls(
            torch.zeros(batch, heads, feature_dim, value_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, feature_dim, dtype=dtype, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.kv.shape[0]

    def reorder(self, beam_idx: torch.Tensor) -> LinearAttentionState:
        """Beam search: row i becomes old row beam_idx[i] (in place, as cache layers do; returns self)."""
        self.kv = self.kv.index_select(0, beam_idx.to(self.kv.device))
        self.z = self.z.index_select(0, beam_idx.to(self.z.device))
        return self

    def select(self, indices: torch.Tensor) -> LinearAttentionState:
        """Keep only these batch rows (``batch_select_indices``); in place, returns self."""
        self.kv, self.z = self.kv[indices], self.z[indices]
        return self

    def repeat_interleave(self, repeats: int) -> LinearAttentionState:
        """Each batch row ``repeats`` times in a row (``batch_repeat_interleave``); in place, returns self."""
        self.kv = self.kv.repeat_interleave(repeats, dim=0)
        self.z = self.z.repeat_interleave(repeats, dim=0)
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LinearAttentionState:
        self.kv = self.kv.to(device, non_blocking=non_blocking)
        self.z = self.z.to(device, non_blocking=non_blocking)
        return self


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _features(
    query: torch.Tensor,
    key: torch.Tensor,
    fmap: FeatureMap,
    key_padding_mask: torch.Tensor | None,
    rotary: Rotary | None,
    rotary_keys: Rotary | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phi_q, phi_k, phi_q for the numerator, phi_k for the numerator); padding keys zeroed."""
    acc = _acc_dtype(query.dtype)
    fq = fmap(query.to(acc), is_query=True)
    fk = fmap(key.to(acc), is_query=False)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (key.shape[0], key.shape[-2]):
            raise ValueError(
                f"key_padding_mask must be [batch, keys] = {(key.shape[0], key.shape[-2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        keep = key_padding_mask.to(device=fk.device, dtype=torch.bool)[:, None, :, None]
        fk = torch.where(keep, fk, 0.0)  # where, not a product: a padding key's features may be inf
    if rotary is None:
        return fq, fk, fq, fk
    rotary_keys = rotary if rotary_keys is None else rotary_keys
    for name, (cos, _), x in (("rotary", rotary, fq), ("rotary_keys", rotary_keys, fk)):
        if cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[-2]:
            raise ValueError(
                f"{name} cos/sin must be [B, {x.shape[-2]}, {x.shape[-1]}] (tokens, feature dim), got "
                f"{tuple(cos.shape)}; RoPE needs a feature map that keeps the head dimension (elu, relu)"
            )
    return fq, fk, apply_rotary(fq, *rotary), apply_rotary(fk, *rotary_keys)


def _bidirectional(fq, fk, fq_num, fk_num, v, eps):
    kv = fk_num.transpose(-1, -2) @ v  # [B, H, M, Dv]
    den = fq @ fk.sum(-2).unsqueeze(-1)  # [B, H, Lq, 1]
    return (fq_num @ kv) / (den + eps)


def _causal(fq, fk, fq_num, fk_num, v, eps, chunk_size, kv0=None, z0=None):
    """Chunked causal form from an initial state; returns (out [B, H, L, Dv], kv_final, z_final)."""
    b, h, length, m = fq.shape
    dv = v.shape[-1]
    z = fk.cumsum(-2)
    if z0 is not None:
        z = z + z0[:, :, None]
    den = (fq * z).sum(-1, keepdim=True)  # [B, H, L, 1]

    size = max(1, min(chunk_size, length))
    n = -(-length // size)
    pad = n * size - length

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, X] -> [B, H, n, size, X]
        return F.pad(x, (0, 0, 0, pad)).reshape(b, h, n, size, x.shape[-1])

    qc, kc, vc = blocks(fq_num), blocks(fk_num), blocks(v)
    kv_chunk = kc.transpose(-1, -2) @ vc  # [B, H, n, M, Dv]
    kv_incl = kv_chunk.cumsum(2)
    kv_before = torch.cat([torch.zeros_like(kv_incl[:, :, :1]), kv_incl[:, :, :-1]], dim=2)
    if kv0 is not None:
        kv_before = kv_before + kv0[:, :, None]
        kv_final = kv_incl[:, :, -1] + kv0
    else:
        kv_final = kv_incl[:, :, -1]
    tri = torch.ones(size, size, dtype=torch.bool, device=fq.device).tril()
    inside = (qc @ kc.transpose(-1, -2)).masked_fill(~tri, 0.0)  # [B, H, n, size, size]
    num = inside @ vc + qc @ kv_before
    num = num.reshape(b, h, n * size, dv)[:, :, :length]
    return num / (den + eps), kv_final, z[:, :, -1]


def _implied_weights(fq, fk, fq_num, fk_num, causal, eps):
    """The N x N matrix the output applies to V: rotated numerator over the unrotated normaliser."""
    num = fq_num @ fk_num.transpose(-1, -2)
    den = num if fq_num is fq and fk_num is fk else fq @ fk.transpose(-1, -2)
    if causal:
        lq, lk = num.shape[-2:]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=num.device).tril(lk - lq)
        num, den = num.masked_fill(~allowed, 0.0), den.masked_fill(~allowed, 0.0)
    return num / (den.sum(-1, keepdim=True) + eps)


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    feature_map: str | FeatureMap = "elu",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    output_attentions: bool = False,
    chunk_size: int = 64,
    *,
    rotary: Rotary | None = None,
    rotary_keys: Rotary | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention over whole sequences, bidirectional or causal (chunked), in O(N M Dv).

    query [B, H, Lq, D], key [B, H, Lk, D], value [B, H, Lk, Dv]; ``key_padding_mask`` bool [B, Lk]
    (True = real token). ``causal`` needs Lq == Lk (continue a sequence with
    :func:`linear_attention_step`). ``rotary=(cos, sin)`` [B|1, L, M] applies RoFormer's linear RoPE
    (``rotary_keys`` for keys at other positions; defaults to ``rotary``). ``output_attentions`` also
    returns the implied weights [B, H, Lq, Lk], built explicitly (O(N^2)). Returns
    (out [B, Lq, H, Dv], weights or None).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if causal and query.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"causal linear attention over whole sequences needs as many queries as keys, got "
            f"{query.shape[-2]} and {key.shape[-2]}; continue a sequence with linear_attention_step"
        )
    fmap = get_feature_map(feature_map)
    fq, fk, fq_num, fk_num = _features(query, key, fmap, key_padding_mask, rotary, rotary_keys)
    v = value.to(fq.dtype)
    if causal:
        out, _, _ = _causal(fq, fk, fq_num, fk_num, v, eps, chunk_size)
    else:
        out = _bidirectional(fq, fk, fq_num, fk_num, v, eps)
    weights = _implied_weights(fq, fk, fq_num, fk_num, causal, eps).to(value.dtype) if output_attentions else None
    return out.transpose(1, 2).to(value.dtype).contiguous(), weights


def linear_attention_step(
    state: LinearAttentionState | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    feature_map: str | FeatureMap = "elu",
    key_padding_mask: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    rotary: Rotary | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Continue a causal linear attention by L >= 1 tokens (causal among themselves): (out, new_state).

    Equal to the causal parallel form over all tokens so far, for the new queries. ``state`` None
    starts a sequence. ``key_padding_mask`` bool is [B, L] for the new tokens or the model's full
    [B, past + L] mask (its last L columns are used). ``rotary`` is (cos, sin) of the new tokens'
    positions. The state is not modified; the new one is float32 for half-precision inputs.
    """
    b, h, length, d = key.shape
    if length < 1 or query.shape[-2] != length:
        raise ValueError(f"a step takes L >= 1 new tokens, as many queries as keys; got {query.shape[-2]}, {length}")
    fmap = get_feature_map(feature_map)
    past = 0 if state is None else state.num_tokens
    if key_padding_mask is not None and key_padding_mask.shape[-1] == past + length != length:
        key_padding_mask = key_padding_mask[:, -length:]
    fq, fk, fq_num, fk_num = _features(query, key, fmap, key_padding_mask, rotary, None)
    v = value.to(fq.dtype)
    kv0 = z0 = None
    if state is not None:
        expected = (b, h, fk.shape[-1], v.shape[-1])
        if tuple(state.kv.shape) != expected:
            raise ValueError(f"state kv is {tuple(state.kv.shape)}, these tokens need {expected}")
        kv0, z0 = state.kv.to(fq.dtype), state.z.to(fq.dtype)
    out, kv, z = _causal(fq, fk, fq_num, fk_num, v, eps, chunk_size, kv0, z0)
    return out.transpose(1, 2).to(value.dtype).contiguous(), LinearAttentionState(kv, z, past + length)


# --------------------------------------------------------------------------------------------
# transformers cache integration
# --------------------------------------------------------------------------------------------
class LinearAttentionCacheLayer(CacheLayerMixin):
    """One decoder layer's slot in a transformers ``Cache``: a constant-size state instead of keys/values.

    See the module docstring for why it is a ``CacheLayerMixin`` and what each method must report.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: LinearAttentionState | None = None
        self.device: torch.device | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.get_seq_length()})"

    def step(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        feature_map: str | FeatureMap = "elu",
        key_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """:func:`linear_attention_step` from this layer's state, which it then replaces; returns out."""
        out, self.state = linear_attention_step(self.state, query, key, value, feature_map, key_padding_mask, **kwargs)
        self.device, self.is_initialized = self.state.kv.device, True
        return out

    # -- CacheLayerMixin ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: the state's shape depends on the feature map."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise TypeError(
            "this cache layer holds a linear-attention state, not keys and values: use "
            "LinearAttentionCacheLayer.step (or linear_attention_step) instead of Cache.update"
        )

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.is_initialized = None, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.get_seq_length() > 0:
            raise ValueError(
                "a linear-attention state is a running sum and cannot drop tokens (crop); regenerate from the "
                "prompt instead (this is why is_croppable is False)"
            )

    def offload(self) -> None:
        if self.state is not None:
            self.state.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.state is not None and self.device is not None and self.state.kv.device != self.device:
            self.state.to(self.device, non_blocking=True)


def linear_cache_layer(cache: Cache, layer_idx: int) -> LinearAttentionCacheLayer:
    """This layer's :class:`LinearAttentionCacheLayer` in ``cache``, installed on first use.

    Replaces the still-empty layer that ``DynamicCache`` created (or would lazily create) at
    ``layer_idx``; a layer that already holds keys cannot be converted and raises.
    """
    layers = cache.layers
    while len(layers) < layer_idx:  # earlier layers not reached yet: what the cache would have made
        layers.append((cache.layer_class_to_replicate or DynamicLayer)())
    if len(layers) == layer_idx:
        layers.append(LinearAttentionCacheLayer())
    layer = layers[layer_idx]
    if isinstance(layer, LinearAttentionCacheLayer):
        return layer
    if not isinstance(layer, CacheLayerMixin) or layer.is_initialized or layer.get_seq_length() > 0:
        raise ValueError(
            f"cache layer {layer_idx} is a {type(layer).__name__} already in use; a linear-attention layer needs "
            "its own slot (a fresh DynamicCache, or DynamicCache(config=...) without layer_types for it)"
        )
    layers[layer_idx] = LinearAttentionCacheLayer()
    return layers[layer_idx]



from .scores_hf_attention import AttentionScore, register_attention_score  # noqa: E402  (the class below)


@register_attention_score
class LinearScore(AttentionScore):
    """Linear attention (Katharopoulos et al., 2020), phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1), in O(N d^2).

    `config.linear_feature_map` picks phi (`FEATURE_MAPS`). Bidirectional in encoders and cross-attention, causal
    by chunked prefix sums in decoders; generation keeps a constant-size recurrent state in the cache instead of
    keys and values. RoPE is RoFormer's linear form (rotated features in the numerator only). It has no score
    matrix, so score-bias positions and sparse patterns are refused; `output_attentions` returns the implied
    N x N weights (not available during cached decoding: past keys are not kept).
    """

    name = "linear"
    takes_score_bias = False
    takes_sparse_pattern = False
    keeps_kv_cache = False
    rotates_itself = True
    weights_sum_to_one = False  # with RoPE the rotated numerator over the unrotated denominator (RoFormer)

    def __init__(self, config):
        super().__init__(config)
        self.feature_map = get_feature_map(config.linear_feature_map)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.linear_feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear_feature_map={config.linear_feature_map!r} is not valid; choose one of "
                             f"{', '.join(map(repr, FEATURE_MAPS))}.")

    def forward(self, attention, query, key, value, inputs, dropout=0.0, output_attentions=False, cache=None,
                **kwargs):
        rotary = None if attention.is_cross_attention else inputs.rotary
        if cache is not None and not attention.is_cross_attention:
            if output_attentions:
                raise ValueError("attention_type='linear' keeps no past keys in its cache, so it cannot return "
                                 "attention weights during cached decoding; run the full sequence without a cache.")
            out = linear_cache_layer(cache, attention.layer_idx).step(
                query, key, value, self.feature_map, key_padding_mask=inputs.key_padding_mask, rotary=rotary,
            )
            return out, None
        return linear_attention(
            query, key, value, self.feature_map, causal=inputs.causal and not attention.is_cross_attention,
            key_padding_mask=inputs.key_padding_mask, output_attentions=output_attentions, rotary=rotary,
        )
