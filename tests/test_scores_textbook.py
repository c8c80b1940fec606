"""The textbook scoring functions against their formulas written here: unscaled dot product, Nadaraya-Watson
(Gaussian kernel) attention, linear attention; in the models, generation and conversion."""

import math

import pytest
import test_modeling
import torch
from test_convert import minilm  # noqa: F401  (fixture)

import hf_attention as H
from hf_attention.attention_linear import LinearAttentionCacheLayer
from hf_attention.modeling_hf_attention import HfAttentionAttention
from hf_attention.scores_hf_attention import AttentionInputs


def _layer(attention_type: str, kernel: str, **overrides):
    config = test_modeling.tiny_config(attention_type=attention_type, attn_implementation=kernel, **overrides)
    torch.manual_seed(0)
    layer = HfAttentionAttention(config, 0).double().eval()
    H.HfAttentionModel(config)._init_weights(layer.score)
    return layer


def _qkv(length=11):
    torch.manual_seed(1)
    return (torch.randn(2, 4, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))


def _inputs(length=11):
    positions = torch.arange(length)[None]
    pad = torch.ones(2, length, dtype=torch.bool)
    pad[1, 8:] = False
    return AttentionInputs(positions, positions, pad), pad


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_dot_is_softmax_of_the_unscaled_product(kernel):
    layer = _layer("dot", kernel)
    q, k, v = _qkv()
    inputs, pad = _inputs()
    out, _ = layer.score(layer, q, k, v, inputs)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~pad[:, None, None, :], float("-inf"))
    # eager's softmax runs in float32 (transformers' convention): float32 tolerances
    torch.testing.assert_close(out, (scores.softmax(-1) @ v).transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_gaussian_is_nadaraya_watson_with_a_per_head_bandwidth(kernel, bandwidth):
    layer = _layer("gaussian", kernel, gaussian_bandwidth=bandwidth)
    q, k, v = _qkv()
    inputs, pad = _inputs()
    out, _ = layer.score(layer, q, k, v, inputs)
    sigma = torch.full((4,), 8 ** 0.25, dtype=torch.float64) if bandwidth is None else torch.full((4,), bandwidth)
    distance = ((q[:, :, :, None] - k[:, :, None]) ** 2).sum(-1)  # [B, H, Lq, Lk], naive on purpose
    logits = (-distance / (2 * sigma.view(1, 4, 1, 1) ** 2)).masked_fill(~pad[:, None, None, :], float("-inf"))
    ref = (logits.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    params = [q, k, v, *layer.score.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad, allow_unused=True)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (layer.score.log_sigma is None) == (bandwidth is not None)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_linear_is_katharopoulos_and_padding_keys_contribute_nothing(feature_map, causal):
    layer = _layer("linear", "sdpa", linear_feature_map=feature_map)
    q, k, v = _qkv()
    inputs, pad = _inputs()
    inputs.causal = causal
    out, weights = layer.score(layer, q, k, v, inputs, output_attentions=True)
    phi = (lambda x: torch.nn.functional.elu(x) + 1) if feature_map == "elu" else torch.relu
    kernel = phi(q) @ phi(k).transpose(-1, -2) * pad[:, None, None, :]
    if causal:
        kernel = kernel.tril()
    implied = kernel / (kernel.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, (implied @ v).transpose(1, 2))
    torch.testing.assert_close(weights, implied)


def test_linear_refuses_score_biases_and_patterns_with_the_reason():
    with pytest.raises(ValueError, match="'linear' has no score matrix"):
        test_modeling.tiny_config(attention_type="linear", position_embedding_type="alibi")
    with pytest.raises(ValueError, match="cannot be restricted to sparse_pattern='local'"):
        test_modeling.tiny_config(attention_type="linear", sparse_pattern="local")
    with pytest.raises(ValueError, match="linear_feature_map='softmax' is not valid"):
        test_modeling.tiny_config(attention_type="linear", linear_feature_map="softmax")
    with pytest.raises(ValueError, match="gaussian_bandwidth=-1.0 is not valid"):
        test_modeling.tiny_config(attention_type="gaussian", gaussian_bandwidth=-1.0)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_linear_generation_keeps_a_constant_size_state_not_keys(position):
    config = test_modeling.tiny_config(attention_type="linear", position_embedding_type=position, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = H.HfAttentionForCausalLM(config).eval()
    ids = torch.randint(3, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padded
    kwargs = dict(attention_mask=mask, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                  return_dict_in_generate=True)
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached.sequences, model.generate(ids, use_cache=False, **kwargs).sequences)
    cache = getattr(cached, "cache", None) or cached.past_key_values
    layers = cache.layers
    assert all(isinstance(layer, LinearAttentionCacheLayer) for layer in layers)
    head_dim = config.head_dim
    assert all(layer.state.kv.shape == (2, 4, head_dim, head_dim) for layer in layers)  # no per-token storage
    assert cache.get_seq_length() == 7 + 9 - 1


def test_conversion_to_the_textbook_scores_keeps_every_tensor_that_applies(minilm):  # noqa: F811
    path, _, batch, _ = minilm
    for attention_type, new in (("dot", set()), ("linear", set()),
                                ("gaussian", {f"layers.{i}.self_attn.score.log_sigma" for i in range(6)})):
        model, report = H.convert(path, attention_type=attention_type, return_report=True)
        assert report.new_names == new, attention_type
        assert torch.isfinite(model(**batch).last_hidden_state).all()
    assert math.isfinite(float(model(**batch).last_hidden_state.std()))
