"""Encoder-decoder and decoder-only models: caches, generation, losses, tying, cross-attention semantics."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

from hf_attention import HfAttentionConfig, HfAttentionForCausalLM, HfAttentionForConditionalGeneration
from hf_attention.cache_names import output_cache
from hf_attention.modeling_hf_attention import shift_tokens_right
from hf_attention.variants import covering_variants, variant_name

VARIANTS = covering_variants()  # pairwise cover: every scoring x positions, x patterns
IDS = [variant_name(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern")) for v in VARIANTS]
PAD, BOS, EOS = 0, 1, 2


def gen_config(**overrides) -> HfAttentionConfig:
    base = dict(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, encoder_layers=2, decoder_layers=2,
        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=96, sparse_window_size=4, sparse_block_size=4, sparse_stride=4,
        sparse_num_global_tokens=1, sparse_num_random_blocks=1, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=BOS,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 40, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def build(cls, **overrides):
    torch.manual_seed(0)
    model = cls(gen_config(**overrides)).eval()
    # Random weights make EOS early and ties likely; a sharper head makes the comparison meaningful.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


@pytest.mark.parametrize("cls", [HfAttentionForConditionalGeneration, HfAttentionForCausalLM],
                         ids=["seq2seq", "causal"])
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_cache_gives_the_same_tokens_greedy_and_beam(variant, cls):
    model = build(cls, **variant)
    ids, mask = left_padded_batch()
    for beams in (1, 2):
        kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, num_beams=beams, do_sample=False)
        with_cache = model.generate(ids, use_cache=True, **kwargs)
        without = model.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(with_cache, without), f"num_beams={beams}"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_incremental_decode_equals_full_forward(variant):
    model = build(HfAttentionForConditionalGeneration, **variant)
    ids, mask = left_padded_batch()
    target = torch.randint(3, 40, (3, 7))
    full = model(ids, attention_mask=mask, decoder_input_ids=target).logits
    encoder_outputs = model.get_encoder()(ids, attention_mask=mask)
    past, steps = None, []
    for t in range(target.shape[1]):
        out = model(attention_mask=mask, encoder_outputs=encoder_outputs, decoder_input_ids=target[:, t : t + 1],
                    cache=past, use_cache=True)
        past = output_cache(out)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)

    lm = build(HfAttentionForCausalLM, **variant)
    seq = torch.cat([ids, target], 1)
    seq_mask = torch.cat([mask, torch.ones_like(target)], 1)
    positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
    full = lm(seq, attention_mask=seq_mask, position_ids=positions).logits
    prefix = ids.shape[1]
    out = lm(seq[:, :prefix], attention_mask=seq_mask[:, :prefix], position_ids=positions[:, :prefix],
             use_cache=True)
    past, steps = output_cache(out), [out.logits]
    for t in range(prefix, seq.shape[1]):
        out = lm(seq[:, t : t + 1], attention_mask=seq_mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                 cache=past, use_cache=True)
        past = output_cache(out)
        steps.append(out.logits)
    real = seq_mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-4)


def test_cache_is_accepted_under_its_pre_5_24_name_too():
    """transformers 5.24 renamed `past_key_values` to `cache`; code written for either name must decode the same."""
    lm = build(HfAttentionForCausalLM, position_embedding_type="alibi")
    ids = torch.randint(3, 40, (2, 6))
    full = lm(ids).logits
    first = lm(ids[:, :5], use_cache=True)
    old_name = lm(ids[:, 5:], past_key_values=output_cache(first), use_cache=True).logits
    torch.testing.assert_close(old_name[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    first, second = lm(ids[:, :5], use_cache=True), lm(ids[:, :5], use_cache=True)
    with pytest.raises(ValueError, match="not both"):
        lm(ids[:, 5:], cache=output_cache(first), past_key_values=output_cache(second), use_cache=True)


def test_seq2seq_loss_is_bart_style():
    model = build(HfAttentionForConditionalGeneration)
    ids, mask = left_padded_batch()
    labels = torch.randint(3, 40, (3, 6))
    labels[0, 4:] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    decoder_input_ids = torch.cat([torch.full((3, 1), BOS), labels[:, :-1]], 1).masked_fill(
        torch.cat([torch.zeros(3, 1, dtype=torch.bool), labels[:, :-1] == -100], 1), PAD
    )
    assert torch.equal(shift_tokens_right(labels, PAD, BOS), decoder_input_ids)
    logits = model(ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(out.logits, logits)
    expected = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_causal_lm_loss_shifts_labels():
    model = build(HfAttentionForCausalLM)
    ids = torch.randint(3, 40, (2, 9))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("cls,auto", [(HfAttentionForConditionalGeneration, AutoModelForSeq2SeqLM),
                                      (HfAttentionForCausalLM, AutoModelForCausalLM)])
def test_ties_and_generation_config_survive_save_and_load(cls, auto, tmp_path):
    model = build(cls, attention_type="sparse", position_embedding_type="relative")
    model.generation_config = GenerationConfig(
        num_beams=2, max_new_tokens=5, decoder_start_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=BOS,
    )
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").exists()
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    assert loaded.generation_config.num_beams == 2
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    if cls is HfAttentionForConditionalGeneration:
        shared = loaded.model.shared.weight
        assert loaded.model.encoder.embeddings.word_embeddings.weight is shared
        assert loaded.model.decoder.embeddings.word_embeddings.weight is shared
    ids, mask = left_padded_batch()
    assert torch.equal(model.generate(ids, attention_mask=mask), loaded.generate(ids, attention_mask=mask))


@pytest.mark.parametrize("position", ["rope", "alibi", "relative", "none"])
def test_cross_attention_has_no_positional_term(position):
    """Permuting the encoder states permutes nothing in the decoder output: no distance across sequences."""
    model = build(HfAttentionForConditionalGeneration, position_embedding_type=position)
    encoder_states = torch.randn(2, 9, 32)
    decoder_ids = torch.randint(3, 40, (2, 5))
    perm = torch.randperm(9)
    out = model.model.decoder(decoder_ids, encoder_hidden_states=encoder_states).last_hidden_state
    permuted = model.model.decoder(decoder_ids, encoder_hidden_states=encoder_states[:, perm]).last_hidden_state
    torch.testing.assert_close(out, permuted, rtol=1e-5, atol=1e-5)


def test_self_attention_does_see_positions_in_the_decoder():
    model = build(HfAttentionForCausalLM, position_embedding_type="alibi")
    ids = torch.randint(3, 40, (1, 8))
    probs = model(ids, output_attentions=True).attentions[0][0, 0]
    assert torch.allclose(probs.triu(1), torch.zeros(8, 8)), "decoder self-attention must be causal"
    # ALiBi: a nearer key wins over a farther one with the same content.
    same = torch.full((1, 6), 7)
    row = model(same, output_attentions=True).attentions[0][0, 0, -1]
    assert (row[1:] > row[:-1]).all()


def test_sampling_and_max_new_tokens():
    model = build(HfAttentionForCausalLM, attention_type="rope")
    ids, mask = left_padded_batch()
    torch.manual_seed(3)
    out = model.generate(ids, attention_mask=mask, do_sample=True, top_k=5, max_new_tokens=6, min_new_tokens=6)
    assert out.shape == (3, ids.shape[1] + 6)
