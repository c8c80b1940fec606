"""Gaussian (Nadaraya-Watson) attention against the distance formula written out here.

The reference builds ``-||q - k||^2 / (2 sigma^2)`` with ``torch.cdist`` (and by explicit broadcasting),
independently of the dot-product rewrite under test.
"""

from __future__ import annotations

import pytest
import torch
from dispatch_helpers import LargestOutput

from hf_attention.attention_gaussian import gaussian_as_dot, gaussian_attention

F64 = torch.float64


def naive_scores(q, k, sigma):
    """-||q_i - k_j||^2 / (2 sigma_h^2), [B, H, Lq, Lk], by cdist."""
    sigma = torch.as_tensor(sigma, dtype=q.dtype).reshape(1, -1, 1, 1)
    return -torch.cdist(q, k).pow(2) / (2 * sigma**2)


def naive_attention(q, k, v, sigma, key_padding_mask=None, causal=False, float_mask=None):
    scores = naive_scores(q, k, sigma)
    lq, lk = q.shape[-2], k.shape[-2]
    if float_mask is not None:
        scores = scores + float_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if causal:  # the last query sees every key (bottom-right alignment, as cached decoding)
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2), probs


def make(b=2, h=3, lq=5, lk=7, d=6, dv=4, dtype=F64, grad=False):
    def p(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    sigma = (torch.rand(h, dtype=dtype) + 0.7).requires_grad_(grad)
    return p(b, h, lq, d), p(b, h, lk, d), p(b, h, lk, dv), sigma


def padding(b, lk, lengths):
    mask = torch.zeros(b, lk, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return mask


# --------------------------------------------------------------------------------------------
# the rewrite
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [5, 7, 8, 16])
def test_as_dot_is_exact_without_centering(d):
    q, k, _, sigma = make(d=d)
    qa, ka, scaling = gaussian_as_dot(q, k, sigma, center=False)
    assert scaling == 1.0
    assert qa.shape[-1] == ka.shape[-1] and qa.shape[-1] % 8 == 0 and qa.shape[-1] >= d + 1
    assert torch.all(qa[..., d + 1 :] == 0) and torch.all(ka[..., d + 1 :] == 0)
    # (q.k - ||k||^2 / 2) / sigma^2, written out by broadcasting
    s = sigma.reshape(1, -1, 1, 1)
    expected = (torch.einsum("bhid,bhjd->bhij", q, k) - 0.5 * (k * k).sum(-1)[:, :, None, :]) / s**2
    torch.testing.assert_close(qa @ ka.transpose(-1, -2), expected)


@pytest.mark.parametrize("center", [False, True])
def test_as_dot_differs_from_distance_by_a_per_query_constant(center):
    q, k, _, sigma = make()
    qa, ka, _ = gaussian_as_dot(q, k, sigma, center=center)
    diff = qa @ ka.transpose(-1, -2) - naive_scores(q, k, sigma)
    # explicit broadcasting form of the distance, too
    explicit = -((q[:, :, :, None, :] - k[:, :, None, :, :]) ** 2).sum(-1) / (2 * sigma.reshape(1, -1, 1, 1) ** 2)
    torch.testing.assert_close(naive_scores(q, k, sigma), explicit)
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff))


def test_sigma_shapes():
    q, k, v, _ = make(h=2)
    out_scalar, _ = gaussian_attention(q, k, v, 1.3)
    out_heads, _ = gaussian_attention(q, k, v, torch.tensor([1.3, 1.3], dtype=F64))
    torch.testing.assert_close(out_scalar, out_heads)
    torch.testing.assert_close(out_scalar, naive_attention(q, k, v, torch.tensor([1.3, 1.3], dtype=F64))[0])
    with pytest.raises(ValueError, match="one value per head"):
        gaussian_attention(q, k, v, torch.ones(3, dtype=F64))


# --------------------------------------------------------------------------------------------
# attention against the naive formula
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("center", [False, True])
def test_matches_naive(kernel, masked, center):
    q, k, v, sigma = make()
    mask = padding(2, 7, [7, 4]) if masked else None
    out, weights = gaussian_attention(
        q, k, v, sigma, kernel=kernel, key_padding_mask=mask, output_attentions=kernel == "eager", center=center
    )
    ref_out, ref_probs = naive_attention(q, k, v, sigma, key_padding_mask=mask)
    assert out.shape == (2, 5, 3, 4)
    torch.testing.assert_close(out, ref_out)
    if kernel == "eager":
        torch.testing.assert_close(weights, ref_probs)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
        if masked:
            assert torch.all(weights[1, ..., 4:] == 0)
    else:
        assert weights is None


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_float_mask_and_padding_together(kernel):
    q, k, v, sigma = make()
    float_mask = torch.zeros(2, 1, 5, 7, dtype=F64)
    float_mask[:, :, :, 1] = torch.finfo(F64).min  # key 1 hidden from every query
    float_mask[0, :, 2, 3] = -0.7  # and a finite bias, too
    pad = padding(2, 7, [6, 5])
    out, _ = gaussian_attention(q, k, v, sigma, attention_mask=float_mask, key_padding_mask=pad, kernel=kernel)
    ref = naive_attention(q, k, v, sigma, key_padding_mask=pad, float_mask=float_mask.clamp(min=-1e30))[0]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("lq", [7, 3, 1])
def test_causal_bottom_right(kernel, lq):
    q, k, v, sigma = make(lq=lq, lk=7)
    out, _ = gaussian_attention(q, k, v, sigma, kernel=kernel, is_causal=True)
    torch.testing.assert_close(out, naive_attention(q, k, v, sigma, causal=True)[0])
    pad = padding(2, 7, [7, 6])
    out, _ = gaussian_attention(q, k, v, sigma, kernel=kernel, is_causal=True, key_padding_mask=pad)
    torch.testing.assert_close(out, naive_attention(q, k, v, sigma, causal=True, key_padding_mask=pad)[0])


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(kernel, side):
    torch.manual_seed(3)
    lengths, lk = [7, 4], 7
    q, k, v, sigma = make(lq=lk, lk=lk)
    mask = padding(2, lk, lengths)
    if side == "left":
        mask = mask.flip(-1)
    out, _ = gaussian_attention(q, k, v, sigma, kernel=kernel, key_padding_mask=mask)
    for i, n in enumerate(lengths):
        keep = mask[i]
        assert int(keep.sum()) == n
        alone, _ = gaussian_attention(q[i : i + 1], k[i : i + 1, :, keep], v[i : i + 1, :, keep], sigma, kernel=kernel)
        torch.testing.assert_close(out[i : i + 1], alone)


def test_fully_masked_row_is_finite():
    q, k, v, sigma = make()
    mask = padding(2, 7, [7, 0])
    for kernel in ("sdpa", "eager"):
        out, _ = gaussian_attention(q.float(), k.float(), v.float(), sigma.float(), kernel=kernel,
                                    key_padding_mask=mask)
        assert torch.isfinite(out).all(), kernel


def test_value_head_dim_is_free_and_pad_value_agrees():
    q, k, v, sigma = make(d=6, dv=11)
    ref = naive_attention(q, k, v, sigma)[0]
    plain, _ = gaussian_attention(q, k, v, sigma, pad_value=False)
    padded, _ = gaussian_attention(q, k, v, sigma, pad_value=True)
    assert plain.shape[-1] == padded.shape[-1] == 11
    torch.testing.assert_close(plain, ref)
    torch.testing.assert_close(padded, ref)


@pytest.mark.parametrize("masked", [False, True])
def test_eager_equals_sdpa_float32(masked):
    q, k, v, sigma = make(b=2, h=4, lq=33, lk=33, d=16, dv=16, dtype=torch.float32)
    mask = padding(2, 33, [33, 20]) if masked else None
    a, _ = gaussian_attention(q, k, v, sigma, kernel="eager", key_padding_mask=mask)
    b, _ = gaussian_attention(q, k, v, sigma, kernel="sdpa", key_padding_mask=mask)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_dropout_only_in_training():
    q, k, v, sigma = make(dtype=torch.float32)
    base, _ = gaussian_attention(q, k, v, sigma)
    same, _ = gaussian_attention(q, k, v, sigma, dropout=0.5, training=False)
    torch.testing.assert_close(base, same)
    for kernel in ("sdpa", "eager"):
        dropped, _ = gaussian_attention(q, k, v, sigma, dropout=0.5, training=True, kernel=kernel)
        assert not torch.allclose(base, dropped)


def test_centering_helps_half_precision():
    """Keys far from the origin: ||k||^2/2 dominates q.k and its rounding swamps bfloat16 scores."""
    torch.manual_seed(1)
    q, k, v, sigma = make(b=1, h=2, lq=16, lk=16, d=16, dv=8)
    low = [t.bfloat16() for t in (q + 6.0, k + 6.0, v, sigma)]
    ref = naive_attention(*[t.double() for t in low])[0]  # the same rounded inputs, exact arithmetic
    for kernel in ("sdpa", "eager"):
        errors = {
            center: (gaussian_attention(*low, center=center, kernel=kernel)[0].double() - ref).abs().max().item()
            for center in (False, True)
        }
        assert errors[True] < 0.06 and errors[True] < errors[False] / 5, (kernel, errors)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(kernel, masked):
    q, k, v, sigma = make(b=2, h=2, lq=3, lk=4, d=3, dv=2, grad=True)
    mask = padding(2, 4, [4, 2]) if masked else None

    def fn(q, k, v, sigma):
        return gaussian_attention(q, k, v, sigma, kernel=kernel, key_padding_mask=mask)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, sigma))


def test_gradients_equal_naive_including_sigma():
    q, k, v, sigma = make(grad=True)
    mask = padding(2, 7, [7, 5])
    g = torch.randn(2, 5, 3, 4, dtype=F64)
    got = torch.autograd.grad(gaussian_attention(q, k, v, sigma, key_padding_mask=mask)[0], (q, k, v, sigma), g)
    ref = torch.autograd.grad(naive_attention(q, k, v, sigma, key_padding_mask=mask)[0], (q, k, v, sigma), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert got[3].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# memory: nothing of size B x H x Lq x Lk x D
# --------------------------------------------------------------------------------------------
_LargestOutput = LargestOutput


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_never_builds_five_dimensional_tensor(kernel):
    b, h, n, d = 1, 2, 32, 16
    q, k, v, sigma = make(b=b, h=h, lq=n, lk=n, d=d, dv=d, dtype=torch.float32, grad=True)
    with _LargestOutput() as mode:
        out, _ = gaussian_attention(q, k, v, sigma, kernel=kernel, key_padding_mask=padding(1, n, [20]))
        out.sum().backward()
    assert mode.largest <= 2 * b * h * n * n < b * h * n * n * d
