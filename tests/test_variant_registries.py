"""The three registries: a new variant is one class; additive scoring takes every sparse pattern; names live in
their own class's file."""

import math
import re
from pathlib import Path

import pytest
import test_generation
import test_modeling
import test_save_load
import torch
import toy_variants
from test_ablate import TINY

import hf_attention as H
from hf_attention.registry_hf_attention import ATTENTION_SCORES, POSITIONAL_ENCODINGS, SPARSE_PATTERN_CLASSES
from hf_attention.scores_hf_attention import AttentionInputs
from hf_attention.training import ablate
from hf_attention.variants import iter_variants, refusal

REPO = Path(__file__).resolve().parents[1]
TOY = [{"attention_type": "toy_cosine", "position_embedding_type": p} for p in ("toy_slope", "rope", "learned")]
TOY += [{"attention_type": "toy_cosine", "position_embedding_type": "toy_slope", "sparse_pattern": "local"},
        {"attention_type": "standard", "position_embedding_type": "toy_slope", "sparse_pattern": "block"}]
HEADS = (H.HfAttentionModel, H.HfAttentionForMaskedLM, H.HfAttentionForSequenceClassification,
         H.HfAttentionForQuestionAnswering, H.HfAttentionForCausalLM, H.HfAttentionForConditionalGeneration)


@pytest.fixture
def toys():
    toy_variants.register()
    yield
    toy_variants.unregister()


def test_registered_toys_join_the_grid_and_the_flags(toys):
    names = {(v["attention_type"], v["position_embedding_type"], v.get("sparse_pattern")) for v in iter_variants()}
    assert ("toy_cosine", "toy_slope", "block") in names and ("additive", "toy_slope", None) in names
    args, _ = ablate.parse_args(["--task", "image_classification", "--attention_types", "toy_cosine",
                                 "--position_types", "toy_slope", "--output_dir", "x"])
    assert [c["variant"] for c in ablate.plan(args)[0]] == ["toy_cosine+toy_slope"]


@pytest.mark.parametrize("variant", TOY, ids=lambda v: "-".join(map(str, v.values())))
def test_generic_tests_run_on_a_new_scoring_function_and_positional_type(variant, toys, tmp_path):
    for head in HEADS:  # every head builds and runs
        model = head(test_modeling.tiny_config(**variant, num_labels=2, decoder_start_token_id=1)).eval()
        ids = torch.randint(3, 50, (2, 9))
        kwargs = {"decoder_input_ids": ids[:, :4]} if head is H.HfAttentionForConditionalGeneration else {}
        assert torch.isfinite(test_save_load._first_output(model(ids, **kwargs))).all()
    vision = H.HfAttentionForImageClassification(test_modeling.tiny_config(**variant, image_size=8, patch_size=2))
    assert torch.isfinite(vision(torch.randn(2, 3, 8, 8)).logits).all()
    test_modeling.test_padded_batch_equals_each_sequence_alone(variant)
    test_modeling.test_eager_and_sdpa_kernels_agree_and_attentions_are_probabilities(variant)
    for cls in (H.HfAttentionForConditionalGeneration, H.HfAttentionForCausalLM):
        test_generation.test_cache_gives_the_same_tokens_greedy_and_beam(variant, cls)
    test_generation.test_incremental_decode_equals_full_forward(variant)
    test_save_load.test_round_trip_is_exact_for_every_variant(variant, tmp_path)


def test_the_toy_parameters_are_initialised_and_trained(toys):
    model = H.HfAttentionForMaskedLM(test_modeling.tiny_config(attention_type="toy_cosine",
                                                               position_embedding_type="toy_slope"))
    temperature = model.model.layers[0].self_attn.score.log_temperature
    torch.testing.assert_close(temperature, torch.full_like(temperature, math.log(10.0)))
    ids = torch.randint(3, 50, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert temperature.grad is not None and model.model.score_bias.slope.grad is not None


def test_the_sweep_runs_a_cell_of_a_plugin_variant(tmp_path, monkeypatch, capsys):
    """A sweep cell is a fresh process: HF_ATTENTION_PLUGINS makes it import the module that registers the toys."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_ATTENTION_PLUGINS", "toy_variants_plugin")
    monkeypatch.setenv("PYTHONPATH", f"{Path(__file__).parent}:{REPO}")
    toy_variants.register()
    try:
        out = tmp_path / "sweep"
        assert ablate.main(["--task", "image_classification", "--attention_types", "toy_cosine", "--position_types",
                            "toy_slope", "--seeds", "0", "--output_dir", str(out), "--"] + TINY) == 0
    finally:
        toy_variants.unregister()
    assert "toy_cosine+toy_slope-seed0: done" in capsys.readouterr().out
    assert (out / "toy_cosine+toy_slope-seed0" / "all_results.json").exists()


def test_a_vision_model_without_a_grid_form_is_refused_with_the_reason(toys):
    class NoGrid(toy_variants.ToyLearnedSlopeBias):
        name = "toy_nogrid"
        grid_form = classmethod(H.positions_hf_attention.PositionalEncoding.grid_form.__func__)  # none of its own

    H.positions_hf_attention.register_positional_encoding(NoGrid)
    try:
        config = test_modeling.tiny_config(position_embedding_type="toy_nogrid", image_size=8, patch_size=2)
        H.HfAttentionModel(config)  # text models are fine
        with pytest.raises(ValueError, match="'toy_nogrid' has no 2-D form for a patch grid"):
            H.HfAttentionForImageClassification(config)
    finally:
        POSITIONAL_ENCODINGS.pop("toy_nogrid")


def _naive_additive(q, k, v, score, keep):
    """Bahdanau's formula, written out: score = v_h . tanh(W_q q + W_k k + b), softmax over allowed keys."""
    qa = torch.einsum("bhld,hda->bhla", q, score.w_q) + score.b[None, :, None]
    ka = torch.einsum("bhld,hda->bhla", k, score.w_k)
    scores = torch.einsum("bhija,ha->bhij", torch.tanh(qa[:, :, :, None] + ka[:, :, None]), score.v)
    keep = keep | ~keep.any(-1, keepdim=True)  # a row with no allowed key: anything finite (callers ignore it)
    return (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("pattern", list(SPARSE_PATTERN_CLASSES))
def test_additive_with_each_pattern_equals_additive_under_the_dense_mask(pattern, causal):
    config = test_modeling.tiny_config(attention_type="additive", sparse_pattern=pattern)
    torch.manual_seed(0)
    attention = H.modeling_hf_attention.HfAttentionAttention(config, 0, is_causal=causal)
    H.HfAttentionModel(config)._init_weights(attention.score)
    pattern_obj = H.attention_sparse.pattern_from_config(config)
    length = 13
    q, k, v = (torch.randn(2, 4, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attention = attention.double()
    pad = torch.ones(2, length, dtype=torch.bool)
    pad[1, 9:] = False
    positions = torch.arange(length)[None]
    inputs = AttentionInputs(positions, positions, pad, causal=causal, pattern=pattern_obj)
    out, _ = attention.score(attention, q, k, v, inputs)
    keep = pattern_obj.dense_mask(length, length, causal=causal)[None, None] & pad[:, None, None, :]
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool).tril()
    real = pad[:, :, None, None]  # padding queries may see no real key (their rows are not defined)
    out, ref = out * real, _naive_additive(q, k, v, attention.score, keep) * real
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    params = (q, k, v, *attention.score.parameters())
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pattern", list(SPARSE_PATTERN_CLASSES))
def test_additive_sparse_heads_put_exact_zeros_outside_the_pattern(pattern):
    variant = dict(attention_type="additive", sparse_pattern=pattern, position_embedding_type="alibi")
    config = test_modeling.tiny_config(**variant, attn_implementation="eager", decoder_start_token_id=1)
    ids = torch.randint(3, 50, (1, 17))
    for head, causal in ((H.HfAttentionModel, False), (H.HfAttentionForCausalLM, True)):
        out = head(config).eval()(ids, output_attentions=True)
        allowed = H.attention_sparse.pattern_from_config(config).dense_mask(17, 17, causal=causal)
        for probs in out.attentions:
            assert (probs[0][:, ~allowed] == 0).all() and (probs[0][:, allowed] > 0).all()
    vision = H.HfAttentionVisionModel(test_modeling.tiny_config(**variant, image_size=16, patch_size=2))
    probs = vision(torch.randn(1, 3, 16, 16), output_attentions=True).attentions[0]
    grid = H.attention_sparse.pattern_from_config(vision.config, grid=(8, 8, 1))
    assert (probs[0][:, ~grid.dense_mask(65, 65)] == 0).all()


def test_combinations_that_cannot_work_are_refused_at_config_time(toys):
    class NoMatrix(toy_variants.ToyCosineScore):
        name = "toy_no_matrix"
        takes_score_bias = False
        takes_sparse_pattern = False

    H.scores_hf_attention.register_attention_score(NoMatrix)
    try:
        assert "has no score matrix" in refusal("toy_no_matrix", "alibi")
        assert "cannot be restricted to sparse_pattern='local'" in refusal("toy_no_matrix", "rope", "local")
        assert refusal("toy_no_matrix", "rope") is None
    finally:
        ATTENTION_SCORES.pop("toy_no_matrix")


def test_each_variant_name_is_quoted_only_in_its_own_classes_file():
    """The issue's rule: a variant's quoted name in at most 2 source files (its class, the legacy normalisation)."""
    sources = [p for folder in ("hf_attention", "recipes", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    texts = {p: p.read_text() for p in sources}
    for name in ("additive", "alibi", "relative", "sinusoidal", "strided"):
        quoted = re.compile(rf"[\"']{name}[\"']")
        files = [p.relative_to(REPO) for p, text in texts.items() if quoted.search(text)]
        assert len(files) <= 2, (name, files)


def test_the_readme_variant_tables_are_generated_from_the_registries():
    from hf_attention.variant_tables import block

    assert block() in (REPO / "README.md").read_text(), "run: python -m hf_attention.variant_tables --write README.md"
