"""Positional encodings against independent references: the formulas and transformers' own models."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.t5.modeling_t5 import T5Attention

from hf_attention.positions_hf_attention import (
    AlibiBias,
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
    sinusoidal_embedding,
)


def test_sinusoidal_matches_vaswani_formula():
    d = 10
    positions = torch.tensor([[0, 1, 5, 77, 1000]])
    table = sinusoidal_embedding(positions, d)
    for p_idx, pos in enumerate(positions[0].tolist()):
        for i in range(d // 2):
            angle = pos / (10000 ** (2 * i / d))
            assert table[0, p_idx, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[0, p_idx, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_llama(theta):
    head_dim, heads = 16, 3
    config = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    llama_rope = LlamaRotaryEmbedding(config)
    position_ids = torch.tensor([[0, 1, 2, 7, 300], [5, 6, 7, 8, 9]])
    q, k = torch.randn(2, heads, 5, head_dim), torch.randn(2, heads, 5, head_dim)
    cos_ref, sin_ref = llama_rope(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = RotaryEmbedding(head_dim, theta)(position_ids)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 4, 8, 12, 16])
def test_alibi_matches_bloom(num_heads):
    seq = 6
    mask = torch.ones(1, seq, dtype=torch.long)
    bloom = build_alibi_tensor(mask, num_heads, torch.float32).view(num_heads, seq)  # slope_h * key_pos
    slopes = bloom[:, 1]  # key position 1 -> the slope itself
    torch.testing.assert_close(alibi_slopes(num_heads), slopes)
    # Under a causal mask BLOOM's slope * j and ours -slope * |i - j| differ by a per-row constant.
    rel = torch.arange(seq)[None, :] - torch.arange(seq)[:, None]
    ours = AlibiBias(num_heads)(rel)  # [H, Lq, Lk]
    causal = rel <= 0
    for i in range(seq):
        diff = (ours[:, i] - bloom)[:, causal[i]]
        torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))
        probs_ours = torch.softmax(ours[:, i].masked_fill(~causal[i], -1e9), -1)
        probs_bloom = torch.softmax(bloom.masked_fill(~causal[i], -1e9), -1)
        torch.testing.assert_close(probs_ours, probs_bloom)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_buckets_match_t5(bidirectional, buckets, max_distance):
    rel = torch.arange(-300, 301)[None, :]
    ours = relative_position_bucket(rel, bidirectional, buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional, buckets, max_distance)
    torch.testing.assert_close(ours, ref)


def test_relative_bias_shape_and_lookup():
    bias = RelativePositionBias(num_heads=3, num_buckets=8, max_distance=16)
    rel = torch.tensor([[0, 1, -1, 40]])
    out = bias(rel)
    assert out.shape == (3, 1, 4)
    buckets = relative_position_bucket(rel, True, 8, 16)
    torch.testing.assert_close(out[:, 0, 3], bias.relative_attention_bias.weight[buckets[0, 3]])


def test_learned_table_overflow_is_a_clear_error():
    table = LearnedPositionalEmbedding(8, 4)
    with pytest.raises(ValueError, match="outside the learned position table of size 8"):
        table(torch.arange(9)[None])
