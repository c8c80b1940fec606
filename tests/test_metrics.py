"""Offline metrics: SQuAD v1.1 EM/F1 against the official leaderboard numbers, ROUGE against
`rouge_score` itself, and the SciTLDR multi-reference aggregates on a hand-made case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from hf_attention.training.metrics import (
    LocalMetric,
    accuracy,
    exact_match_score,
    f1_score,
    first_sentence_baseline,
    load_metric,
    normalize_answer,
    rouge_scores,
    split_sentences,
    squad_references_from_json,
    squad_v1_scores,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SQUAD = DATA / "qa" / "squad-v1.1"
needs_data = pytest.mark.skipif(not SQUAD.is_dir(), reason=f"shared data not found at {DATA}")

# Dev-set EM / F1 of the published predictions, from shared/data/README.md (official v1.1 metric).
OFFICIAL = {
    "bert-ensemble-google": (86.21, 92.20, 0),
    "r-net-plus-ensemble-msra": (82.47, 88.48, 0),
    "slqa-plus-ensemble-alibaba": (81.95, 88.38, 0),
    "match-lstm-boundary-ensemble-smu": (67.63, 76.76, 0),
    "logistic-regression-baseline-stanford": (40.14, 50.98, 13),
}


@pytest.fixture(scope="module")
def squad_references() -> dict[str, list[str]]:
    return squad_references_from_json(SQUAD / "dev-v1.1.json")


# ---------------------------------------------------------------------------------------------- SQuAD


@needs_data
@pytest.mark.parametrize("system", sorted(OFFICIAL))
def test_squad_reproduces_official_numbers(system, squad_references):
    predictions = json.loads((SQUAD / "reference-predictions" / f"{system}.json").read_text())
    scores = squad_v1_scores(predictions, squad_references)
    em, f1, missing = OFFICIAL[system]
    assert scores["total"] == 10_570
    assert scores["missing"] == missing
    assert scores["exact_match"] == pytest.approx(em, abs=0.01)
    assert scores["f1"] == pytest.approx(f1, abs=0.01)


@needs_data
def test_squad_references_from_json_counts(squad_references):
    assert len(squad_references) == 10_570
    assert sum(len(golds) for golds in squad_references.values()) == 34_726
    assert squad_references["56be4db0acb8001400a502ec"] == ["Denver Broncos"] * 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  Hello,   World. ", "hello world"),
        ("a an the", ""),
        ("theory of another thesis", "theory of another thesis"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so no article is left to remove
        ("Denver Broncos.", "denver broncos"),
        ("$1,000 (approx.)", "1000 approx"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_by_hand():
    assert exact_match_score("The Denver Broncos!", "denver broncos") == 1.0
    assert exact_match_score("Broncos", "denver broncos") == 0.0
    # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert f1_score("the cat sat", "cat sat on a mat") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: overlap {dog: 1, cat: 1} = 2 of 3 each side
    assert f1_score("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)
    assert f1_score("", "paris") == 0.0
    assert f1_score("london", "paris") == 0.0


def test_squad_scores_max_over_golds_and_missing_ids():
    references = {"q1": ["Paris", "city of Paris"], "q2": ["42"], "q3": ["blue whale"]}
    predictions = {"q1": "the city of paris", "q3": "whale", "extra": "ignored"}
    scores = squad_v1_scores(predictions, references)
    # q1: EM 1 / F1 1 against the second gold; q2 missing: 0 / 0; q3: EM 0, F1 2*(1*0.5)/1.5 = 2/3
    assert scores == {
        "exact_match": pytest.approx(100 * 1 / 3),
        "f1": pytest.approx(100 * (1 + 2 / 3) / 3),
        "total": 3,
        "missing": 1,
    }


# ---------------------------------------------------------------------------------------------- ROUGE


def test_rouge_matches_rouge_score_on_single_sentences():
    predictions = [
        "we propose a faster attention kernel for long documents",
        "transformers running on small images",
    ]
    references = [
        "a faster attention kernel is proposed for long sequences",
        "vision transformers work on small images when trained with augmentation",
    ]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    ours = rouge_scores(predictions, references)
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = 100 * sum(d[rouge_type].fmeasure for d in direct) / len(direct)
        for suffix in ("", "_mean", "_first"):
            assert ours[rouge_type + suffix] == pytest.approx(expected)


def test_rouge_lsum_uses_sentence_splitting():
    prediction = "The model is fast. It uses less memory."
    reference = "It uses less memory. The model is fast."
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    expected = scorer.score(
        "It uses less memory.\nThe model is fast.", "The model is fast.\nIt uses less memory."
    )
    ours = rouge_scores([prediction], [reference])
    assert ours["rougeLsum"] == pytest.approx(100 * expected["rougeLsum"].fmeasure)
    assert ours["rougeL"] == pytest.approx(100 * expected["rougeL"].fmeasure)
    assert ours["rougeLsum"] == pytest.approx(100.0)  # sentence-level LCS: order of sentences is free
    assert ours["rougeL"] < 100.0


def test_rouge_multi_reference_max_mean_first():
    prediction = "alpha beta gamma delta"
    # ref A: every unigram, no bigram (R1 = 1, R2 = 0); ref B: half the unigrams but bigram "alpha
    # beta" (R1 = 0.5, R2 = 1/3). The SciTLDR max picks A by ROUGE-1 and keeps A's ROUGE-2 = 0,
    # where a per-type max would report 1/3.
    refs = ["alpha gamma beta delta", "alpha beta omega sigma"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    a, b = (scorer.score(ref, prediction) for ref in refs)
    assert a["rouge1"].fmeasure == pytest.approx(1.0) and a["rouge2"].fmeasure == 0.0
    assert b["rouge2"].fmeasure == pytest.approx(1 / 3)

    # second example, single reference given as a plain string
    ours = rouge_scores([prediction, prediction], [refs, "alpha beta gamma delta"])
    assert ours["rouge1"] == pytest.approx(100 * (1.0 + 1.0) / 2)
    assert ours["rouge2"] == pytest.approx(100 * (0.0 + 1.0) / 2)
    assert ours["rougeL"] == pytest.approx(100 * (a["rougeL"].fmeasure + 1.0) / 2)
    mean_r2 = (a["rouge2"].fmeasure + b["rouge2"].fmeasure) / 2
    assert ours["rouge2_mean"] == pytest.approx(100 * (mean_r2 + 1.0) / 2)
    assert ours["rouge1_mean"] == pytest.approx(100 * ((1.0 + 0.5) / 2 + 1.0) / 2)
    # author-only = first reference, which here is A
    assert ours["rouge2_first"] == pytest.approx(ours["rouge2"])
    reversed_refs = rouge_scores([prediction], [refs[::-1]])
    assert reversed_refs["rouge1_first"] == pytest.approx(50.0)
    assert reversed_refs["rouge1"] == pytest.approx(100.0)
    assert reversed_refs["rouge2"] == pytest.approx(0.0)


def test_rouge_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


def test_split_sentences_and_first_sentence_baseline():
    text = 'We use the U.S. data (see Fig. 2). Results improve by 3.5 points! Is it so? "Yes." Done'
    assert split_sentences(text) == [
        "We use the U.S. data (see Fig. 2).",
        "Results improve by 3.5 points!",
        "Is it so?",
        '"Yes."',
        "Done",
    ]
    assert split_sentences("one line\nsecond line") == ["one line", "second line"]
    assert first_sentence_baseline(text) == "We use the U.S. data (see Fig. 2)."
    assert first_sentence_baseline(["First given sentence.", "Second."]) == "First given sentence."
    assert first_sentence_baseline("") == ""


# ---------------------------------------------------------------------------------------------- misc


def test_accuracy():
    assert accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        accuracy([1, 2], [1, 2, 3])


def test_load_metric_offline_falls_back(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    squad = load_metric("squad")
    assert isinstance(squad, LocalMetric)
    result = squad.compute(
        predictions=[{"id": "q1", "prediction_text": "Paris"}, {"id": "q2", "prediction_text": "x"}],
        references=[
            {"id": "q1", "answers": {"text": ["paris"], "answer_start": [0]}},
            {"id": "q2", "answers": {"text": ["y"], "answer_start": [0]}},
        ],
    )
    assert result == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(50.0)}
    assert load_metric("accuracy").compute(predictions=[0, 1], references=[0, 0]) == {"accuracy": 0.5}
    rouge = load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat ran"])
    assert rouge["rouge1"] == pytest.approx(2 / 3)  # evaluate's scale: a fraction
    with pytest.raises(ValueError, match="no offline implementation"):
        load_metric("bleurt")
