"""Attention reliability: sparse patterns live on positions (padding changes nothing), mask batch sizes are
checked, and every parameter trains under gradient checkpointing.

References are independent of the code under test: a padded batch is compared with each sequence run alone
(the unpadded forward is the definition), and checkpointed gradients with the plain backward.
"""

from __future__ import annotations

import pytest
import torch

import hf_attention.attention_sparse as sp
from hf_attention import (
    HfAttentionConfig,
    HfAttentionForCausalLM,
    HfAttentionForConditionalGeneration,
    HfAttentionForImageClassification,
    HfAttentionModel,
)
from hf_attention.attention_sparse_2d import GridBlockPattern
from hf_attention.positions_2d_hf_attention import grid_position_ids
from hf_attention.variants import covering_variants, variant_name

PAD = 0
PATTERNS = ("local", "strided", "block")
KERNELS = ("eager", "sdpa", "sdpa-blocked")
TOL = dict(rtol=1e-4, atol=1e-4)


def text_config(**overrides) -> HfAttentionConfig:
    base = dict(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=96,
        sparse_window_size=4, sparse_block_size=4, sparse_stride=4, sparse_num_global_tokens=2,
        sparse_num_random_blocks=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        initializer_range=0.5, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


def vision_config(**overrides) -> HfAttentionConfig:
    base = dict(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        sparse_window_size=2, sparse_stride=2, sparse_block_size=2, sparse_num_global_tokens=1,
        sparse_num_random_blocks=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        initializer_range=0.5,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


def use_kernel(model, kernel: str, monkeypatch) -> None:
    """eager, sdpa (short sequences: the dense fallback of the sparse kernel) or sdpa with the blocked kernel."""
    model.set_attn_implementation("eager" if kernel == "eager" else "sdpa")
    if kernel == "sdpa-blocked":
        monkeypatch.setattr(sp, "DENSE_FALLBACK_MAX_LEN", 0)
        monkeypatch.setattr(sp, "DENSE_FALLBACK_DENSITY", float("inf"))


def padded(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, position_ids) of a padded batch; positions count real tokens only."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        where = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, where], mask[row, where] = seq, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def real_slots(mask: torch.Tensor, row: int) -> torch.Tensor:
    return mask[row].bool()


SEQS_LENGTHS = (19, 11, 6)


def random_seqs() -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randint(3, 40, (n,)) for n in SEQS_LENGTHS]


# --------------------------------------------------------------------------------------------------
# 1. Sparse patterns are defined on positions: padding changes nothing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("position", ["alibi", "relative", "rope", "learned"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal-lm"])
def test_padded_batch_equals_each_sequence_alone(causal, pattern, position, kernel, side, monkeypatch):
    torch.manual_seed(0)
    cls = HfAttentionForCausalLM if causal else HfAttentionModel
    model = cls(text_config(attention_type="sparse", sparse_pattern=pattern, position_embedding_type=position)).eval()
    use_kernel(model, kernel, monkeypatch)
    seqs = random_seqs()
    ids, mask, positions = padded(seqs, side)

    def states(**inputs) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1]

    batch = states(input_ids=ids, attention_mask=mask, position_ids=positions)
    for row, seq in enumerate(seqs):
        alone = states(input_ids=seq[None])[0]
        torch.testing.assert_close(batch[row, real_slots(mask, row)], alone, **TOL, msg=f"row {row}")


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_left_padded_batched_generation_equals_each_prompt_alone(pattern, kernel):
    """generate() left-pads and derives position ids from the mask; cached decoding included."""
    torch.manual_seed(0)
    config = text_config(attention_type="sparse", sparse_pattern=pattern, position_embedding_type="alibi",
                         initializer_range=0.2)
    model = HfAttentionForCausalLM(config).eval()
    model.set_attn_implementation(kernel)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper logits: fewer near-ties between greedy tokens
    seqs = random_seqs()
    ids, mask, _ = padded(seqs, "left")
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        for use_cache in (True, False):
            out = model.generate(ids, attention_mask=mask, use_cache=use_cache, **settings)
            for row, seq in enumerate(seqs):
                alone = model.generate(seq[None], use_cache=use_cache, **settings)[0]
                assert torch.equal(out[row, -alone.shape[0] :], alone), f"row {row}, use_cache={use_cache}"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("position", ["relative", "rope", "alibi"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vision_layers_are_padding_invariant(pooling, pattern, position, kernel, side, monkeypatch):
    """The vision stack reads its grid pattern from the 2-D position ids: extra padding slots change nothing."""
    torch.manual_seed(0)
    config = vision_config(attention_type="sparse", sparse_pattern=pattern, position_embedding_type=position,
                           pooling=pooling)
    model = HfAttentionForImageClassification(config).eval().model
    use_kernel(model, kernel, monkeypatch)
    grid = (4, 4)
    positions = grid_position_ids(*grid, model.num_prefix_tokens)
    with torch.no_grad():
        hidden = model.embeddings(torch.randn(1, 3, 16, 16), positions, grid)
    n, extra = hidden.shape[1], 5
    junk = torch.randn(1, extra, hidden.shape[-1])
    junk_ids = torch.randint(0, 3 * 2**16, (1, extra))  # any ids: they are padding
    real = torch.ones(1, n + extra, dtype=torch.bool)
    if side == "left":
        hidden_pad, ids_pad = torch.cat([junk, hidden], 1), torch.cat([junk_ids, positions], 1)
        real[:, :extra] = False
    else:
        hidden_pad, ids_pad = torch.cat([hidden, junk], 1), torch.cat([positions, junk_ids], 1)
        real[:, n:] = False

    def run(states, inputs):
        with torch.no_grad():
            for layer in model.layers:
                states = layer(states, inputs)
        return states

    alone = run(hidden, model.attention_inputs(positions, grid))
    got = run(hidden_pad, model.attention_inputs(ids_pad, grid, key_padding_mask=real))
    torch.testing.assert_close(got[real], alone[0], **TOL)


INTEGRATION_PARAMS = {
    "local": {"pattern": "local", "window_size": 3},
    "strided": {"pattern": "strided", "stride": 3},
    "block": {"pattern": "block", "block_size": 2, "num_global_tokens": 1, "num_random_blocks": 1},
}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hf_attention_sparse_in_transformers_models_is_padding_invariant(pattern):
    """`attn_implementation="hf_attention_sparse"`: left-padded BERT forward and Llama batched generation."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from hf_attention.integration import use_variant

    torch.manual_seed(0)
    seqs = random_seqs()
    bert = BertModel(BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ), add_pooling_layer=False).eval()
    use_variant(bert, "sparse_alibi", **INTEGRATION_PARAMS[pattern])
    ids, mask, positions = padded(seqs, "left")
    with torch.no_grad():
        batch = bert(ids, attention_mask=mask, position_ids=positions).last_hidden_state
        for row, seq in enumerate(seqs):
            alone = bert(seq[None]).last_hidden_state[0]
            torch.testing.assert_close(batch[row, real_slots(mask, row)], alone, **TOL)

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
    )).eval()
    use_variant(llama, "sparse", **INTEGRATION_PARAMS[pattern])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        for use_cache in (True, False):
            out = llama.generate(ids, attention_mask=mask, use_cache=use_cache, **settings)
            for row, seq in enumerate(seqs):
                alone = llama.generate(seq[None], use_cache=use_cache, **settings)[0]
                assert torch.equal(out[row, -alone.shape[0] :], alone), f"row {row}, use_cache={use_cache}"


def block_pattern(**overrides) -> sp.BlockPattern:
    options = dict(block_size=4, num_global_tokens=2, num_random_blocks=2, seed=3, max_positions=64)
    return sp.BlockPattern(**{**options, **overrides})


KERNEL_PATTERNS = {
    "local": sp.LocalPattern(window_size=5),
    "strided": sp.StridedPattern(stride=4),
    "block": block_pattern(),
}


@pytest.mark.parametrize("blocked", [False, True], ids=["dense", "blocked"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(KERNEL_PATTERNS))
def test_sparse_kernel_with_pattern_positions_is_padding_invariant(name, causal, blocked, monkeypatch):
    if blocked:
        monkeypatch.setattr(sp, "DENSE_FALLBACK_MAX_LEN", 0)
        monkeypatch.setattr(sp, "DENSE_FALLBACK_DENSITY", float("inf"))
    pattern, heads, dim = KERNEL_PATTERNS[name], 2, 8
    lengths, width = (29, 17), 29
    seqs = [[torch.randn(1, heads, n, dim, dtype=torch.float64) for _ in "qkv"] for n in lengths]
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def bias_fn(rel):
        return -slopes.view(-1, *[1] * rel.dim()) * rel.abs()

    for side in ("left", "right"):
        qkv = [torch.zeros(len(lengths), heads, width, dim, dtype=torch.float64) for _ in "qkv"]
        pad = torch.zeros(len(lengths), width, dtype=torch.bool)
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            where = slice(width - n, width) if side == "left" else slice(0, n)
            for full, part in zip(qkv, seq):
                full[row, :, where] = part[0]
            pad[row, where] = True
        positions = (pad.long().cumsum(-1) - 1).clamp(min=0)
        out = sp.sparse_attention(*qkv, pattern, causal=causal, key_padding_mask=pad, score_bias=bias_fn,
                                  positions=positions, pattern_positions=positions)
        for row, seq in enumerate(seqs):
            alone = sp.sparse_attention(*seq, pattern, causal=causal, score_bias=bias_fn)[0]
            torch.testing.assert_close(out[row, pad[row]], alone, msg=f"{side} row {row}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(KERNEL_PATTERNS))
def test_flex_block_mask_follows_positions(name, causal):
    """The FlexAttention mask (creation is uncompiled on CPU) of a left-padded row is the unpadded pattern, shifted."""
    pattern, width, extra = KERNEL_PATTERNS[name], 60, 13  # within max_positions (random blocks fixed)
    pad = torch.ones(2, width, dtype=torch.bool)
    pad[1, :extra] = False
    positions = (pad.long().cumsum(-1) - 1).clamp(min=0)
    block_mask = sp.flex_block_mask(pattern, width, causal=causal, key_padding_mask=pad,
                                    pattern_positions=positions)
    idx = torch.arange(width)
    for row, start in ((0, 0), (1, extra)):
        got = block_mask.mask_mod(torch.tensor(row), 0, idx[:, None], idx[None, :])
        size = width - start
        want = pattern.dense_mask(size, size, causal=causal)
        assert torch.equal(got[start:, start:], want), f"row {row}"
        assert not got[start:, :start].any()


def test_block_pattern_pad_tokens_are_never_global():
    """Global tokens are the first positions, never padding at negative positions (cached decoding)."""
    pattern = block_pattern(num_random_blocks=0)
    positions = torch.arange(-6, 10)[None]  # six padding slots before the first real token
    mask = pattern.position_mask(positions, positions, causal=False)[0]
    real = positions[0] >= 0
    assert torch.equal(mask[real][:, real], pattern.dense_mask(10, 10))
    far = positions[0] >= 8  # block 2: padding in blocks -2 and -1 is neither a neighbour nor global
    assert not mask[far][:, ~real].any() and not mask[~real][:, far].any()


def test_grid_pattern_reads_two_dimensional_ids():
    pattern = GridBlockPattern(grid_height=5, grid_width=6, num_prefix_tokens=1, block_size=2, num_random_blocks=2)
    ids = grid_position_ids(5, 6, 1)
    assert torch.equal(pattern.pattern_index(ids)[0], torch.arange(31))
    assert torch.equal(pattern.position_mask(ids, ids, causal=False)[0], pattern.dense_mask(31, 31))


# --------------------------------------------------------------------------------------------------
# 4. A mask of another batch size is an error, not a broadcast
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {"attention_type": "standard", "position_embedding_type": "learned"},
    {"attention_type": "additive", "position_embedding_type": "sinusoidal"},
    {"attention_type": "standard", "position_embedding_type": "alibi"},
    {"attention_type": "sparse", "position_embedding_type": "alibi"},
], ids=["standard", "additive", "alibi", "sparse"])
def test_attention_mask_batch_size_must_match(overrides):
    ids = torch.randint(3, 40, (2, 7))
    for mask in (torch.ones(1, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)):
        bad = mask.shape[0]
        for cls in (HfAttentionModel, HfAttentionForCausalLM):
            model = cls(text_config(**overrides)).eval()
            with pytest.raises(ValueError, match=rf"batch size {bad}.*batch size 2"):
                model(ids, attention_mask=mask)
        seq2seq = HfAttentionForConditionalGeneration(text_config(**overrides)).eval()
        with pytest.raises(ValueError, match=rf"batch size {bad}.*batch size 2"):
            seq2seq(ids, attention_mask=mask, decoder_input_ids=ids)
        with pytest.raises(ValueError, match=rf"batch size {bad}.*batch size 2"):
            seq2seq(ids, decoder_attention_mask=mask, decoder_input_ids=ids)
    model = HfAttentionModel(text_config(**overrides)).eval()
    model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))  # the right size still runs


# --------------------------------------------------------------------------------------------------
# 6. Gradient checkpointing trains every parameter, relative bias included
# --------------------------------------------------------------------------------------------------

VARIANTS = covering_variants()  # pairwise cover: every scoring x positions, x patterns
VARIANT_IDS = [variant_name(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern"))
               for v in VARIANTS]


def _grads(model, batch: dict, loss_fn, checkpointing: dict | None) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    loss_fn(model(**batch)).backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def check_checkpointing(what: str, model, batch: dict, loss_fn=lambda out: out.loss) -> None:
    """Every parameter has a gradient with checkpointing (both modes), equal to the plain backward's."""
    reference = _grads(model, batch, loss_fn, None)
    missing = [name for name, grad in reference.items() if grad is None]
    assert not missing, f"{what}: no gradient even without checkpointing: {missing}"
    for reentrant in (False, True):
        got = _grads(model, batch, loss_fn, {"use_reentrant": reentrant})
        missing = [name for name, grad in got.items() if grad is None]
        assert not missing, f"{what}, use_reentrant={reentrant}: no gradient for {missing}"
        for name, grad in got.items():
            where = f"{what} use_reentrant={reentrant} {name}"
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_gradient_checkpointing_trains_every_parameter(variant, kernel):
    config = text_config(initializer_range=0.1, attn_implementation=kernel, **variant)
    ids = torch.randint(3, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    torch.manual_seed(0)
    weights = torch.randn(2, 9, config.hidden_size)
    check_checkpointing("encoder", HfAttentionModel(config), {"input_ids": ids, "attention_mask": mask},
                        lambda out: (out.last_hidden_state * weights).sum())
    torch.manual_seed(0)
    labels = ids.masked_fill(mask == 0, -100)
    check_checkpointing("causal lm", HfAttentionForCausalLM(config),
                        {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels})
    torch.manual_seed(0)
    check_checkpointing("seq2seq", HfAttentionForConditionalGeneration(config),
                        {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 40, (2, 5))})
    torch.manual_seed(0)
    vision = HfAttentionForImageClassification(
        vision_config(initializer_range=0.1, attn_implementation=kernel, **variant)
    )
    check_checkpointing("vision", vision, {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])})
