"""Encoder models for every variant: masks, positions, kernels, outputs, heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_attention import (
    HfAttentionConfig,
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
)
from hf_attention.modeling_hf_attention import AttentionInputs, HfAttentionAttention
from hf_attention.registry_hf_attention import ATTENTION_SCORES, POSITIONAL_ENCODINGS, SPARSE_PATTERN_CLASSES
from hf_attention.variants import covering_variants, iter_variants, parse_variant, variant_name

VARIANTS = list(iter_variants())
IDS = [variant_name(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern")) for v in VARIANTS]

COVER = covering_variants()  # the 10-minute budget: a cover of the grid for the per-variant model tests
COVER_IDS = [variant_name(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern")) for v in COVER]


def tiny_config(**overrides) -> HfAttentionConfig:
    base = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
        sparse_window_size=4, sparse_block_size=4, sparse_stride=4, sparse_num_global_tokens=1,
        sparse_num_random_blocks=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


def build(model_cls=HfAttentionModel, **overrides):
    torch.manual_seed(0)
    return model_cls(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("variant", COVER, ids=COVER_IDS)
def test_padded_batch_equals_each_sequence_alone(variant):
    model = build(**variant)
    lengths = [21, 13, 6]
    input_ids = torch.randint(1, 50, (3, max(lengths)))
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    batched = model(input_ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(batched).all()
    for row, length in enumerate(lengths):
        alone = model(input_ids[row : row + 1, :length]).last_hidden_state
        torch.testing.assert_close(batched[row, :length], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", COVER, ids=COVER_IDS)
def test_eager_and_sdpa_kernels_agree_and_attentions_are_probabilities(variant):
    model = build(**variant)
    input_ids = torch.randint(1, 50, (2, 19))
    mask = torch.ones_like(input_ids)
    mask[1, 12:] = 0
    model.set_attn_implementation("sdpa")
    fast = model(input_ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("eager")
    out = model(input_ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    real = mask.bool()  # padding queries carry no meaning and kernels may differ there
    torch.testing.assert_close(fast[real], out.last_hidden_state[real], rtol=1e-4, atol=1e-5)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    for probs in out.attentions:
        assert probs.shape == (2, 4, 19, 19)
        if ATTENTION_SCORES[variant["attention_type"]].weights_sum_to_one:
            torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 19))
        assert (probs[1, :, :12, 12:] == 0).all(), "padding keys must get exactly zero probability"
        if variant.get("sparse_pattern"):
            allowed = model.sparse_pattern.dense_mask(19, 19)
            assert (probs[0][:, ~allowed] == 0).all(), "outside the sparse pattern must be exactly zero"
            assert (probs[0][:, allowed] > 0).all()


@pytest.mark.parametrize(
    "attention,position",
    [(a, p) for a in ("standard", "sparse", "additive") for p in ("rope", "alibi", "relative", "none")
     # RoPE's relative property needs dot-product scoring: under additive scoring the rotation stays absolute.
     if (a, p) != ("additive", "rope")],
)
def test_relative_types_ignore_a_constant_shift_of_position_ids(attention, position):
    model = build(attention_type=attention, position_embedding_type=position)
    input_ids = torch.randint(1, 50, (2, 17))
    base = torch.arange(17)[None].expand(2, -1)
    out = model(input_ids, position_ids=base).last_hidden_state
    shifted = model(input_ids, position_ids=base + 9).last_hidden_state
    torch.testing.assert_close(out, shifted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention,position", [("standard", "sinusoidal"), ("standard", "learned"),
                                                ("additive", "rope")])
def test_absolute_types_do_see_the_shift(attention, position):
    model = build(attention_type=attention, position_embedding_type=position)
    input_ids = torch.randint(1, 50, (1, 10))
    base = torch.arange(10)[None]
    assert not torch.allclose(model(input_ids, position_ids=base).last_hidden_state,
                              model(input_ids, position_ids=base + 3).last_hidden_state)


def test_learned_positions_past_the_table_raise_and_others_extrapolate():
    with pytest.raises(ValueError, match="learned position table of size 64"):
        build(position_embedding_type="learned")(torch.randint(1, 50, (1, 65)))
    for position in ("sinusoidal", "rope", "alibi", "relative"):
        out = build(position_embedding_type=position)(torch.randint(1, 50, (1, 100))).last_hidden_state
        assert out.shape == (1, 100, 32) and torch.isfinite(out).all()


def _attention_module(**overrides) -> HfAttentionAttention:
    config = tiny_config(**overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = HfAttentionAttention(config).eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return module


def test_standard_attention_equals_sdpa_and_the_written_formula():
    module = _attention_module()
    x = torch.randn(2, 9, 32)
    key_padding = torch.ones(2, 9, dtype=torch.bool)
    key_padding[1, 6:] = False
    positions = torch.arange(9)[None]
    inputs = AttentionInputs(q_positions=positions, k_positions=positions, key_padding_mask=key_padding)
    out, _ = module(x, inputs)

    def heads(t):
        return t.view(2, 9, 4, 8).transpose(1, 2)

    q, k, v = heads(module.q_proj(x)), heads(module.k_proj(x)), heads(module.v_proj(x))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding[:, None, None, :])
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    formula = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(sdpa, formula, rtol=1e-5, atol=1e-6)
    expected = module.out_proj(formula.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_additive_attention_module_equals_bahdanau_formula():
    module = _attention_module(attention_type="additive", additive_hidden_size=5)
    x = torch.randn(1, 7, 32)
    positions = torch.arange(7)[None]
    out, probs = module(x, AttentionInputs(positions, positions, None), output_attentions=True)
    q = module.q_proj(x).view(1, 7, 4, 8).transpose(1, 2)
    k = module.k_proj(x).view(1, 7, 4, 8).transpose(1, 2)
    v = module.v_proj(x).view(1, 7, 4, 8).transpose(1, 2)
    qa = torch.einsum("bhld,hda->bhla", q, module.score.w_q) + module.score.b[None, :, None]
    ka = torch.einsum("bhld,hda->bhla", k, module.score.w_k)
    scores = torch.einsum("bhija,ha->bhij", torch.tanh(qa[:, :, :, None] + ka[:, :, None]), module.score.v)
    ref_probs = torch.softmax(scores, -1)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    expected = module.out_proj((ref_probs @ v).transpose(1, 2).reshape(1, 7, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build(HfAttentionForMaskedLM, attention_type="sparse", position_embedding_type="relative")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids = torch.randint(1, 50, (2, 12))
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_return_dict_false_gives_tuples():
    model = build(HfAttentionForQuestionAnswering)
    ids = torch.randint(1, 50, (2, 8))
    out = model(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]), return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0 and out[1].shape == (2, 8)
    base = build()(ids, return_dict=False)
    assert isinstance(base, tuple) and base[0].shape == (2, 8, 32)


def test_masked_lm_loss_and_tied_embeddings():
    model = build(HfAttentionForMaskedLM)
    assert model.lm_head.decoder.weight is model.model.embeddings.word_embeddings.weight
    ids = torch.randint(1, 50, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits.view(-1, 50), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "problem,labels_fn,loss_fn",
    [
        ("single_label_classification", lambda: torch.tensor([0, 2]), lambda lg, lb: F.cross_entropy(lg, lb)),
        ("multi_label_classification", lambda: torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
         lambda lg, lb: F.binary_cross_entropy_with_logits(lg, lb)),
        ("regression", lambda: torch.randn(2, 3), lambda lg, lb: F.mse_loss(lg, lb)),
    ],
)
def test_sequence_classification_losses_follow_problem_type(problem, labels_fn, loss_fn):
    model = build(HfAttentionForSequenceClassification, num_labels=3, problem_type=problem, pooling="mean")
    ids = torch.randint(1, 50, (2, 8))
    labels = labels_fn()
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, loss_fn(out.logits, labels))


def test_question_answering_loss_ignores_out_of_range_positions():
    model = build(HfAttentionForQuestionAnswering)
    ids = torch.randint(1, 50, (2, 8))
    out = model(ids, start_positions=torch.tensor([1, 99]), end_positions=torch.tensor([2, 99]))
    expected = (F.cross_entropy(out.start_logits[:1], torch.tensor([1]))
                + F.cross_entropy(out.end_logits[:1], torch.tensor([2]))) / 2
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"attention_type": "lineal"}, "attention_type='lineal' is not valid; choose one of 'standard'"),
        ({"position_embedding_type": "abs"}, "position_embedding_type='abs' is not valid; choose one of"),
        ({"attention_type": "sparse", "sparse_pattern": "dilated"}, "sparse_pattern='dilated' is not valid"),
        ({"attention_type": "rope", "position_embedding_type": "alibi"}, "implies position_embedding_type='rope'"),
        ({"norm_position": "sandwich"}, "norm_position='sandwich' is not valid; choose one of 'pre', 'post'"),
        ({"sparse_window_size": 0}, "sparse_window_size=0 is not valid"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30 is not a multiple"),
        ({"attention_probs_dropout_prob": 1.5}, "attention_probs_dropout_prob=1.5"),
        ({"activation_dropout": -0.1}, "activation_dropout=-0.1"),
    ],
)
def test_bad_config_values_raise_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HfAttentionConfig(**kwargs)


def test_variant_names_round_trip_and_bad_names_list_choices():
    for variant, name in zip(VARIANTS, IDS):
        assert parse_variant(name) == variant
    with pytest.raises(ValueError, match="variant 'dense' is not valid; choose one of standard\\+sinusoidal"):
        parse_variant("dense")
    # every scoring function x (dense + each pattern it takes) x every positional type it takes
    expected = sum((1 + (len(SPARSE_PATTERN_CLASSES) if score.takes_sparse_pattern else 0))
                   * sum(1 for p in POSITIONAL_ENCODINGS.values()
                         if score.takes_score_bias or not p.provides_score_bias)
                   for score in ATTENTION_SCORES.values())
    assert len(VARIANTS) == len(set(IDS)) == expected


def test_bad_attention_mask_shape_is_explained():
    model = build()
    with pytest.raises(ValueError, match="attention_mask has 5 positions but the keys have 8"):
        model(torch.randint(1, 50, (1, 8)), attention_mask=torch.ones(1, 5))
