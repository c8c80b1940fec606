"""Linear attention against the O(N^2) formula written out here.

The reference builds the explicit ``phi(Q) phi(K)^T`` matrix, masks it (padding, causality), and
normalises each row; feature maps and the rotary rotation are re-implemented here too, so a wrong
formula in the module cannot make both sides agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from dispatch_helpers import LargestOutput
from transformers import GenerationMixin, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_attention.attention_linear import (
    FEATURE_MAPS,
    LinearAttentionCacheLayer,
    LinearAttentionState,
    PerformerFeatureMap,
    get_feature_map,
    linear_attention,
    linear_attention_step,
    linear_cache_layer,
)
from hf_attention.cache_names import cache_field, output_cache

F64 = torch.float64
EPS = 1e-6


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------
def phi(name, x):
    if name == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    if name == "relu":
        return x.clamp(min=0)
    raise KeyError(name)


def rope_tables(positions, dim, theta=10000.0):
    """positions [B, L] -> cos, sin [B, L, dim] in the rotate-half layout (frequency i in slots i and i + dim/2)."""
    inv = theta ** (-torch.arange(0, dim, 2, dtype=F64) / dim)
    ang = positions.to(F64)[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def naive(q, k, v, fmap="elu", causal=False, mask=None, rotary=None, feats=None):
    """(out [B, Lq, H, Dv], weights [B, H, Lq, Lk]); causal aligns the last query with the last key."""
    fq, fk = feats if feats is not None else (phi(fmap, q), phi(fmap, k))
    den = fq @ fk.transpose(-1, -2)
    num = den if rotary is None else rotate(fq, *rotary) @ rotate(fk, *rotary).transpose(-1, -2)
    lq, lk = den.shape[-2:]
    allowed = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq)
    num, den = num * allowed, den * allowed
    weights = num / (den.sum(-1, keepdim=True) + EPS)
    return (weights @ v).transpose(1, 2), weights


def make(b=2, h=3, lq=9, lk=None, d=8, dv=5, dtype=F64, grad=False):
    lk = lq if lk is None else lk

    def p(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    return p(b, h, lq, d), p(b, h, lk, d), p(b, h, lk, dv)


def padding(lengths, length, side="right"):
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = True
        else:
            mask[i, length - n :] = True
    return mask


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **kw)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_registry():
    assert {"elu", "relu", "performer"} <= set(FEATURE_MAPS)
    assert get_feature_map("elu") is get_feature_map("elu")
    fm = PerformerFeatureMap(num_features=12)
    assert get_feature_map(fm) is fm
    assert get_feature_map("performer", num_features=7).feature_dim(4) == 7
    with pytest.raises(ValueError, match="unknown feature map"):
        get_feature_map("softmax")
    x = torch.randn(2, 3, 4, 8, dtype=F64)
    for name in ("elu", "relu"):
        close(get_feature_map(name)(x, is_query=True), phi(name, x))


# --------------------------------------------------------------------------------------------
# bidirectional
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmap", ["elu", "relu"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lk", [9, 4])
def test_bidirectional_matches_naive(fmap, masked, lk):
    q, k, v = make(lq=9, lk=lk)
    mask = padding([lk, lk - 2], lk) if masked else None
    out, weights = linear_attention(q, k, v, fmap, key_padding_mask=mask, output_attentions=True)
    ref_out, ref_w = naive(q, k, v, fmap, mask=mask)
    assert out.shape == (2, 9, 3, 5) and weights.shape == (2, 3, 9, lk)
    close(out, ref_out)
    close(weights, ref_w)
    if masked:
        assert torch.all(weights[1, ..., lk - 2 :] == 0)


def test_performer_matches_naive_of_its_own_features():
    q, k, v = make(d=8)
    fm = PerformerFeatureMap(num_features=16, seed=3)
    mask = padding([9, 6], 9)
    feats = (fm(q, is_query=True), fm(k, is_query=False))
    for causal in (False, True):
        out, _ = linear_attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=4)
        close(out, naive(q, k, v, causal=causal, mask=mask, feats=feats)[0])


def test_performer_approximates_softmax_attention():
    """FAVOR+ with many features: phi(q).phi(k) ~ exp(q.k / sqrt(d)), so the output ~ softmax attention."""
    torch.manual_seed(0)
    d = 8
    q, k, v = make(b=1, h=2, lq=12, d=d)
    q, k = q * 0.5, k * 0.5
    exact = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v).transpose(1, 2)
    errors = []
    for m in (64, 8192):
        out, _ = linear_attention(q, k, v, PerformerFeatureMap(num_features=m, seed=1))
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.03 and errors[1] < errors[0], errors
    # the kernel itself: mean of phi(q).phi(k) over features is exp(q.k/sqrt(d))
    fm = PerformerFeatureMap(num_features=16384, seed=2)
    x, y = torch.randn(2, d, dtype=F64) * 0.5
    approx = (fm(x[None], is_query=False) * fm(y[None], is_query=False)).sum()
    close(approx, torch.exp(x @ y / math.sqrt(d)), rtol=0.03, atol=0)


def test_performer_projection_is_seed_determined():
    x = torch.randn(1, 1, 4, 8, dtype=F64)
    a = PerformerFeatureMap(num_features=20, seed=5)
    b = PerformerFeatureMap(num_features=20, seed=5)
    c = PerformerFeatureMap(num_features=20, seed=6)
    close(a(x, is_query=False), b(x, is_query=False))
    assert not torch.allclose(a(x, is_query=False), c(x, is_query=False))
    close(a.projection(8, torch.device("cpu"), torch.float32), b.projection(8, torch.device("cpu"), F64).float())
    w = PerformerFeatureMap(num_features=8, seed=0).projection(8, torch.device("cpu"), F64)
    gram = w @ w.T  # one orthogonal block: rows orthogonal
    close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(8, 8, dtype=F64), atol=1e-10, rtol=0)


def test_performer_refuses_rotary():
    q, k, v = make(d=8)
    cos, sin = rope_tables(torch.arange(9)[None], 8)
    with pytest.raises(ValueError, match="RoPE needs"):
        linear_attention(q, k, v, PerformerFeatureMap(num_features=16), rotary=(cos, sin))


# --------------------------------------------------------------------------------------------
# causal
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmap", ["elu", "relu"])
@pytest.mark.parametrize("length,chunk", [(1, 4), (5, 4), (16, 4), (17, 4), (63, 16), (70, 64), (9, 64)])
def test_causal_chunked_matches_naive(fmap, length, chunk):
    q, k, v = make(b=1, h=2, lq=length)
    out, weights = linear_attention(q, k, v, fmap, causal=True, chunk_size=chunk, output_attentions=True)
    ref_out, ref_w = naive(q, k, v, fmap, causal=True)
    close(out, ref_out)
    close(weights, ref_w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(causal, side):
    lengths, length = [11, 6, 3], 11
    q, k, v = make(b=3, lq=length)
    mask = padding(lengths, length, side)
    out, _ = linear_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=4)
    close(out, naive(q, k, v, causal=causal, mask=mask)[0])
    for i, n in enumerate(lengths):
        keep = mask[i]
        assert int(keep.sum()) == n
        alone, _ = linear_attention(q[i : i + 1, :, keep], k[i : i + 1, :, keep], v[i : i + 1, :, keep],
                                    causal=causal, chunk_size=4)
        close(out[i : i + 1, keep], alone)
        assert torch.isfinite(out[i]).all()


def test_causal_needs_as_many_queries_as_keys():
    q, k, v = make(lq=3, lk=5)
    with pytest.raises(ValueError, match="linear_attention_step"):
        linear_attention(q, k, v, causal=True)


# --------------------------------------------------------------------------------------------
# RoPE (RoFormer's linear form: rotated numerator, unrotated denominator)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_matches_naive(causal):
    q, k, v = make(lq=13)
    positions = torch.stack([torch.arange(13), torch.arange(13) + 4])
    rotary = rope_tables(positions, 8)
    mask = padding([13, 10], 13, "left")
    out, weights = linear_attention(q, k, v, causal=causal, key_padding_mask=mask, rotary=rotary,
                                    chunk_size=4, output_attentions=True)
    ref_out, ref_w = naive(q, k, v, causal=causal, mask=mask, rotary=rotary)
    close(out, ref_out)
    close(weights, ref_w)
    close((weights @ v).transpose(1, 2), out)  # the implied weights are what multiplies V
    plain, _ = linear_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=4)
    assert not torch.allclose(out, plain)


def test_rotary_is_relative():
    """Shifting every position by the same amount leaves the output unchanged (R_i^T R_j = R_(j-i))."""
    q, k, v = make(lq=7)
    a, _ = linear_attention(q, k, v, causal=True, rotary=rope_tables(torch.arange(7)[None], 8))
    b, _ = linear_attention(q, k, v, causal=True, rotary=rope_tables(torch.arange(7)[None] + 100, 8))
    close(a, b)


def test_rotary_keys_for_cross_lengths():
    q, k, v = make(lq=4, lk=6)
    rq, rk = rope_tables(torch.arange(2, 6)[None], 8), rope_tables(torch.arange(6)[None], 8)
    out, _ = linear_attention(q, k, v, rotary=rq, rotary_keys=rk)
    fq, fk = phi("elu", q), phi("elu", k)
    num = rotate(fq, *rq) @ rotate(fk, *rk).transpose(-1, -2)
    ref = (num / ((fq @ fk.transpose(-1, -2)).sum(-1, keepdim=True) + EPS)) @ v
    close(out, ref.transpose(1, 2))


# --------------------------------------------------------------------------------------------
# implied weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap", ["elu", "relu", "performer"])
def test_implied_weights_rows_sum_to_one(causal, fmap):
    q, k, v = make(lq=10)
    mask = padding([10, 7], 10, "left")
    # eps keeps 0/0 finite and makes a row sum den / (den + eps): below 1, and 1 as eps -> 0
    out, weights = linear_attention(q, k, v, fmap, causal=causal, key_padding_mask=mask, output_attentions=True)
    assert torch.all(weights.sum(-1) <= 1)
    close((weights @ v).transpose(1, 2), out)
    out, weights = linear_attention(q, k, v, fmap, causal=causal, key_padding_mask=mask, output_attentions=True,
                                    eps=1e-14)
    sums = weights.sum(-1)
    if causal:  # the left-padding queries of row 1 see no real key yet
        close(sums[1, :, :3], torch.zeros_like(sums[1, :, :3]))
        sums = torch.cat([sums[0].flatten(), sums[1, :, 3:].flatten()])
    nonzero = sums != 0  # relu: a query orthogonal to all keys has no mass
    assert nonzero.float().mean() > 0.5
    close(sums[nonzero], torch.ones_like(sums[nonzero]), atol=1e-9, rtol=0)
    assert torch.all(weights[1, ..., :3] == 0)
    if causal:
        assert torch.all(weights.triu(1) == 0)


# --------------------------------------------------------------------------------------------
# recurrent generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmap", ["elu", "relu", "performer"])
@pytest.mark.parametrize("splits", [[1] * 9, [4, 1, 1, 3], [9], [2, 7]])
def test_steps_equal_parallel(fmap, splits):
    q, k, v = make(lq=9)
    parallel, _ = linear_attention(q, k, v, fmap, causal=True, chunk_size=4)
    state, outs, start = None, [], 0
    for n in splits:
        sl = slice(start, start + n)
        out, new_state = linear_attention_step(state, q[:, :, sl], k[:, :, sl], v[:, :, sl], fmap, chunk_size=2)
        if state is not None:
            assert state.num_tokens == start  # the old state is left as it was
        state, start = new_state, start + n
        outs.append(out)
    assert state.num_tokens == 9
    close(torch.cat(outs, dim=1), parallel)
    fm = get_feature_map(fmap)
    feats = (fm(q, is_query=True), fm(k, is_query=False)) if fmap == "performer" else None
    close(torch.cat(outs, dim=1), naive(q, k, v, fmap, causal=True, feats=feats)[0])


def test_steps_with_padding_and_rotary_equal_naive():
    """Left-padded prompt, then one token at a time, positions from the real tokens (as generate())."""
    b, length, prompt = 2, 10, 6
    q, k, v = make(b=b, lq=length)
    mask = padding([length, length - 2], length, "left")
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope_tables(positions, 8)
    ref = naive(q, k, v, causal=True, mask=mask, rotary=(cos, sin))[0]
    out, state = linear_attention_step(None, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt],
                                       key_padding_mask=mask[:, :prompt],
                                       rotary=(cos[:, :prompt], sin[:, :prompt]))
    outs = [out]
    for t in range(prompt, length):
        sl = slice(t, t + 1)
        # the model's full [B, past + 1] mask: the step keeps its last column
        out, state = linear_attention_step(state, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                           key_padding_mask=mask[:, : t + 1], rotary=(cos[:, sl], sin[:, sl]))
        outs.append(out)
    close(torch.cat(outs, dim=1), ref)


def test_state_reorder_follows_beams():
    """Reordering the state then stepping == running the reordered sequences from scratch."""
    q, k, v = make(b=3, lq=7)
    _, state = linear_attention_step(None, q[:, :, :5], k[:, :, :5], v[:, :, :5])
    beam_idx = torch.tensor([2, 2, 0])
    state.reorder(beam_idx)
    assert state.batch_size == 3 and state.num_tokens == 5
    # new tokens for the (reordered) beams
    qn, kn, vn = make(b=3, lq=2)
    out, _ = linear_attention_step(state, qn, kn, vn)
    full = [torch.cat([t[beam_idx, :, :5], n], dim=2) for t, n in ((q, qn), (k, kn), (v, vn))]
    ref, _ = linear_attention(*full, causal=True)
    close(out, ref[:, 5:])
    # batch selection and repetition
    kv = state.kv.clone()
    state.select(torch.tensor([1, 2]))
    close(state.kv, kv[[1, 2]])
    state.repeat_interleave(2)
    close(state.kv, kv[[1, 1, 2, 2]])
    assert state.z.shape == (4, 3, 8)


def test_step_rejects_mismatched_state():
    q, k, v = make(b=2, lq=3)
    state = LinearAttentionState.zeros(2, 3, 8, 4, dtype=F64)
    with pytest.raises(ValueError, match="state kv"):
        linear_attention_step(state, q, k, v)
    zero_state = LinearAttentionState.zeros(2, 3, 8, 5, dtype=F64)
    close(linear_attention_step(zero_state, q, k, v)[0], linear_attention(q, k, v, causal=True)[0])


# --------------------------------------------------------------------------------------------
# transformers cache integration
# --------------------------------------------------------------------------------------------
def test_cache_layer_in_dynamic_cache():
    q, k, v = make(b=3, lq=6)
    cache = DynamicCache()
    assert cache.get_seq_length() == 0
    layers = [linear_cache_layer(cache, i) for i in range(2)]
    assert all(isinstance(layer, LinearAttentionCacheLayer) for layer in layers)
    assert linear_cache_layer(cache, 1) is layers[1]
    prompt = [layer.step(q[:, :, :4], k[:, :, :4], v[:, :, :4]) for layer in layers]
    assert cache.get_seq_length() == 4 and cache.get_mask_sizes(1, 0) == (5, 0)
    assert not cache.is_croppable and not any(cache.is_linear)
    close(prompt[0], linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], causal=True)[0])

    beam_idx = torch.tensor([1, 0, 0])
    cache.reorder_cache(beam_idx)
    out = layers[0].step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:])
    full = [torch.cat([t[beam_idx, :, :4], t[:, :, 4:]], dim=2) for t in (q, k, v)]
    close(out, linear_attention(*full, causal=True)[0][:, 4:])
    assert cache.get_seq_length() == 6

    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.batch_repeat_interleave(2)
    assert layers[1].state.kv.shape[0] == 4 and layers[0].state.z.shape[0] == 4
    with pytest.raises(ValueError, match="cannot drop tokens"):
        cache.crop(-1)
    with pytest.raises(TypeError, match="not keys and values"):
        cache.update(k, v, 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and layers[0].state is None


def test_cache_layer_replaces_fresh_config_layers_only():
    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=8,
                         vocab_size=10)
    cache = DynamicCache(config=config)
    assert len(cache.layers) == 3 and isinstance(cache.layers[1], DynamicLayer)
    q, k, v = make(b=1, h=2, lq=3)
    cache.update(k, v, 0)  # layer 0 is a dense layer in this (hybrid) model
    layer = linear_cache_layer(cache, 1)
    assert isinstance(cache.layers[1], LinearAttentionCacheLayer) and isinstance(cache.layers[0], DynamicLayer)
    layer.step(q, k, v)
    assert cache.get_seq_length() == 3 == cache.get_seq_length(1)
    cache.reorder_cache(torch.tensor([0]))  # dense and linear layers together
    with pytest.raises(ValueError, match="already in use"):
        linear_cache_layer(cache, 0)


def test_linear_only_cache_reports_length_from_layer_zero():
    cache = DynamicCache()
    linear_cache_layer(cache, 2)  # layers 0 and 1 do not exist yet: placeholders, then ours
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, DynamicLayer, LinearAttentionCacheLayer]
    cache = DynamicCache()
    q, k, v = make(b=2, lq=5)
    linear_cache_layer(cache, 0).step(q, k, v)
    assert cache.get_seq_length() == 5


# --------------------------------------------------------------------------------------------
# gradients, precision, memory
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_rotary", [False, True])
def test_gradients_equal_naive(causal, use_rotary):
    q, k, v = make(lq=11, grad=True)
    mask = padding([11, 8], 11, "left")
    rotary = rope_tables(torch.arange(11)[None].expand(2, -1), 8) if use_rotary else None
    g = torch.randn(2, 11, 3, 5, dtype=F64)
    got = torch.autograd.grad(
        linear_attention(q, k, v, causal=causal, key_padding_mask=mask, rotary=rotary, chunk_size=4)[0], (q, k, v), g
    )
    ref = torch.autograd.grad(naive(q, k, v, causal=causal, mask=mask, rotary=rotary)[0], (q, k, v), g)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        close(a, b)


@pytest.mark.parametrize("fmap", ["elu", "performer"])
def test_gradcheck(fmap):
    q, k, v = make(b=1, h=1, lq=5, d=4, dv=2, grad=True)
    mask = padding([4], 5)
    fm = PerformerFeatureMap(num_features=6) if fmap == "performer" else fmap

    def fn(q, k, v):
        return linear_attention(q, k, v, fm, causal=True, key_padding_mask=mask, chunk_size=2)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_float32_gradients_finite_and_close():
    q, k, v = make(b=2, lq=100, dtype=torch.float32, grad=True)
    out, _ = linear_attention(q, k, v, "relu", causal=True)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = naive(q.double(), k.double(), v.double(), "relu", causal=True)[0]
    close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_half_precision_accumulates_in_float32():
    q, k, v = make(b=1, lq=300, dtype=torch.float32)
    out, state = linear_attention_step(None, q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    ref = naive(*[t.bfloat16().double() for t in (q, k, v)], causal=True)[0]
    close(out.double(), ref, atol=2e-2, rtol=2e-2)


_LargestOutput = LargestOutput


@pytest.mark.parametrize("causal", [False, True])
def test_no_quadratic_tensor(causal):
    n = 512
    q, k, v = make(b=1, h=1, lq=n, d=16, dv=16, dtype=torch.float32, grad=True)
    with _LargestOutput() as mode:
        out, _ = linear_attention(q, k, v, causal=causal, key_padding_mask=padding([400], n), chunk_size=32)
        out.sum().backward()
    assert mode.largest <= n * 32 < n * n // 8


# --------------------------------------------------------------------------------------------
# generate(): the cache layer carries the state through greedy and beam search
# --------------------------------------------------------------------------------------------
class _TinyConfig(PretrainedConfig):
    model_type = "tiny_linear_attention_test"

    def __init__(self, vocab_size=13, hidden_size=8, num_attention_heads=2, num_hidden_layers=2, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_attention_heads, self.num_hidden_layers = num_attention_heads, num_hidden_layers
        super().__init__(**kwargs)


class _TinyLinearLM(PreTrainedModel, GenerationMixin):
    """Two causal linear-attention layers with RoPE; positions from the padding mask, as our decoder."""

    config_class = _TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(config.hidden_size, 3 * config.hidden_size) for _ in range(config.num_hidden_layers)
        )
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, **kwargs):
        b, n = input_ids.shape
        h, d = self.config.num_attention_heads, self.config.hidden_size // self.config.num_attention_heads
        past = cache.get_seq_length() if cache is not None else 0
        mask = attention_mask.bool() if attention_mask is not None else torch.ones(b, past + n, dtype=torch.bool)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        cos, sin = rope_tables(positions, d)
        x = self.embed(input_ids)
        for i, proj in enumerate(self.qkv):
            q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in proj(x).chunk(3, dim=-1))
            if use_cache and cache is not None:
                out = linear_cache_layer(cache, i).step(q, k, v, key_padding_mask=mask, rotary=(cos, sin))
            else:
                out, _ = linear_attention(q, k, v, causal=True, key_padding_mask=mask[:, -n:], rotary=(cos, sin))
            x = x + out.reshape(b, n, -1)
        return CausalLMOutputWithPast(logits=self.head(x), **cache_field(cache if use_cache else None))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_state_cache_equals_recompute(num_beams):
    torch.manual_seed(0)
    model = _TinyLinearLM(_TinyConfig()).double().eval()
    input_ids = torch.tensor([[0, 0, 5, 3, 7], [4, 2, 9, 1, 6]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, num_beams=num_beams,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids, use_cache=True, return_dict_in_generate=True, **kwargs)
        recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed)
    cache = output_cache(cached)
    assert isinstance(cache.layers[0], LinearAttentionCacheLayer)
    # the state is one token behind the sequence: the last generated token was never fed back
    assert cache.get_seq_length() == cached.sequences.shape[1] - 1
