"""Abstractive summarization with any attention variant (or any seq2seq checkpoint), launched by accelerate.

    accelerate launch recipes/summarization.py --config configs/recipes/summarization_quick.yaml \
        --output_dir out/scitldr --attention_type sparse --sparse_pattern local --position_embedding_type relative

The flags are those of transformers' `run_summarization_no_trainer.py` (`--text_column`, `--summary_column`,
`--max_source_length`, `--max_target_length`, `--val_max_target_length`, `--num_beams`, `--source_prefix`,
`--pad_to_max_length`, `--ignore_pad_token_for_loss`) plus the shared recipe flags. Data: `--dataset_name`
(Hub) or local `--train_file/--validation_file/--test_file` (JSON Lines, CSV, or SciTLDR's jsonl, detected).
Model: `--model_name_or_path` (any checkpoint `AutoModelForSeq2SeqLM` loads: ours, a BART, a T5) or a fresh
hf_attention encoder-decoder from the variant flags, with a WordPiece tokenizer trained on the training text
unless `--tokenizer_name` is given.

Evaluation generates with the GenerationConfig saved as generation_config.json and scores ROUGE-1/2/L/Lsum
(rouge_score, stemming) against every gold summary of an example (`--references_column`, e.g. SciTLDR's
`targets`): the multi-target max that SciTLDR reports (`eval_rouge1`), the mean over golds (`_mean`) and the
first (author) gold only (`_first`). The first-sentence (Lead-1) baseline is scored by the same code on the same
examples (`eval_baseline_rouge1`, ...), so every number in all_results.json has its floor beside it.
Beside them, whether the outputs depend on the input at all: `eval_distinct_predictions` (fraction of distinct
generated summaries) and `eval_shuffled_source_loss` (the loss with each summary paired with another example's
source; `_gap` is its relative excess over `eval_loss`). A run whose outputs ignore the input (one sentence for
every document) is flagged with a warning, on stderr and in the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, GenerationConfig

from hf_attention import HfAttentionConfig
from hf_attention.training.arguments import add_common_args, parse_recipe_args
from hf_attention.training.metrics import (
    first_sentence_baseline,
    input_dependence,
    input_dependence_warning,
    rouge_scores,
)
from hf_attention.training.runner import RecipeRunner, make_accelerator, model_card
from hf_attention.training.setup import build_model, load_raw_datasets, select_samples, shared_tokenizer
from hf_attention.variants import position_table_length

TASK = "summarization"
SPLIT_FLAGS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
# Dataset-specific flags: part of a preset's data block, replaced with it when the user names other data.
DATA_FLAGS = ("text_column", "summary_column", "references_column")
# (text column, summary column) of well-known Hub datasets, as in transformers' example script.
SUMMARIZATION_NAME_MAPPING = {
    "allenai/scitldr": ("source", "target"),
    "scitldr": ("source", "target"),
    "scientific_papers": ("article", "abstract"),
    "cnn_dailymail": ("article", "highlights"),
    "abisee/cnn_dailymail": ("article", "highlights"),
    "xsum": ("document", "summary"),
    "EdinburghNLP/xsum": ("document", "summary"),
    "samsum": ("dialogue", "summary"),
    "knkarthick/dialogsum": ("dialogue", "summary"),
    "big_patent": ("description", "abstract"),
    "multi_news": ("document", "summary"),
    "billsum": ("text", "summary"),
    "wiki_summary": ("article", "highlights"),
}
# A small fresh encoder-decoder (SciTLDR-A has 2k training abstracts). No attention dropout: with it SDPA leaves
# its fused CPU kernel for the slow math path (DESIGN.md), and it cost a third of the step time here.
DEFAULTS = dict(hidden_size=256, encoder_layers=3, decoder_layers=3, num_attention_heads=4, intermediate_size=1024,
                max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
                tie_word_embeddings=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    task = parser.add_argument_group("summarization")
    task.add_argument("--text_column", type=str, default=None,
                      help="column with the documents (a string, or a list of sentences that is joined)")
    task.add_argument("--summary_column", type=str, default=None,
                      help="column with the summary to train on (a string, or a list whose first entry is used)")
    task.add_argument("--references_column", type=str, default=None,
                      help="column with all gold summaries of an example (a list) for multi-reference ROUGE; "
                           "default: 'targets' when present, else the summary column")
    task.add_argument("--source_prefix", type=str, default=None, help="prepended to every document (T5: 'summarize: ')")
    task.add_argument("--max_source_length", type=int, default=1024, help="documents are truncated to this many tokens")
    task.add_argument("--max_target_length", type=int, default=128, help="training summaries are truncated to this")
    task.add_argument("--val_max_target_length", type=int, default=None,
                      help="most new tokens generated, and evaluation labels' length (default: --max_target_length)")
    task.add_argument("--num_beams", type=int, default=None, help="beam size (default: the checkpoint's, else 1)")
    task.add_argument("--length_penalty", type=float, default=None)
    task.add_argument("--no_repeat_ngram_size", type=int, default=None)
    task.add_argument("--pad_to_max_length", action=argparse.BooleanOptionalAction, default=False,
                      help="pad every batch to the maximum lengths (else pad each batch to its longest)")
    task.add_argument("--ignore_pad_token_for_loss", action=argparse.BooleanOptionalAction, default=True,
                      help="padding in the labels does not count in the loss")
    task.add_argument("--eval_strategy", type=str, default="epoch", choices=("epoch", "end"),
                      help="epoch: generate and score ROUGE after every epoch; end: only the loss after every "
                           "epoch, generation and ROUGE once after training")
    parser.set_defaults(learning_rate=5e-4, weight_decay=0.01, per_device_train_batch_size=16,
                        per_device_eval_batch_size=32, num_train_epochs=10, num_warmup_steps=100)
    args = parse_recipe_args(parser, argv, data_flags=DATA_FLAGS)
    for name in ("max_source_length", "max_target_length", "val_max_target_length", "num_beams"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} {value}: must be a positive integer")
    if args.val_max_target_length is None:
        args.val_max_target_length = args.max_target_length
    return args


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def split_source(args: argparse.Namespace, split: str) -> str:
    """How an error names where a split came from: the flag and file, or the Hub dataset."""
    if args.dataset_name:
        return f"--dataset_name {args.dataset_name} [{split}]"
    flag = SPLIT_FLAGS.get(split)
    return f"--{flag} {getattr(args, flag)}" if flag and getattr(args, flag, None) else f"[{split}]"


def load_splits(args: argparse.Namespace) -> dict[str, Any]:
    """The train/validation/test splits the run needs (sample limits applied), or a SystemExit naming what's missing."""
    for flag in SPLIT_FLAGS.values():
        path = getattr(args, flag)
        if path and not Path(path).exists():
            raise SystemExit(f"--{flag} {path}: no such file")
    try:
        raw = load_raw_datasets(args)
    except (ConnectionError, OSError, ValueError) as err:
        hint = " (the Hub is unreachable offline: use --train_file/--validation_file)" if args.dataset_name else ""
        raise SystemExit(f"{args.dataset_name or 'data files'}: could not be loaded{hint}: {err}") from err
    if args.dataset_name and "validation" not in raw and "valid" in raw:
        raw["validation"] = raw["valid"]
    needed = {"train": args.do_train, "validation": args.do_eval, "test": args.do_predict}
    flags = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}
    splits: dict[str, Any] = {}
    for split, wanted in needed.items():
        if not wanted:
            continue
        if split not in raw:
            hint = f"give --{SPLIT_FLAGS[split]}" + (" or pass --no-do_train" if split == "train" else "")
            if split == "validation":
                hint += " or pass --no-do_eval"
            raise SystemExit(f"{flags[split]}: no {split} split in {args.dataset_name or 'the data files'}; {hint}")
        limit = {"train": args.max_train_samples, "validation": args.max_eval_samples,
                 "test": args.max_predict_samples}[split]
        splits[split] = select_samples(raw[split], limit)
        if len(splits[split]) == 0:
            raise SystemExit(f"{split_source(args, split)}: no rows")
    if not splits:
        raise SystemExit("nothing to do: --do_train, --do_eval and --do_predict are all off")
    return splits


def resolve_columns(args: argparse.Namespace, splits: dict[str, Any]) -> None:
    """Fill in --text_column/--summary_column/--references_column (SciTLDR, known Hub names, else the first two)."""
    first = next(iter(splits.values()))
    columns = first.column_names
    mapping = SUMMARIZATION_NAME_MAPPING.get(args.dataset_name or "")
    if mapping is None and "source" in columns and "target" in columns:
        mapping = ("source", "target")
    if args.text_column is None:
        args.text_column = mapping[0] if mapping else columns[0]
    if args.summary_column is None:
        args.summary_column = mapping[1] if mapping else columns[1] if len(columns) > 1 else None
    if args.references_column is None and "targets" in columns:
        args.references_column = "targets"
    for split, data in splits.items():
        where, available = split_source(args, split), data.column_names
        needs_summary = split != "test"
        for flag in ("text_column", "summary_column", "references_column"):
            if flag == "references_column" and split == "train":
                continue  # only evaluation scores against references
            column = getattr(args, flag)
            optional = flag == "references_column" or (flag == "summary_column" and not needs_summary)
            if column is None and not optional:
                raise SystemExit(f"{where}: has only the column(s) {available}; set --{flag}")
            if column is not None and column not in available and not (optional and split == "test"):
                raise SystemExit(f"{where}: no column {column!r} (--{flag}); available columns: {available}")


def as_text(value: Any) -> str:
    """A document or summary cell as one string: lists of sentences (SciTLDR on the Hub) are joined."""
    return " ".join(value) if isinstance(value, list) else value


def check_rows(args: argparse.Namespace, split: str, data) -> None:
    """Every row has a non-empty text (and summaries where used): stop naming the file, row and column."""
    where = split_source(args, split)
    checks = [(args.text_column, "--text_column"), (args.summary_column, "--summary_column")]
    if split != "train":
        checks.append((args.references_column, "--references_column"))
    checks = [(column, flag) for column, flag in checks if column is not None and column in data.column_names]
    for column, flag in checks:
        for row, value in enumerate(data[column], start=1):
            items = value if isinstance(value, list) else [value]
            if value is None or any(item is None for item in items):
                bad = "is empty"
            elif not all(isinstance(item, str) for item in items):
                bad = f"holds {type(next(i for i in items if not isinstance(i, str))).__name__}, not text"
            elif column == args.text_column:
                bad = "is empty" if not as_text(value).strip() else None
            else:
                bad = "is empty" if not items or not all(item.strip() for item in items) else None
            if bad:
                raise SystemExit(f"{where}: row {row} (counting from 1): column {column!r} ({flag}) {bad}")


def references_of(args: argparse.Namespace, data) -> list[list[str]] | None:
    """All gold summaries per example, for multi-reference ROUGE; None when the split has no summaries."""
    column = args.references_column if args.references_column in data.column_names else args.summary_column
    if column is None or column not in data.column_names:
        return None
    return [list(value) if isinstance(value, list) else [value] for value in data[column]]


# --------------------------------------------------------------------------------------------------
# Tokenizer, model, generation settings
# --------------------------------------------------------------------------------------------------


def get_tokenizer(args: argparse.Namespace, splits: dict[str, Any], accelerator):
    """The named tokenizer, or one trained on the training text by the main process and loaded by the others
    (so every rank has the same vocabulary); a resumed run reuses the one saved in --output_dir."""
    def texts():
        train = splits["train"]
        return (as_text(value) for column in (args.text_column, args.summary_column) for value in train[column])

    return shared_tokenizer(args, "train" in splits, texts, accelerator, "--train_file")


def special_ids(tokenizer) -> dict[str, int]:
    """pad / decoder start / eos for a fresh model: [PAD], [CLS], [SEP] for a trained WordPiece tokenizer."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if tokenizer.pad_token_id is None or start is None or eos is None:
        raise SystemExit("--tokenizer_name: a fresh encoder-decoder needs a tokenizer with a pad token, a bos or cls "
                         "token (decoder start) and an eos or sep token")
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=start, eos_token_id=eos,
                decoder_start_token_id=start)


def make_model(args: argparse.Namespace, tokenizer):
    """A checkpoint (embeddings grown to the tokenizer) or a fresh hf_attention encoder-decoder sized for the data."""
    task_config: dict[str, Any] = {}
    defaults = dict(DEFAULTS)
    if not args.model_name_or_path:
        task_config = dict(vocab_size=len(tokenizer), is_encoder_decoder=True, **special_ids(tokenizer))
        defaults["max_position_embeddings"] = max(DEFAULTS["max_position_embeddings"], args.max_source_length,
                                                  args.max_target_length, args.val_max_target_length)
        if args.num_hidden_layers is not None:  # one depth for both stacks unless they are set apart
            defaults.pop("encoder_layers")
            defaults.pop("decoder_layers")
    try:
        model = build_model(args, AutoModelForSeq2SeqLM, defaults, task_config)
    except (OSError, ValueError) as err:
        source = f"--model_name_or_path {args.model_name_or_path}" if args.model_name_or_path else "model flags"
        raise SystemExit(f"{source}: {err}") from err
    config = model.config
    if not getattr(config, "is_encoder_decoder", False):
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path}: a {type(config).__name__} is not an "
                         "encoder-decoder; summarization needs one (BART, T5, or a fresh hf_attention model)")
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if config.decoder_start_token_id is None:
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path}: config.decoder_start_token_id is not set")
    limit = (position_table_length(config) if isinstance(config, HfAttentionConfig)
             else getattr(config, "max_position_embeddings", None))
    if limit is not None:
        for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
            if getattr(args, flag) > limit:
                raise SystemExit(f"--{flag} {getattr(args, flag)} exceeds the model's max_position_embeddings={limit} "
                                 f"(learned positions); lower --{flag} or use a longer model")
    return model


def make_generation_config(args: argparse.Namespace, model, tokenizer) -> GenerationConfig:
    """The checkpoint's generation settings with the length/beam flags applied; saved as generation_config.json.

    A settings clash is reported naming each clashing setting and where it came from (a flag, the checkpoint's
    generation config, the recipe), not the beam flags the user may never have set.
    """
    config = model.config
    if args.model_name_or_path:
        origin = f"the generation config of --model_name_or_path {args.model_name_or_path}"
    else:
        origin = f"the model config of --config_name {args.config_name}" if args.config_name else "the model config"
    base = getattr(model, "generation_config", None)
    try:
        generation = GenerationConfig.from_dict(base.to_dict()) if base is not None else (
            GenerationConfig.from_model_config(config))
    except ValueError as err:
        raise SystemExit(f"{origin}: not valid generation settings: {err}") from err
    sources: dict[str, str] = {}  # setting -> where its value came from, when not `origin`
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(generation, key, None) is None and getattr(config, key, None) is not None:
            setattr(generation, key, getattr(config, key))
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
        sources["pad_token_id"] = "the tokenizer's pad token"
    generation.max_new_tokens = args.val_max_target_length
    generation.max_length = None
    sources["max_new_tokens"] = "--val_max_target_length"
    for flag in ("num_beams", "length_penalty", "no_repeat_ngram_size"):
        if getattr(args, flag) is not None:
            setattr(generation, flag, getattr(args, flag))
            sources[flag] = f"--{flag}"
    if not args.model_name_or_path:
        # A fresh model's special ids are the tokenizer's (make_model); a forced eos left from another
        # vocabulary (BartConfig's forced_eos_token_id=2) would force a wrong token, here [CLS].
        if generation.forced_eos_token_id is not None and generation.forced_eos_token_id != config.eos_token_id:
            generation.forced_eos_token_id = config.eos_token_id
            sources["forced_eos_token_id"] = "the tokenizer's eos token (a fresh model)"
        if generation.suppress_tokens is None:
            # A fresh model ties its output to its input embeddings and at first echoes the decoder start token;
            # padding, the start token and [MASK] are never a summary's word, so they are never generated.
            never = {tokenizer.pad_token_id, config.decoder_start_token_id, tokenizer.mask_token_id}
            generation.suppress_tokens = sorted(t for t in never - {config.eos_token_id, None})
            sources["suppress_tokens"] = "the recipe (a fresh model never generates padding, decoder start, [MASK])"
    if (generation.num_beams or 1) > 1 and generation.early_stopping is None:
        generation.early_stopping = True
        sources["early_stopping"] = "the recipe (beam search)"
    generation.do_sample = False if generation.do_sample is None else generation.do_sample
    generation._from_model_config = False  # ours now: generate() must not rebuild it from the model config
    try:
        generation.validate()
    except ValueError as err:
        named = dict.fromkeys(re.findall(r"`(\w+)`", str(err)))
        where = "; ".join(f"{key}={getattr(generation, key)!r} from {sources.get(key, origin)}" for key in named
                          if getattr(generation, key, None) is not None)
        raise SystemExit(f"generation settings clash: {err}" + (f" ({where})" if where else "")) from err
    return generation


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def tokenize_split(args: argparse.Namespace, data, tokenizer, decoder_start: int, max_target: int,
                   with_labels: bool, with_index: bool):
    """input_ids/attention_mask (+ labels: the summary without the decoder start token, ending in eos)."""
    prefix = args.source_prefix or ""
    label_pad = -100 if args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    # A tokenizer that starts every sequence with the decoder start token (a trained WordPiece: [CLS]) would make
    # labels [CLS] ... and decoder inputs [CLS] [CLS] ...: drop it from the labels, keep the eos.
    drops_start = tokenizer(text_target="a")["input_ids"][:1] == [decoder_start]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        inputs = [prefix + as_text(text) for text in batch[args.text_column]]
        features = tokenizer(inputs, max_length=args.max_source_length, truncation=True,
                             padding="max_length" if args.pad_to_max_length else False)
        if with_labels:
            targets = [value[0] if isinstance(value, list) else value for value in batch[args.summary_column]]
            label_ids = tokenizer(text_target=targets, max_length=max_target + int(drops_start), truncation=True)
            labels = []
            for ids in label_ids["input_ids"]:
                ids = ids[1:] if drops_start and ids[:1] == [decoder_start] else ids
                ids = ids[:max_target]
                if args.pad_to_max_length:
                    ids = ids + [label_pad] * (max_target - len(ids))
                labels.append(ids)
            features["labels"] = labels
        return features

    features = data.map(encode, batched=True, remove_columns=data.column_names,
                        num_proc=args.preprocessing_num_workers, load_from_cache_file=not args.overwrite_cache,
                        desc="Tokenizing")
    if with_index:
        features = features.add_column("example_index", list(range(len(features))))
    return features


def shuffled_sources(features, seed: int):
    """The same rows with every summary paired with another row's source (a seeded derangement), or None for a
    single row: a model that reads its input has a clearly higher loss on these than on the true pairs."""
    from datasets import concatenate_datasets

    n = len(features)
    if n < 2:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    source_of = [0] * n
    for i, row in enumerate(order):  # each row takes the source of the next row in a random cycle
        source_of[row] = order[(i + 1) % n]
    source_columns = [c for c in features.column_names if c not in ("labels", "example_index", "decoder_input_ids")]
    sources = features.select(source_of).select_columns(source_columns).flatten_indices()
    return concatenate_datasets([features.remove_columns(source_columns), sources], axis=1)


class IndexedSeq2SeqCollator:
    """DataCollatorForSeq2Seq that carries each row's position, so gathered results map back to examples."""

    def __init__(self, collator: DataCollatorForSeq2Seq):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([feature.pop("example_index") for feature in features], dtype=torch.long)
        batch = self.collator(features)
        batch["example_index"] = index
        return batch


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in scores.items()}


class SplitEvaluator:
    """Loss, generation and ROUGE for one split; every example is scored exactly once across processes."""

    def __init__(self, args, accelerator, tokenizer, generation: GenerationConfig, raw, features, collate,
                 prefix: str, split: str):
        self.args, self.accelerator, self.tokenizer, self.generation = args, accelerator, tokenizer, generation
        self.prefix, self.split = prefix, split
        self.size = len(raw)
        self.references = references_of(args, raw)
        self.sources = list(raw[args.text_column])
        ids = raw["paper_id"] if "paper_id" in raw.column_names else raw["id"] if "id" in raw.column_names else None
        self.ids = list(ids) if ids is not None else list(range(self.size))
        self.has_labels = "labels" in features.column_names
        self.loader = accelerator.prepare(torch.utils.data.DataLoader(
            features, batch_size=args.per_device_eval_batch_size, shuffle=False, collate_fn=collate))
        shuffled = shuffled_sources(features, seed=args.seed) if self.has_labels else None
        self.shuffled_loader = accelerator.prepare(torch.utils.data.DataLoader(
            shuffled, batch_size=args.per_device_eval_batch_size, shuffle=False, collate_fn=collate)
        ) if shuffled is not None else None
        self.baseline = [first_sentence_baseline(source) for source in self.sources]
        self.baseline_scores = (prefixed(f"{prefix}_baseline", rouge_scores(self.baseline, self.references))
                                if self.references is not None else {})

    @torch.no_grad()
    def run(self, model, generate: bool = True, loss: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        accelerator, pad = self.accelerator, self.generation.pad_token_id
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        unwrapped = accelerator.unwrap_model(model)
        texts: dict[int, str] = {}
        lengths: dict[int, int] = {}
        loss_sum = token_count = 0.0
        for batch in self.loader:
            index = batch.pop("example_index")
            labels = batch.pop("labels", None)
            decoder_input_ids = batch.pop("decoder_input_ids", None)
            outputs = []
            if loss and labels is not None:
                logits = model(**batch, labels=labels, decoder_input_ids=decoder_input_ids).logits
                token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                             reduction="none")
                outputs += [token_loss.sum(1), (labels != -100).sum(1).float()]
            if generate:
                tokens = unwrapped.generate(**batch, generation_config=self.generation)
                outputs.append(accelerator.pad_across_processes(tokens, dim=1, pad_index=pad))
            gathered = accelerator.gather_for_metrics((index, *outputs))
            gathered_index = gathered[0].tolist()
            if loss and labels is not None:
                loss_sum += float(gathered[1].sum())
                token_count += float(gathered[2].sum())
            if generate:
                tokens = gathered[-1].cpu()
                decoded = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
                generated_lengths = (tokens[:, 1:] != pad).sum(1).tolist()
                for i, text, length in zip(gathered_index, decoded, generated_lengths):
                    texts.setdefault(i, " ".join(text.split()))
                    lengths.setdefault(i, length)
        metrics: dict[str, float] = {}
        if token_count:
            metrics[f"{self.prefix}_loss"] = loss_sum / token_count
            metrics[f"{self.prefix}_perplexity"] = math.exp(min(loss_sum / token_count, 50.0))
            if self.shuffled_loader is not None:
                shuffled_loss = self.mean_loss(model, self.shuffled_loader)
                metrics.update(prefixed(self.prefix, input_dependence(loss=metrics[f"{self.prefix}_loss"],
                                                                      shuffled_loss=shuffled_loss)))
        if was_training:
            model.train()
        records: list[dict[str, Any]] = []
        if generate:
            if sorted(texts) != list(range(self.size)):
                missing = sorted(set(range(self.size)) - set(texts))[:10]
                raise RuntimeError(f"{self.split}: {self.size} examples but {len(texts)} predictions "
                                   f"(missing e.g. {missing})")
            predictions = [texts[i] for i in range(self.size)]
            if self.references is not None:
                metrics.update(prefixed(self.prefix, rouge_scores(predictions, self.references)))
                metrics.update(self.baseline_scores)
            metrics[f"{self.prefix}_gen_len"] = sum(lengths.values()) / self.size
            metrics.update(prefixed(self.prefix, input_dependence(predictions)))
            records = [{"index": i, "id": self.ids[i], "prediction": predictions[i],
                        "references": self.references[i] if self.references is not None else None,
                        "baseline": self.baseline[i]} for i in range(self.size)]
        metrics[f"{self.prefix}_samples"] = self.size
        metrics[f"{self.prefix}_runtime"] = round(time.perf_counter() - started, 3)
        return metrics, records

    @torch.no_grad()
    def mean_loss(self, model, loader) -> float:
        """Mean token loss over a loader (the model is in eval mode)."""
        loss_sum = token_count = 0.0
        for batch in loader:
            batch.pop("example_index")
            labels = batch.pop("labels")
            logits = model(**batch, labels=labels).logits
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            sums, counts = self.accelerator.gather_for_metrics((token_loss.sum(1), (labels != -100).sum(1).float()))
            loss_sum += float(sums.sum())
            token_count += float(counts.sum())
        return loss_sum / max(token_count, 1.0)

    def write(self, output_dir: Path, records: list[dict[str, Any]], text_name: str) -> None:
        """One prediction per line (transformers' generated_predictions.txt) and a JSON with references."""
        if not self.accelerator.is_main_process or not records:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / text_name).write_text("".join(record["prediction"].replace("\n", " ") + "\n"
                                                    for record in records))
        (output_dir / f"{self.prefix}_predictions.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    runner = RecipeRunner(args, accelerator)
    with accelerator.main_process_first():
        splits = load_splits(args)
    resolve_columns(args, splits)
    for split, data in splits.items():
        check_rows(args, split, data)

    tokenizer = get_tokenizer(args, splits, accelerator)
    model = make_model(args, tokenizer)
    generation = make_generation_config(args, model, tokenizer)
    model.generation_config = generation
    decoder_start = model.config.decoder_start_token_id

    collator = DataCollatorForSeq2Seq(tokenizer, model=model,
                                      label_pad_token_id=-100 if args.ignore_pad_token_for_loss
                                      else tokenizer.pad_token_id)
    indexed = IndexedSeq2SeqCollator(collator)
    evaluators: dict[str, SplitEvaluator] = {}
    with accelerator.main_process_first():
        features = {}
        for split, data in splits.items():
            with_labels = split != "test" or args.summary_column in data.column_names
            max_target = args.max_target_length if split == "train" else args.val_max_target_length
            features[split] = tokenize_split(args, data, tokenizer, decoder_start, max_target, with_labels,
                                             with_index=split != "train")
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in splits:
            evaluators[prefix] = SplitEvaluator(args, accelerator, tokenizer, generation, splits[split],
                                                features[split], indexed, prefix, split)
    runner.init_trackers(TASK)

    last_eval: dict[str, Any] = {}

    def evaluate(model, epoch: int) -> dict[str, float]:
        """Per-epoch validation, kept so the final report need not recompute the loss (or regenerate)."""
        generate = args.eval_strategy == "epoch"
        metrics, records = evaluators["eval"].run(model, generate=generate)
        last_eval.update(step=runner.completed_steps, metrics=metrics, records=records, generated=generate)
        return metrics

    if args.do_train:
        loader = torch.utils.data.DataLoader(features["train"], shuffle=True, collate_fn=collator,
                                             batch_size=args.per_device_train_batch_size)
        model = runner.train(model, loader, evaluate=evaluate if "eval" in evaluators else None)
    else:
        model = accelerator.prepare(model)

    output_dir = Path(args.output_dir)
    metrics: dict[str, Any] = {}
    if "eval" in evaluators:
        current = last_eval.get("step") == runner.completed_steps and args.do_train
        if current and last_eval["generated"]:
            eval_metrics, records = last_eval["metrics"], last_eval["records"]
        else:
            eval_metrics, records = evaluators["eval"].run(model, loss=not current)
            if current:
                eval_metrics = {**last_eval["metrics"], **eval_metrics}
        metrics.update(eval_metrics)
        evaluators["eval"].write(output_dir, records, "eval_generated_predictions.txt")
    if "test" in evaluators:
        test_metrics, records = evaluators["test"].run(model)
        metrics.update(test_metrics)
        evaluators["test"].write(output_dir, records, "generated_predictions.txt")

    warnings = [w for w in (input_dependence_warning(metrics, prefix) for prefix in evaluators) if w]
    if accelerator.is_main_process:
        for warning in warnings:
            print(warning, file=sys.stderr)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.generation_config = generation
    data_desc = args.dataset_name or ", ".join(filter(None, (args.train_file, args.validation_file, args.test_file)))
    card = model_card(TASK, args, unwrapped.config, data_desc) + summary_card(args, generation)
    card += "".join(f"\n**{warning}**\n" for warning in warnings)
    results = runner.finish(model, tokenizer, metrics, card)
    accelerator.print(json.dumps({k: v for k, v in results.items() if not k.endswith(("_mean", "_first"))},
                                 indent=2, default=float))
    return results


def summary_card(args: argparse.Namespace, generation: GenerationConfig) -> str:
    settings = {key: getattr(generation, key, None) for key in ("num_beams", "max_new_tokens", "length_penalty",
                                                                 "no_repeat_ngram_size")}
    return (
        f"\n## Summarization\n\n- Columns: text `{args.text_column}`, summary `{args.summary_column}`, "
        f"references `{args.references_column or args.summary_column}`\n"
        f"- Lengths: source {args.max_source_length} tokens, target {args.max_target_length} "
        f"(evaluation {args.val_max_target_length})\n"
        f"- Generation: {', '.join(f'{k}={v}' for k, v in settings.items() if v is not None)}\n"
        "- ROUGE: `rouge_score` F-measure x100 with stemming. `rouge*` is the multi-reference max (per example the "
        "gold with the best ROUGE-1, as SciTLDR reports), `*_mean` the mean over golds, `*_first` the first "
        "(author) gold only. `*_baseline_*` is the first sentence of the source scored the same way.\n"
        "- Input dependence: `*_distinct_predictions` is the fraction of distinct generated summaries, "
        "`*_shuffled_source_loss` the loss with every summary paired with another example's source (`_gap`: its "
        "excess over `*_loss`, relative); near 0 means the outputs ignore the input.\n"
    )


if __name__ == "__main__":
    main()
