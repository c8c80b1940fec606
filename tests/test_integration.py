"""Our variants inside transformers' own models (BERT, ViT, BART, Llama) through AttentionInterface.

References are written here, independently of ``hf_attention.integration``: an eager attention function,
registered under a test name, that adds the explicit pattern mask / ALiBi bias to the scores of
self-attention layers and leaves cross-attention alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoModel,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTModel,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import hf_attention
from hf_attention import attention_sparse
from hf_attention.integration import ATTENTION_IMPLEMENTATIONS, use_variant

TOL = dict(atol=1e-5, rtol=1e-5)
HEADS = 4
VOCAB = 99


# --------------------------------------------------------------------------------------------------
# Tiny models and inputs
# --------------------------------------------------------------------------------------------------


def bert() -> BertModel:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=37,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def vit() -> ViTModel:
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=HEADS, intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def bart() -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


def llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def ids(*lengths: int, pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of random token ids (3..VOCAB) and its attention mask."""
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        where = slice(width - length, width) if left else slice(0, length)
        input_ids[row, where] = torch.randint(3, VOCAB, (length,))
        mask[row, where] = 1
    return input_ids, mask


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def text_inputs(kind: str, lengths=(12, 7)) -> dict:
    if kind == "bert":
        input_ids, mask = ids(*lengths, pad=0)
        return {"input_ids": input_ids, "attention_mask": mask}
    if kind == "bart":
        input_ids, mask = ids(*lengths, pad=1)
        # decoder as long as the encoder: only the module, not the shapes, tells cross-attention apart
        decoder_ids = ids(*(max(lengths),) * len(lengths), pad=1)[0]
        return {"input_ids": input_ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    input_ids, mask = ids(*lengths, pad=0)  # llama: right padding (slots are positions)
    return {"input_ids": input_ids, "attention_mask": mask}


MODELS = {"bert": bert, "vit": vit, "bart": bart, "llama": llama}


def inputs_for(kind: str) -> dict:
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    return text_inputs(kind)


def real_rows(kind: str, inputs: dict) -> torch.Tensor:
    """Bool [B, L] of the output positions that belong to real tokens."""
    if kind == "vit":
        return torch.ones(2, 17, dtype=torch.bool)
    if kind == "bart":
        return torch.ones_like(inputs["decoder_input_ids"], dtype=torch.bool)
    return inputs["attention_mask"].bool()


# --------------------------------------------------------------------------------------------------
# The reference: eager attention with an explicit mask rule / ALiBi bias on self-attention only
# --------------------------------------------------------------------------------------------------

REFERENCE: dict = {"rule": None, "alibi": False}


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    q_len, kv_len, heads = query.shape[2], key.shape[2], query.shape[1]
    causal = bool(getattr(module, "is_causal", False))
    cross = getattr(module, "_test_cross", False)
    i = torch.arange(kv_len - q_len, kv_len)[:, None]  # slot positions, queries at the end of the keys
    j = torch.arange(kv_len)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    if attention_mask is not None:
        allowed = allowed & attention_mask
    elif causal and not cross:
        allowed = allowed & (j <= i)
    scores = (query @ key.transpose(-1, -2)) * scaling
    if not cross:
        if REFERENCE["rule"] is not None:
            allowed = allowed & REFERENCE["rule"](i, j, causal)
        if REFERENCE["alibi"]:
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])  # heads: power of 2
            scores = scores - slopes[:, None, None] * (i - j).abs()
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_reference", reference_attention)
AttentionMaskInterface.register("test_reference", sdpa_mask)


def local_rule(window: int):
    def rule(i, j, causal):
        return (i - j >= 0) & (i - j < window) if causal else (i - j).abs() <= window // 2

    return rule


def reference_output(model, inputs: dict, rule=None, alibi: bool = False) -> torch.Tensor:
    for name, module in model.named_modules():  # cross-attention is known here by name, not by signal
        if name.endswith(("encoder_attn", "crossattention.self")):
            module._test_cross = True
    REFERENCE.update(rule=rule, alibi=alibi)
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_reference")
    try:
        return run(model, inputs)
    finally:
        model.set_attn_implementation(previous)
        REFERENCE.update(rule=None, alibi=False)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_registered_with_a_mask_function():
    for name in ATTENTION_IMPLEMENTATIONS.values():
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert ALL_MASK_ATTENTION_FUNCTIONS[name] is sdpa_mask  # else transformers drops the padding mask
    assert hf_attention.use_variant is use_variant


@pytest.mark.parametrize("kind", list(MODELS))
def test_covering_pattern_reproduces_sdpa(kind):
    model = MODELS[kind]()
    inputs = inputs_for(kind)
    expected = run(model, inputs)
    use_variant(model, "sparse", pattern="local", window_size=1024)
    assert model.config._attn_implementation == "hf_attention_sparse"
    got = run(model, inputs)
    rows = real_rows(kind, inputs)
    torch.testing.assert_close(got[rows], expected[rows], **TOL)


@pytest.mark.parametrize("kind", list(MODELS))
def test_sparse_changes_outputs_and_equals_explicit_mask(kind):
    model = MODELS[kind]()
    inputs = inputs_for(kind)
    rows = real_rows(kind, inputs)
    dense = run(model, inputs)
    use_variant(model, "sparse", pattern="local", window_size=3)
    got = run(model, inputs)
    assert (got[rows] - dense[rows]).abs().max() > 1e-3
    torch.testing.assert_close(got[rows], reference_output(model, inputs, local_rule(3))[rows], **TOL)


@pytest.mark.parametrize("kind", ["bert", "vit", "bart", "llama"])
@pytest.mark.parametrize("variant", ["alibi", "sparse_alibi"])
def test_alibi_equals_reference(kind, variant):
    model = MODELS[kind]()
    inputs = inputs_for(kind)
    rows = real_rows(kind, inputs)
    params = {"window_size": 5} if variant == "sparse_alibi" else {}
    use_variant(model, variant, **params)
    got = run(model, inputs)
    rule = local_rule(5) if params else None
    torch.testing.assert_close(got[rows], reference_output(model, inputs, rule, alibi=True)[rows], **TOL)


def strided_rule(stride: int):
    def rule(i, j, causal):
        ok = ((i - j).abs() < stride) | ((i - j) % stride == 0)
        return ok & (j <= i) if causal else ok

    return rule


def block_rule(block: int, num_global: int):
    def rule(i, j, causal):
        ok = ((i // block - j // block).abs() <= 1) | (i < num_global) | (j < num_global)
        return ok & (j <= i) if causal else ok

    return rule


BLOCKED_CASES = {
    "local": ({"pattern": "local", "window_size": 8}, local_rule(8)),
    "strided": ({"pattern": "strided", "stride": 6}, strided_rule(6)),
    "block": (
        {"pattern": "block", "block_size": 8, "num_global_tokens": 2, "num_random_blocks": 0},
        block_rule(8, 2),
    ),
}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("case", list(BLOCKED_CASES))
def test_blocked_kernel_path_equals_reference(kind, case, monkeypatch):
    """Force the block-skipping kernel at a short length: exact against the explicit mask, padding included."""
    params, rule = BLOCKED_CASES[case]
    monkeypatch.setattr(attention_sparse, "DENSE_FALLBACK_MAX_LEN", 0)
    monkeypatch.setattr(attention_sparse, "DENSE_FALLBACK_DENSITY", float("inf"))
    calls = []
    blocked = attention_sparse._blocked_attention
    monkeypatch.setattr(attention_sparse, "_blocked_attention", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    model = MODELS[kind]()
    inputs = text_inputs(kind, lengths=(48, 29))
    rows = real_rows(kind, inputs)
    use_variant(model, "sparse_alibi", **params)
    got = run(model, inputs)
    assert calls, "the blocked kernel was not used"
    torch.testing.assert_close(got[rows], reference_output(model, inputs, rule, alibi=True)[rows], **TOL)


SPARSE_CASES = {
    "sparse": ("sparse", {"pattern": "local", "window_size": 3}),
    "alibi": ("alibi", {}),
    "sparse_alibi": ("sparse_alibi", {"pattern": "strided", "stride": 3}),
    "block": ("sparse", {"pattern": "block", "block_size": 2, "num_global_tokens": 1, "num_random_blocks": 1}),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_padded_batch_equals_each_sequence_alone(case):
    variant, params = SPARSE_CASES[case]
    # BERT, right padding
    model = use_variant(bert(), variant, **params)
    input_ids, mask = ids(11, 6, pad=0)
    batch = run(model, {"input_ids": input_ids, "attention_mask": mask})
    for row, length in enumerate((11, 6)):
        alone = run(model, {"input_ids": input_ids[row : row + 1, :length]})
        torch.testing.assert_close(batch[row, :length], alone[0], **TOL)
    # BART, padded encoder input
    model = use_variant(bart(), variant, **params)
    input_ids, mask = ids(11, 6, pad=1)
    decoder_ids = ids(7, 7, pad=1)[0]
    batch = run(model, {"input_ids": input_ids, "attention_mask": mask, "decoder_input_ids": decoder_ids})
    for row, length in enumerate((11, 6)):
        alone = run(model, {"input_ids": input_ids[row : row + 1, :length], "decoder_input_ids": decoder_ids[row:][:1]})
        torch.testing.assert_close(batch[row], alone[0], **TOL)
    # Llama, left padding with real-token position ids (as generate() does)
    model = use_variant(llama(), variant, **params)
    input_ids, mask = ids(11, 6, pad=0, left=True)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = run(model, {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids})
    for row, length in enumerate((11, 6)):
        alone = run(model, {"input_ids": input_ids[row : row + 1, -length:]})
        torch.testing.assert_close(batch[row, -length:], alone[0], **TOL)


def test_generation_with_cache_equals_without():
    """A window shorter than the text plus ALiBi: cached decoding must get the query offsets right."""
    variant, params = "sparse_alibi", {"pattern": "local", "window_size": 3}
    model = use_variant(llama(), variant, **params)
    prompt, mask = ids(6, 4, pad=0, left=True)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=mask, use_cache=True, **settings)
        uncached = model.generate(prompt, attention_mask=mask, use_cache=False, **settings)
        assert torch.equal(cached, uncached)
        for row, length in enumerate((6, 4)):  # the left-padded batch generates what each prompt does alone
            alone = model.generate(prompt[row : row + 1, -length:], use_cache=True, **settings)
            assert torch.equal(cached[row, -(length + 8) :], alone[0])

    model = use_variant(bart(), variant, **params)
    source, mask = ids(9, 5, pad=1)
    settings = dict(max_new_tokens=8, do_sample=False, num_beams=1, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(source, attention_mask=mask, use_cache=True, **settings)
        uncached = model.generate(source, attention_mask=mask, use_cache=False, **settings)
    assert cached.shape[1] == 9 and torch.equal(cached, uncached)


def test_from_pretrained_with_attn_implementation(tmp_path):
    model = use_variant(bert(), "sparse", pattern="strided", stride=3)
    inputs = text_inputs("bert")
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="hf_attention_sparse").eval()
    assert loaded.config._attn_implementation == "hf_attention_sparse"
    assert loaded.config.hf_attention_sparse_pattern == "strided" and loaded.config.hf_attention_sparse_stride == 3
    rows = real_rows("bert", inputs)
    torch.testing.assert_close(run(loaded, inputs)[rows], expected[rows], **TOL)


def test_set_attn_implementation_switches_back_and_forth():
    model = bert()
    inputs = text_inputs("bert")
    rows = real_rows("bert", inputs)
    sdpa = run(model, inputs)
    model.set_attn_implementation("hf_attention_alibi")
    alibi = run(model, inputs)
    assert (alibi[rows] - sdpa[rows]).abs().max() > 1e-3
    torch.testing.assert_close(alibi[rows], reference_output(model, inputs, alibi=True)[rows], **TOL)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(run(model, inputs), sdpa, atol=0, rtol=0)


def test_clear_errors():
    model = bert()
    with pytest.raises(ValueError, match=r"'additive'.*learned.*'sparse', 'alibi', 'sparse_alibi'"):
        use_variant(model, "additive")
    with pytest.raises(ValueError, match="'relative'"):
        use_variant(model, "hf_attention_relative")
    with pytest.raises(ValueError, match="Unknown attention variant"):
        use_variant(model, "sparse_magic")
    with pytest.raises(ValueError, match="window_sizes"):
        use_variant(model, "sparse", window_sizes=4)
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        use_variant(model, "sparse", window_size=0)
    with pytest.raises(ValueError, match="takes no parameters"):
        use_variant(model, "alibi", window_size=4)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "hf_attention_sparse_window_size")


def test_alibi_slopes_are_blooms_for_any_head_count():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from hf_attention.positions_hf_attention import alibi_slopes

    for heads in (4, 6, 12):
        bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32).view(heads, 2)[:, 1]
        torch.testing.assert_close(alibi_slopes(heads), bloom)
        assert math.isclose(float(alibi_slopes(heads)[0]), 2 ** (-8 / (2 ** math.floor(math.log2(heads)))))
