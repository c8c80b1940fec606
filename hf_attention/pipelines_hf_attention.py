"""Summarization and extractive question-answering pipelines, which transformers 5.x removed.

This file is copied next to every saved hf_attention model and named in the config's `custom_pipelines`, so
`pipeline("summarization" | "question-answering", model=folder, trust_remote_code=True)` keeps working on machines
without our package. It is loaded as remote code: standard library, numpy, torch and transformers imports only, no
relative or `hf_attention.` imports. Nothing in it is specific to hf_attention models: transformers' own seq2seq and
QA models work too (`HfAttentionQuestionAnsweringPipeline(model=bert, tokenizer=tokenizer)`).

The span search (`best_spans`, `postprocess_qa_predictions`) is plain numpy so training recipes use the same code
for SQuAD evaluation as the pipeline does for inference.
"""

import inspect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.pipelines.base import ChunkPipeline, Pipeline
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

__all__ = [
    "HfAttentionQuestionAnsweringPipeline",
    "HfAttentionSummarizationPipeline",
    "QaSpan",
    "best_spans",
    "postprocess_qa_predictions",
    "span_log_partition",
]

Offsets = Sequence[Sequence[int] | None]


# --------------------------------------------------------------------------------------------------------------------
# Span decoding (framework-free, shared by the pipeline and SQuAD evaluation)
# --------------------------------------------------------------------------------------------------------------------


class QaSpan(NamedTuple):
    """One candidate answer: character offsets into the context and where it came from."""

    start: int
    end: int
    logit: float  # start_logit + end_logit: the SQuAD ranking score, comparable across windows
    feature: int  # index of the window (feature) the best occurrence came from
    start_token: int
    end_token: int


def _valid_mask(offsets: Offsets, n: int) -> np.ndarray:
    """Context tokens are those with an offset; `None` marks question, special and padding tokens (run_qa style)."""
    return np.array([offsets[i] is not None and len(offsets[i]) == 2 for i in range(n)], dtype=bool)


def _max_context_mask(token_is_max_context: Any, n: int) -> np.ndarray:
    """Accept run_qa's `{"17": True}` dicts as well as boolean sequences."""
    if isinstance(token_is_max_context, Mapping):
        return np.array([bool(token_is_max_context.get(str(i), token_is_max_context.get(i, False))) for i in range(n)])
    mask = np.zeros(n, dtype=bool)
    values = np.asarray(token_is_max_context, dtype=bool)[:n]
    mask[: len(values)] = values
    return mask


def best_spans(
    start_logits: Sequence[Sequence[float]] | np.ndarray,
    end_logits: Sequence[Sequence[float]] | np.ndarray,
    offset_mappings: Sequence[Offsets],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    token_is_max_context: Sequence[Any] | None = None,
) -> list[QaSpan]:
    """The `n_best_size` best distinct character spans of one example, over all of its windows, best first.

    Exact: every (start, end) token pair with both tokens in the context, `start <= end` and at most
    `max_answer_length` tokens is scored `start_logit + end_logit` (logits are not normalised per window, so windows
    compare as in the SQuAD scripts), unlike the top-20-starts x top-20-ends shortcut of transformers' QA example
    (`utils_qa.py`). Spans found in several overlapping windows are kept once, with their best score.

    `start_logits[f]`, `end_logits[f]` and `offset_mappings[f]` describe window `f`; logit rows may be longer than
    the offsets (padding) and are cut to them. `token_is_max_context[f]` (optional) restricts starts as in BERT's
    SQuAD code.
    """
    if n_best_size <= 0 or max_answer_length <= 0:
        return []
    logits, metas = [], []
    for feature, offsets in enumerate(offset_mappings):
        starts = np.asarray(start_logits[feature], dtype=np.float64).reshape(-1)
        ends = np.asarray(end_logits[feature], dtype=np.float64).reshape(-1)
        n = min(len(offsets), len(starts), len(ends))
        if n == 0:
            continue
        valid = _valid_mask(offsets, n)
        start_ok = valid.copy()
        if token_is_max_context is not None and token_is_max_context[feature] is not None:
            start_ok &= _max_context_mask(token_is_max_context[feature], n)
        # Banded candidate matrix: row i holds spans (i, i), (i, i + 1), ... (i, i + width - 1).
        width = min(max_answer_length, n)
        start_idx = np.arange(n)[:, None]
        end_idx = start_idx + np.arange(width)[None, :]
        inside = end_idx < n
        end_idx = np.minimum(end_idx, n - 1)
        ok = inside & start_ok[:, None] & valid[end_idx]
        rows, cols = np.nonzero(ok)
        if len(rows) == 0:
            continue
        logits.append(starts[rows] + ends[end_idx[rows, cols]])
        metas.append(np.stack([np.full(len(rows), feature), rows, end_idx[rows, cols]], axis=1))
    if not logits:
        return []
    all_logits, all_metas = np.concatenate(logits), np.concatenate(metas)
    total = len(all_logits)
    # Take the top m candidates, keep distinct character spans; widen m only if duplicates ate too many.
    m = min(total, 4 * n_best_size + 16)
    while True:
        top = np.argpartition(-all_logits, m - 1)[:m] if m < total else np.arange(total)
        top = top[np.argsort(-all_logits[top], kind="stable")]
        spans: list[QaSpan] = []
        seen: set[tuple[int, int]] = set()
        for index in top:
            feature, start_token, end_token = (int(x) for x in all_metas[index])
            offsets = offset_mappings[feature]
            key = (int(offsets[start_token][0]), int(offsets[end_token][1]))
            if key in seen:
                continue
            seen.add(key)
            spans.append(QaSpan(*key, float(all_logits[index]), feature, start_token, end_token))
            if len(spans) == n_best_size:
                return spans
        if m == total:
            return spans
        m = min(total, 4 * m)


def span_log_partition(
    start_logits: Sequence[Sequence[float]] | np.ndarray,
    end_logits: Sequence[Sequence[float]] | np.ndarray,
    offset_mappings: Sequence[Offsets],
    null_indices: Sequence[int | None] | None = None,
) -> float:
    """log Z such that `exp(span.logit - log Z) = p_start * p_end`, one softmax over all windows' context tokens.

    For a single window this is the score of transformers 4.x's QA pipeline (softmax over context tokens plus the
    CLS token); over several windows one joint normalisation keeps scores comparable, where 4.x normalised each
    window alone. `null_indices[f]` (the CLS position of window `f`) joins the normalisation when given.
    """
    starts, ends = [], []
    for feature, offsets in enumerate(offset_mappings):
        s = np.asarray(start_logits[feature], dtype=np.float64).reshape(-1)
        e = np.asarray(end_logits[feature], dtype=np.float64).reshape(-1)
        n = min(len(offsets), len(s), len(e))
        keep = _valid_mask(offsets, n)
        if null_indices is not None and null_indices[feature] is not None and null_indices[feature] < n:
            keep[null_indices[feature]] = True
        starts.append(s[:n][keep])
        ends.append(e[:n][keep])
    s, e = np.concatenate(starts), np.concatenate(ends)
    if len(s) == 0:
        return math.inf
    return float(np.logaddexp.reduce(s) + np.logaddexp.reduce(e))


def _column(rows: Any, key: str) -> list:
    """A column of a `datasets.Dataset` (fast path) or of a sequence of dicts."""
    if hasattr(rows, "column_names"):
        return list(rows[key]) if key in rows.column_names else [None] * len(rows)
    return [row.get(key) for row in rows]


def postprocess_qa_predictions(
    examples: Any,
    features: Any,
    start_logits: Sequence[Sequence[float]] | np.ndarray,
    end_logits: Sequence[Sequence[float]] | np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
    cls_index: int = 0,
) -> dict[Any, str]:
    """SQuAD predictions `{example_id: answer_text}` from per-feature logits, as transformers' `run_qa.py` evaluates.

    `examples` rows have `id` and `context`; `features` rows (one per window) have `example_id` and `offset_mapping`
    with `None` for every non-context token, optionally `token_is_max_context`; `start_logits[i]` / `end_logits[i]`
    belong to `features[i]`. Each example's best span over all its windows comes from `best_spans`. With
    `version_2_with_negative`, the answer is "" when the null score (the smallest `start[cls] + end[cls]` over the
    windows, SQuAD v2 convention) beats the best span by more than `null_score_diff_threshold`.
    """
    ids, contexts = _column(examples, "id"), _column(examples, "context")
    feature_example_ids = _column(features, "example_id")
    offset_mappings = _column(features, "offset_mapping")
    max_context = _column(features, "token_is_max_context")
    features_per_example: dict[Any, list[int]] = defaultdict(list)
    for index, example_id in enumerate(feature_example_ids):
        features_per_example[example_id].append(index)

    predictions: dict[Any, str] = {}
    for example_id, context in zip(ids, contexts):
        indices = features_per_example.get(example_id, [])
        starts = [start_logits[i] for i in indices]
        ends = [end_logits[i] for i in indices]
        max_context_rows = [max_context[i] for i in indices]
        spans = best_spans(
            starts, ends, [offset_mappings[i] for i in indices], n_best_size=1, max_answer_length=max_answer_length,
            token_is_max_context=max_context_rows if any(row is not None for row in max_context_rows) else None,
        )
        text = context[spans[0].start : spans[0].end] if spans else ""
        if version_2_with_negative and indices:
            null_logit = min(float(s[cls_index]) + float(e[cls_index]) for s, e in zip(starts, ends))
            if not spans or null_logit - spans[0].logit > null_score_diff_threshold:
                text = ""
        predictions[example_id] = text
    return predictions


# --------------------------------------------------------------------------------------------------------------------
# Shared pipeline helpers
# --------------------------------------------------------------------------------------------------------------------


def _restore_custom_pipelines(config: Any) -> None:
    """Undo `pipeline()`'s in-place edit of `config.custom_pipelines` (model class names become classes).

    transformers' `clean_custom_task` mutates the config's own dict, after which `model.save_pretrained` cannot write
    the config as JSON. Put the names back.
    """
    for info in (getattr(config, "custom_pipelines", None) or {}).values():
        if isinstance(info, dict) and "pt" in info:
            names = [info["pt"]] if isinstance(info["pt"], (str, type)) else info["pt"]
            info["pt"] = [name if isinstance(name, str) else name.__name__ for name in names]


def _max_input_length(model: Any, tokenizer: Any) -> int:
    """What the encoder can take: the tokenizer's limit, capped by the model's position table (BERT-style models
    with learned positions fail beyond it; tokenizers often claim 512 or "infinite")."""
    limit = getattr(tokenizer, "model_max_length", None) or 10**9
    positions = getattr(model.config, "max_position_embeddings", None)
    return int(min(limit, positions)) if isinstance(positions, int) and positions > 0 else int(min(limit, 10**9))


def _forward_accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True


# --------------------------------------------------------------------------------------------------------------------
# Summarization
# --------------------------------------------------------------------------------------------------------------------


class HfAttentionSummarizationPipeline(Pipeline):
    """Text in, `[{"summary_text": ...}]` out, through `model.generate` (transformers 4.x `SummarizationPipeline`).

    Generation settings come from the model's `generation_config`; any `generate()` keyword (`max_new_tokens`,
    `max_length`, `min_length`, `num_beams`, `num_return_sequences`, `generation_config`, ...) given at construction
    or per call overrides them, so a default call decodes exactly what `model.generate(**inputs)` returns.

    Call arguments: `truncation` (cut inputs to what the tokenizer and the position table allow), `prefix` (default:
    `config.prefix` or `config.task_specific_params["summarization"]["prefix"]`), `return_text`, `return_tensors`
    (`summary_token_ids`; alone it replaces the text as in 4.x), `clean_up_tokenization_spaces`, `stop_sequence`.
    A list of texts gives a list of results (batched with `batch_size`).
    """

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    return_name = "summary"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.model.can_generate():
            raise ValueError(
                f"{type(self.model).__name__} cannot generate; summarization needs a seq2seq model such as "
                "AutoModelForSeq2SeqLM."
            )
        if self.tokenizer is None:
            raise ValueError("The summarization pipeline needs a tokenizer.")
        _restore_custom_pipelines(self.model.config)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            logger.warning(f"{type(self.model).__name__} is not an encoder-decoder: summaries will repeat the input.")
        if not self.prefix:
            task_params = getattr(self.model.config, "task_specific_params", None) or {}
            self.prefix = (task_params.get("summarization") or {}).get("prefix")

    def _sanitize_parameters(
        self,
        return_text: bool | None = None,
        return_tensors: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
        truncation: bool | str | None = None,
        prefix: str | None = None,
        stop_sequence: str | list[str] | None = None,
        **generate_kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess_params: dict[str, Any] = {}
        if truncation is not None:
            preprocess_params["truncation"] = truncation
        if prefix is not None:
            preprocess_params["prefix"] = prefix
        if stop_sequence is not None:
            generate_kwargs["stop_strings"] = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
            generate_kwargs["tokenizer"] = self.tokenizer
        postprocess_params: dict[str, Any] = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = return_tensors
            if return_tensors and return_text is None:
                postprocess_params["return_text"] = False  # 4.x: tensors instead of text unless both are asked
        if return_text is not None:
            postprocess_params["return_text"] = return_text
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        return preprocess_params, generate_kwargs, postprocess_params

    def __call__(self, inputs: str | list[str] | Any, **kwargs: Any) -> Any:
        """`[{"summary_text"}]` for a text; for a list, one dict per text (a list of them with several sequences)."""
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(isinstance(r, list) and len(r) == 1 for r in result):
            return [r[0] for r in result]
        return result

    def preprocess(
        self, text: str, truncation: bool | str | None = None, prefix: str | None = None
    ) -> dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise TypeError(f"Summarization inputs are strings (or lists of them), got {type(text).__name__}.")
        prefix = self.prefix if prefix is None else prefix
        tokenizer_kwargs: dict[str, Any] = {}
        if truncation:
            tokenizer_kwargs = {"truncation": truncation, "max_length": _max_input_length(self.model, self.tokenizer)}
        inputs = self.tokenizer((prefix or "") + text, return_tensors="pt", **tokenizer_kwargs)
        # Tokenizers add token_type_ids that seq2seq models' generate() rejects.
        return {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        in_b = model_inputs["input_ids"].shape[0]
        output = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))
        if isinstance(output, ModelOutput):
            output = output.sequences
        return {"output_ids": output.reshape(in_b, output.shape[0] // in_b, *output.shape[1:])}

    def postprocess(
        self,
        model_outputs: dict[str, torch.Tensor],
        return_text: bool = True,
        return_tensors: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[dict[str, Any]]:
        records = []
        for output_ids in model_outputs["output_ids"][0]:
            record: dict[str, Any] = {}
            if return_tensors:
                record[f"{self.return_name}_token_ids"] = output_ids.tolist()
            if return_text:
                record[f"{self.return_name}_text"] = self.tokenizer.decode(
                    output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces
                )
            records.append(record)
        return records


# --------------------------------------------------------------------------------------------------------------------
# Extractive question answering
# --------------------------------------------------------------------------------------------------------------------


def _as_example(item: Any) -> dict[str, str]:
    if isinstance(item, Mapping) and "question" in item and "context" in item:
        question, context = item["question"], item["context"]
    elif hasattr(item, "question_text") and hasattr(item, "context_text"):  # 4.x SquadExample
        question, context = item.question_text, item.context_text
    else:
        raise ValueError(f"A question-answering input is a dict with 'question' and 'context', got {item!r}.")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("`question` must be a non-empty string.")
    if not isinstance(context, str) or not context.strip():
        raise ValueError("`context` must be a non-empty string.")
    return {"question": question, "context": context}


class HfAttentionQuestionAnsweringPipeline(ChunkPipeline):
    """Extractive QA (transformers 4.x `QuestionAnsweringPipeline`): `{"score", "start", "end", "answer"}`.

    Inputs: `question=` and `context=` (strings or lists; a single string is broadcast against a list), a dict
    `{"question", "context"}` or a list of them, or `(question, context)` positionally. Contexts longer than
    `max_seq_len` tokens are cut into windows overlapping by `doc_stride` tokens (offset mappings from a fast
    tokenizer); the answer is the best span over all windows (`best_spans`), restricted to context tokens and to
    `max_answer_len` tokens. `start`/`end` are character offsets: `answer == context[start:end]`.

    `score` is `p_start * p_end` with one softmax over the context (and CLS) tokens of all windows: for one window
    it equals 4.x's score; across windows it ranks like the SQuAD scripts (`start_logit + end_logit`), where 4.x
    compared per-window probabilities. `top_k > 1` returns a list, best first. `handle_impossible_answer` adds the
    null answer `{"answer": "", "start": 0, "end": 0}` scored by the CLS logits (smallest over windows).
    `align_to_words` (default True, as 4.x) widens answers to whole words.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("The question-answering pipeline needs a fast tokenizer (offset mappings).")
        _restore_custom_pipelines(self.model.config)
        self._model_input_names = [
            name for name in ("input_ids", "attention_mask", "token_type_ids") if _forward_accepts(self.model, name)
        ]

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        doc_stride: int | None = None,
        max_answer_len: int | None = None,
        max_seq_len: int | None = None,
        handle_impossible_answer: bool | None = None,
        align_to_words: bool | None = None,
        padding: bool | str | None = None,
        topk: int | None = None,
        max_question_len: int | None = None,
        **unexpected: Any,
    ) -> tuple[dict, dict, dict]:
        # `topk` and `max_question_len` (slow tokenizers only) are 4.x names, accepted so old calls keep working.
        if unexpected:
            raise TypeError(f"Unexpected question-answering arguments: {', '.join(sorted(unexpected))}.")
        top_k = topk if top_k is None else top_k
        preprocess_params: dict[str, Any] = {}
        for name, value in (("doc_stride", doc_stride), ("max_seq_len", max_seq_len), ("padding", padding)):
            if value is not None:
                preprocess_params[name] = value
        postprocess_params: dict[str, Any] = {}
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k={top_k} is not valid; it must be at least 1.")
            postprocess_params["top_k"] = top_k
        if max_answer_len is not None:
            if max_answer_len < 1:
                raise ValueError(f"max_answer_len={max_answer_len} is not valid; it must be at least 1.")
            postprocess_params["max_answer_len"] = max_answer_len
        if handle_impossible_answer is not None:
            postprocess_params["handle_impossible_answer"] = handle_impossible_answer
        if align_to_words is not None:
            postprocess_params["align_to_words"] = align_to_words
        return preprocess_params, {}, postprocess_params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One example gives a dict (a list with `top_k > 1`); several give a list of those."""
        question, context = kwargs.pop("question", None), kwargs.pop("context", None)
        if question is not None or context is not None:
            if args:
                raise ValueError("Pass either `question=`/`context=` or positional inputs, not both.")
            if question is None or context is None:
                raise ValueError("Both `question` and `context` are required.")
            if isinstance(question, str) and isinstance(context, str):
                return super().__call__({"question": question, "context": context}, **kwargs)
            questions = [question] * len(context) if isinstance(question, str) else list(question)
            contexts = [context] * len(questions) if isinstance(context, str) else list(context)
            if len(questions) != len(contexts):
                raise ValueError(f"Got {len(questions)} questions for {len(contexts)} contexts.")
            return super().__call__([{"question": q, "context": c} for q, c in zip(questions, contexts)], **kwargs)
        if len(args) == 2 and all(isinstance(arg, str) for arg in args):
            return super().__call__({"question": args[0], "context": args[1]}, **kwargs)
        if len(args) != 1:
            raise ValueError("Pass `question=` and `context=`, a dict, or a list/iterable of dicts.")
        # A dict is one example; a list (or tuple) of them gives a list; generators and datasets stream.
        inputs = list(args[0]) if isinstance(args[0], tuple) else args[0]
        return super().__call__(inputs, **kwargs)

    def _default_max_seq_len(self) -> int:
        return min(384, _max_input_length(self.model, self.tokenizer))

    def preprocess(
        self,
        example: Any,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        padding: bool | str = False,
    ) -> Iterable[dict[str, Any]]:
        example = _as_example(example)
        max_seq_len = max_seq_len or self._default_max_seq_len()
        doc_stride = min(128, max_seq_len // 2) if doc_stride is None else doc_stride
        if not 0 <= doc_stride < max_seq_len:
            raise ValueError(f"doc_stride={doc_stride} must be in [0, max_seq_len={max_seq_len}).")
        question, context = example["question"].lstrip(), example["context"]
        # Question first unless the tokenizer pads on the left (XLNet-style), as 4.x did.
        question_first = self.tokenizer.padding_side == "right"
        context_index = 1 if question_first else 0
        encoded = self.tokenizer(
            question if question_first else context,
            context if question_first else question,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            padding=padding,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        num_windows = len(encoded["input_ids"])
        windows = []
        word_spans: dict[int, list[int]] = {}  # word index in the context -> [first char, last char]
        for w in range(num_windows):
            sequence_ids, word_ids = encoded.sequence_ids(w), encoded.word_ids(w)
            offsets = [
                (int(o[0]), int(o[1])) if s == context_index else None
                for o, s in zip(encoded["offset_mapping"][w], sequence_ids)
            ]
            for offset, word in zip(offsets, word_ids):
                if offset is not None and word is not None:
                    span = word_spans.setdefault(word, [offset[0], offset[1]])
                    span[0], span[1] = min(span[0], offset[0]), max(span[1], offset[1])
            windows.append((offsets, word_ids))
        cls_id = self.tokenizer.cls_token_id
        for w, (offsets, word_ids) in enumerate(windows):
            word_offsets = [
                None if o is None else tuple(word_spans[word]) if word is not None else o
                for o, word in zip(offsets, word_ids)
            ]
            ids = encoded["input_ids"][w]
            cls_index = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
            item: dict[str, Any] = {
                name: torch.tensor([encoded[name][w]]) for name in self._model_input_names if name in encoded
            }
            item.update(
                offsets=offsets, word_offsets=word_offsets, cls_index=cls_index, example=example,
                is_last=w == num_windows - 1,
            )
            yield item

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        model_inputs = {name: inputs[name] for name in self._model_input_names if name in inputs}
        output = self.model(**model_inputs)
        if isinstance(output, Mapping):
            start, end = output["start_logits"], output["end_logits"]
        else:
            start, end = output[0], output[1]
        return {"start": start, "end": end, **{k: v for k, v in inputs.items() if k not in model_inputs}}

    def postprocess(
        self,
        all_outputs: list[dict[str, Any]],
        top_k: int = 1,
        max_answer_len: int = 15,
        handle_impossible_answer: bool = False,
        align_to_words: bool = True,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        starts, ends, offsets, cls_indices = [], [], [], []
        for output in all_outputs:
            n = len(output["offsets"])
            start, end = output["start"][0].float().numpy(), output["end"][0].float().numpy()
            if len(start) > n:  # padded in a batch: drop the padding, on whichever side it is
                keep = slice(len(start) - n, None) if self.tokenizer.padding_side == "left" else slice(0, n)
                start, end = start[keep], end[keep]
            starts.append(start)
            ends.append(end)
            offsets.append(output["word_offsets"] if align_to_words else output["offsets"])
            cls_indices.append(output["cls_index"])
        context = all_outputs[0]["example"]["context"]
        spans = best_spans(starts, ends, offsets, n_best_size=top_k, max_answer_length=max_answer_len)
        log_z = span_log_partition(starts, ends, offsets, null_indices=cls_indices)
        answers = [
            {"score": math.exp(span.logit - log_z), "start": span.start, "end": span.end,
             "answer": context[span.start : span.end]}
            for span in spans
        ]
        if handle_impossible_answer:
            null_logit = min(float(s[c] + e[c]) for s, e, c in zip(starts, ends, cls_indices))
            answers.append({"score": math.exp(null_logit - log_z), "start": 0, "end": 0, "answer": ""})
            answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
        if top_k == 1:
            return answers[0] if answers else {"score": 0.0, "start": 0, "end": 0, "answer": ""}
        return answers
