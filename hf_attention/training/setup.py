"""Model, tokenizer and dataset setup shared by the recipes."""

import argparse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast, set_seed

from .. import HfAttentionConfig
from .arguments import variant_overrides
from .data import load_local_dataset


def build_model(args: argparse.Namespace, auto_cls, defaults: dict[str, Any], task_config: dict[str, Any]):
    """A pretrained checkpoint (`--model_name_or_path`), a config file (`--config_name`), or a fresh variant.

    `defaults` are our model sizes for a fresh model (the variant flags override them); `task_config`
    (labels, special token ids) applies in every case.
    """
    overrides = variant_overrides(args)
    # Initialisation depends on --seed alone, not on what data preparation drew before.
    set_seed(args.seed)
    load_kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        load_kwargs["attn_implementation"] = args.attn_implementation
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        if overrides and not isinstance(config, HfAttentionConfig):
            raise SystemExit(
                f"--model_name_or_path {args.model_name_or_path} is a {type(config).__name__}; variant flags "
                f"({', '.join('--' + k for k in overrides)}) apply to hf_attention models. Convert it first "
                "(hf-attention-convert, or --convert_from)."
            )
        for key, value in {**overrides, **task_config}.items():
            setattr(config, key, value)
        return auto_cls.from_pretrained(args.model_name_or_path, config=config, **load_kwargs)
    if args.config_name:
        config = AutoConfig.from_pretrained(args.config_name, trust_remote_code=args.trust_remote_code)
        for key, value in {**overrides, **task_config}.items():
            setattr(config, key, value)
    else:
        try:
            config = HfAttentionConfig(**{**defaults, **overrides, **task_config})
        except ValueError as err:
            raise SystemExit(f"invalid model flags: {err}") from err
    if args.attn_implementation:
        config._attn_implementation = args.attn_implementation
    return auto_cls.from_config(config, trust_remote_code=args.trust_remote_code)


SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (lowercase, [CLS] a [SEP] b [SEP]) trained on the given text, the same
    vocabulary in every process.

    tokenizers' trainer numbers the ``##`` continuation tokens in hash-map order, which changes per process, and
    breaks ties between equally frequent merges by those numbers (huggingface/tokenizers#1794): the same text
    gave a different vocabulary on every run, so two cells of an ablation compared different tokenizations.
    Registering every ``##c`` up front, in sorted order, as trainer special tokens fixes their ids (and so the
    tie-breaks); they are then demoted to ordinary vocabulary entries. The ``##c`` set comes from a merge-free
    training pass (vocab_size 1): exactly the pieces the trainer creates, found in Rust (2.5x faster than
    pre-tokenizing in Python).
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    def untrained() -> Tokenizer:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer

    texts = list(texts)
    specials = list(SPECIAL_TOKENS.values())
    probe = untrained()
    probe.train_from_iterator(texts, trainer=trainers.WordPieceTrainer(vocab_size=1, special_tokens=specials))
    continuations = sorted(piece for piece in probe.get_vocab() if piece.startswith("##"))
    tokenizer = untrained()
    tokenizer.train_from_iterator(
        texts, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials + continuations)
    )
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in specials]
    tokenizer = Tokenizer.from_str(json.dumps(state))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def load_tokenizer(args: argparse.Namespace, texts: Iterator[str] | None) -> PreTrainedTokenizerFast:
    """`--tokenizer_name`, else the checkpoint's tokenizer, else one trained on the training text."""
    name = args.tokenizer_name or args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    if texts is None:
        raise SystemExit("no tokenizer: pass --tokenizer_name or --model_name_or_path, or training text to learn one")
    return train_wordpiece_tokenizer(texts, args.vocab_size)


def shared_tokenizer(args: argparse.Namespace, has_train: bool, texts: Callable[[], Iterable[str]], accelerator,
                     how_to_train: str) -> PreTrainedTokenizerFast:
    """The named tokenizer, or one trained on the training text by the main process and loaded by the others.

    Training happens once, on the main process, and the other ranks load its files (WordPiece training is now
    deterministic, but it is slow on large text and need not run on every rank); a resumed run reuses the one
    saved in --output_dir.
    """
    name = args.tokenizer_name or args.model_name_or_path
    if name:
        try:
            return load_tokenizer(args, None)
        except (OSError, ValueError) as err:
            flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
            raise SystemExit(f"{flag} {name}: no tokenizer could be loaded ({err}); pass --tokenizer_name") from err
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint is not None and (output_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(output_dir)
    if not has_train:
        raise SystemExit(f"no tokenizer: pass --tokenizer_name or --model_name_or_path, or train ({how_to_train}) "
                         "so one is learnt from the training text")
    tokenizer = None
    if accelerator.is_main_process:
        tokenizer = load_tokenizer(args, texts())
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    return tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(output_dir)


def load_raw_datasets(args: argparse.Namespace, hub_kwargs: dict[str, Any] | None = None):
    """Hub (`--dataset_name`) or local files (`--train_file` / `--validation_file` / `--test_file`)."""
    if args.dataset_name:
        from datasets import load_dataset

        return load_dataset(args.dataset_name, args.dataset_config_name, trust_remote_code=args.trust_remote_code,
                            **(hub_kwargs or {}))
    if not (args.train_file or args.validation_file or args.test_file):
        raise SystemExit("give --dataset_name or at least one of --train_file/--validation_file/--test_file")
    try:
        return load_local_dataset(train_file=args.train_file, validation_file=args.validation_file,
                                  test_file=args.test_file)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def select_samples(dataset, limit: int | None):
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
