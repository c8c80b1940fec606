"""Metrics that work offline: SQuAD v1.1 EM/F1, ROUGE (SciTLDR protocol) and accuracy.

`evaluate.load("squad")`/`("rouge")` fetch their scripts from the Hub, which is unreachable here, so
the recipes score with these implementations. SQuAD EM/F1 is checked against the official numbers
of five leaderboard systems (see tests/test_metrics.py); ROUGE wraps Google's `rouge_score`.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ROUGE_TYPES",
    "accuracy",
    "exact_match_score",
    "f1_score",
    "first_sentence_baseline",
    "input_dependence",
    "input_dependence_warning",
    "load_metric",
    "normalize_answer",
    "rouge_scores",
    "split_sentences",
    "squad_references_from_json",
    "squad_v1_scores",
]

# --------------------------------------------------------------------------------------------------
# SQuAD v1.1
# --------------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Normalize an answer the way SQuAD v1.1 scoring does.

    Order matters (it is the official one): lowercase, drop ASCII punctuation, drop the articles
    a/an/the as whole words, then collapse whitespace. Dropping punctuation first means "the-end"
    becomes "theend" (kept) while "the, end" loses its article.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between normalized answers, counting repeated tokens with multiplicity.

    As in v1.1 (unlike v2.0), no token overlap gives 0 even when both sides normalize to empty.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """SQuAD v1.1 exact match and F1 in percent, averaged over every question in `references`.

    Each question scores its best match over its gold answers; a question without a prediction
    scores 0 (so a system that skips questions is not rewarded), and predictions for ids outside
    `references` are ignored. Returns {"exact_match", "f1", "total", "missing"}.
    """
    total = len(references)
    if total == 0:
        raise ValueError("squad_v1_scores: references is empty, there is nothing to score")
    exact = f1 = 0.0
    missing = 0
    for qid, golds in references.items():
        if isinstance(golds, str):
            golds = [golds]
        if not golds:
            raise ValueError(f"squad_v1_scores: question {qid!r} has no gold answers")
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        exact += max(exact_match_score(prediction, gold) for gold in golds)
        f1 += max(f1_score(prediction, gold) for gold in golds)
    return {
        "exact_match": 100.0 * exact / total,
        "f1": 100.0 * f1 / total,
        "total": total,
        "missing": missing,
    }


def squad_references_from_json(path: str | os.PathLike) -> dict[str, list[str]]:
    """Map question id -> gold answer texts from a SQuAD v1.1-format JSON file."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as fh:
            dataset = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
        # ValueError, not TypeError: the file's content is bad, not the caller's argument.
        expected = "a top-level object with a 'data' list"
        raise ValueError(f"{path}: not SQuAD format (expected {expected})")  # noqa: TRY004
    references: dict[str, list[str]] = {}
    try:
        for article in dataset["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    references[qa["id"]] = [answer["text"] for answer in qa["answers"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: malformed SQuAD entry, missing or wrong field {err}") from err
    return references


# --------------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket) when whitespace and
# then an upper-case letter (maybe after an opening quote/bracket) follow; not before a digit, so
# "Fig. 2" and "Eq. 3" stay whole. Deliberately simple and deterministic: nltk's punkt needs a data
# download, and rougeLsum must not change with the machine.
_SENTENCE_BOUNDARY = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a regex; existing newlines are also boundaries."""
    sentences: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            sentences.extend(s.strip() for s in _SENTENCE_BOUNDARY.split(line) if s.strip())
    return sentences


def first_sentence_baseline(text: str | Sequence[str]) -> str:
    """First sentence of the source: the extractive "Lead-1" baseline row for SciTLDR.

    Accepts the abstract as one string or as SciTLDR's list of source sentences (then the first
    element is the first sentence as the dataset segmented it).
    """
    if not isinstance(text, str):
        return str(text[0]).strip() if len(text) else ""
    sentences = split_sentences(text)
    return sentences[0] if sentences else ""


def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    use_stemmer: bool = True,
) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure x100, averaged over examples.

    Texts are re-joined one sentence per line because `rouge_score` computes rougeLsum over
    newline-separated sentences (without newlines it silently equals rougeL); the other types
    ignore newlines. With several references per example three aggregates are returned, as the
    SciTLDR evaluation does: `<type>` is the multi-target max (per example the reference with the
    highest ROUGE-1 F, first one on ties, and that reference's scores for every type),
    `<type>_mean` averages over references and `<type>_first` uses only the first (author) one.
    With one reference per example the three agree.
    """
    if len(predictions) != len(references):
        raise ValueError(f"rouge_scores: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_scores: no predictions to score")
    scorer = _rouge_scorer(use_stemmer)
    totals = {f"{t}{suffix}": 0.0 for t in ROUGE_TYPES for suffix in ("", "_mean", "_first")}
    for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(refs, str):
            refs = [refs]
        if not refs:
            raise ValueError(f"rouge_scores: example {i} has no reference")
        prediction = "\n".join(split_sentences(prediction))
        per_ref = [scorer.score("\n".join(split_sentences(ref)), prediction) for ref in refs]
        best = int(np.argmax([s["rouge1"].fmeasure for s in per_ref]))
        for rouge_type in ROUGE_TYPES:
            fs = [s[rouge_type].fmeasure for s in per_ref]
            totals[rouge_type] += fs[best]
            totals[f"{rouge_type}_mean"] += sum(fs) / len(fs)
            totals[f"{rouge_type}_first"] += fs[0]
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}


# --------------------------------------------------------------------------------------------------
# Does the output depend on the input? (degenerate generation)
# --------------------------------------------------------------------------------------------------

# Below these a model's outputs are flagged as not depending on its input: fewer than half of the predictions
# distinct, or a loss on shuffled sources less than 2% above the loss on the true ones.
MIN_DISTINCT_FRACTION = 0.5
MIN_SHUFFLED_LOSS_GAP = 0.02


def input_dependence(
    predictions: Sequence[str] | None = None, loss: float | None = None, shuffled_loss: float | None = None
) -> dict[str, float]:
    """`distinct_predictions` (fraction of distinct generated texts) given predictions and, given both losses,
    `shuffled_source_loss` and `shuffled_source_loss_gap` (its excess over the true sources' loss, relative).

    A model that writes one sentence for every input can still score a plausible-looking ROUGE (a generic
    sentence overlaps every reference a little); these two numbers show it. A model that reads its input
    has a clearly higher loss when each summary is paired with another example's source.
    """
    scores: dict[str, float] = {}
    if predictions is not None:
        if not predictions:
            raise ValueError("input_dependence: no predictions")
        scores["distinct_predictions"] = len(set(predictions)) / len(predictions)
    if loss is not None and shuffled_loss is not None:
        scores["shuffled_source_loss"] = shuffled_loss
        scores["shuffled_source_loss_gap"] = (shuffled_loss - loss) / loss if loss > 0 else 0.0
    return scores


def input_dependence_warning(metrics: Mapping[str, float], prefix: str) -> str | None:
    """A warning naming the evidence when `<prefix>_*` metrics show outputs that do not depend on the input."""
    samples = int(metrics.get(f"{prefix}_samples", 0))
    distinct = metrics.get(f"{prefix}_distinct_predictions")
    gap = metrics.get(f"{prefix}_shuffled_source_loss_gap")
    reasons = []
    if distinct is not None and samples > 1 and distinct < MIN_DISTINCT_FRACTION:
        count = max(1, round(distinct * samples))
        reasons.append(f"only {count} distinct prediction(s) among {samples} ({prefix}_distinct_predictions "
                       f"{distinct:.3f} < {MIN_DISTINCT_FRACTION})")
    if gap is not None and gap < MIN_SHUFFLED_LOSS_GAP:
        shuffled, true = metrics.get(f"{prefix}_shuffled_source_loss"), metrics.get(f"{prefix}_loss")
        losses = f" ({shuffled:.4f} vs {true:.4f})" if shuffled is not None and true is not None else ""
        reasons.append(f"the loss with each summary paired with another example's source is within "
                       f"{MIN_SHUFFLED_LOSS_GAP:.0%} of the loss on its own source{losses}")
    if not reasons:
        return None
    return (f"WARNING: {prefix}: the outputs do not depend on the input: {'; and '.join(reasons)}. "
            "Its scores measure one generic output against the references, not summarization; compare the "
            "first-sentence baseline, and train longer or check the data (--text_column, --summary_column).")


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[Any] | np.ndarray, references: Sequence[Any] | np.ndarray) -> float:
    """Fraction (0..1) of predictions equal to their reference; lengths must match."""
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.shape != refs.shape:
        raise ValueError(f"accuracy: predictions shape {preds.shape} != references shape {refs.shape}")
    if preds.size == 0:
        raise ValueError("accuracy: no predictions to score")
    return float(np.mean(preds == refs))


# --------------------------------------------------------------------------------------------------
# evaluate-compatible front door
# --------------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class LocalMetric:
    """Offline stand-in for an `evaluate` metric: same `compute(predictions=, references=)` inputs
    and output keys/scales as evaluate's squad, rouge and accuracy, so callers need not care which
    one `load_metric` returned."""

    def __init__(self, name: str):
        if name not in {"squad", "rouge", "accuracy"}:
            raise ValueError(f"no offline implementation of metric {name!r}; have squad, rouge, accuracy")
        self.name = name

    def __repr__(self) -> str:
        return f"LocalMetric({self.name!r})"

    def compute(self, *, predictions, references, **kwargs) -> dict:
        if self.name == "accuracy":
            return {"accuracy": accuracy(predictions, references)}
        if self.name == "squad":
            # evaluate's squad format: [{"id", "prediction_text"}], [{"id", "answers": {"text": [...]}}]
            preds = {p["id"]: p["prediction_text"] for p in predictions}
            refs = {r["id"]: list(r["answers"]["text"]) for r in references}
            scores = squad_v1_scores(preds, refs)
            return {"exact_match": scores["exact_match"], "f1": scores["f1"]}
        # rouge, as evaluate reports it: fractions, stemming off by default, multi-reference by
        # per-type max, rougeLsum over whatever newlines the caller put in.
        from rouge_score import rouge_scorer

        rouge_types = kwargs.get("rouge_types", list(ROUGE_TYPES))
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=kwargs.get("use_stemmer", False))
        sums = dict.fromkeys(rouge_types, 0.0)
        for prediction, refs in zip(predictions, references, strict=True):
            refs = [refs] if isinstance(refs, str) else list(refs)
            score = scorer.score_multi(refs, prediction)
            for rouge_type in rouge_types:
                sums[rouge_type] += score[rouge_type].fmeasure
        return {k: v / max(len(predictions), 1) for k, v in sums.items()}


def load_metric(name: str):
    """`evaluate.load(name)` when the Hub may be reached, else (or if that fails) a `LocalMetric`.

    With HF_HUB_OFFLINE/HF_EVALUATE_OFFLINE set a Hub name is not even tried (it costs ~50 s of
    retries before failing); a local metric-script path is always tried. `evaluate` is imported
    here only, because importing it takes several seconds.
    """
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_EVALUATE_OFFLINE")
    if not offline or Path(name).exists():
        try:
            import evaluate

            return evaluate.load(name)
        except Exception:  # any failure (network, missing script) means use ours
            if Path(name).exists():
                raise
    return LocalMetric(name)
