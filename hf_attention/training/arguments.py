"""Command-line vocabulary shared by the recipes (the flag names of transformers' `run_*_no_trainer.py`).

`--config path.yaml` sets any flag; the command line wins. Unknown YAML keys are an error that lists the
valid ones, so a typo never silently trains the wrong thing.

A preset's data settings (its files, their columns and labels, `do_predict`) form one block, written under a
`data:` key: giving any data source on the command line (`--train_file`, `--dataset_name`, ...) replaces that
whole block, because a preset's test file or column names kept beside the user's own training file quietly
scored the wrong data (an MNIST run tested on the preset's Fashion-MNIST file). `--test_file none` clears one
path and every on/off flag has a `--no-` form.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..configuration_hf_attention import LEGACY_ATTENTION_TYPES, NORM_POSITIONS, POOLING_TYPES
from ..registry_hf_attention import ATTENTION_SCORES, POSITIONAL_ENCODINGS, SPARSE_PATTERN_CLASSES

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "cosine_with_min_lr")
REPORT_TO = ("all", "tensorboard", "wandb", "none")
# What a user types to clear a path a preset set (`--test_file none`).
NONE_VALUES = ("none", "null")
# Flags that name where the data comes from: any of them given on the command line replaces the preset's
# data block. Recipes add their own (question answering: --squad_file).
DATA_SOURCE_FLAGS = ("dataset_name", "train_file", "validation_file", "test_file")
# Always part of the data block wherever a YAML writes them (a recipe adds its column flags).
DATA_BLOCK_FLAGS = (*DATA_SOURCE_FLAGS, "dataset_config_name", "do_predict")
# Flags that name a model, config or tokenizer: a local path among them must exist.
MODEL_PATH_FLAGS = ("model_name_or_path", "config_name", "tokenizer_name", "convert_from")

def optional_str(value: str) -> str | None:
    """A path or name, or None for `none`/`null`/empty: how the command line clears what a preset set."""
    return None if value.strip().lower() in (*NONE_VALUES, "") else value


# Model-shape and variant flags: forwarded to HfAttentionConfig when a fresh model is built. The variant axes'
# choices are read from the registries when a parser is built (so a registered new variant is a valid flag).
VARIANT_FLAGS = {
    "attention_type": (str, lambda: (*ATTENTION_SCORES, *LEGACY_ATTENTION_TYPES)),
    "position_embedding_type": (str, lambda: tuple(POSITIONAL_ENCODINGS)),
    "sparse_pattern": (optional_str, lambda: (*SPARSE_PATTERN_CLASSES, None)),  # `none`: dense
    "norm_position": (str, NORM_POSITIONS),
    "pooling": (str, POOLING_TYPES),
    "sparse_window_size": (int, None),
    "sparse_block_size": (int, None),
    "sparse_stride": (int, None),
    "sparse_num_global_tokens": (int, None),
    "sparse_num_random_blocks": (int, None),
    "sparse_seed": (int, None),
    "rope_theta": (float, None),
    "relative_attention_num_buckets": (int, None),
    "relative_attention_max_distance": (int, None),
    "additive_hidden_size": (int, None),
    "gaussian_bandwidth": (float, None),
    "linear_feature_map": (str, None),
    "hidden_size": (int, None),
    "num_hidden_layers": (int, None),
    "encoder_layers": (int, None),
    "decoder_layers": (int, None),
    "num_attention_heads": (int, None),
    "intermediate_size": (int, None),
    "hidden_act": (str, None),
    "hidden_dropout_prob": (float, None),
    "attention_probs_dropout_prob": (float, None),
    "activation_dropout": (float, None),
    "max_position_embeddings": (int, None),
    "patch_size": (int, None),
}


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every recipe takes: data, model, optimisation, checkpointing, tracking, Hub."""
    parser.add_argument("--config", type=str, default=None, help="YAML file setting any of these flags")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=optional_str, default=None, help="a dataset on the Hugging Face Hub")
    data.add_argument("--dataset_config_name", type=optional_str, default=None)
    data.add_argument("--train_file", type=optional_str, default=None, help="'none' clears a preset's file")
    data.add_argument("--validation_file", type=optional_str, default=None, help="'none' clears a preset's file")
    data.add_argument("--test_file", type=optional_str, default=None, help="'none' clears a preset's file")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--max_predict_samples", type=int, default=None)
    data.add_argument("--preprocessing_num_workers", type=int, default=None)
    data.add_argument("--overwrite_cache", action=argparse.BooleanOptionalAction, default=False)
    data.add_argument("--trust_remote_code", action=argparse.BooleanOptionalAction, default=False,
                      help="for Hub models/datasets with custom code")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=optional_str, default=None,
                       help="a checkpoint the Auto classes load (ours or transformers', e.g. a BERT)")
    model.add_argument("--config_name", type=optional_str, default=None, help="config to build a fresh model from")
    model.add_argument("--convert_from", type=optional_str, default=None,
                       help="a transformers BERT/RoBERTa/ViT/BART checkpoint to convert (with the variant flags) first")
    model.add_argument("--tokenizer_name", type=optional_str, default=None)
    model.add_argument("--vocab_size", type=int, default=8000, help="size of a tokenizer trained on the data")
    model.add_argument("--attn_implementation", type=str, default=None, choices=("eager", "sdpa", "flex_attention"))
    for name, (kind, choices) in VARIANT_FLAGS.items():
        model.add_argument(f"--{name}", type=kind, default=None, choices=choices() if callable(choices) else choices)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=int, default=8)
    optim.add_argument("--per_device_eval_batch_size", type=int, default=8)
    optim.add_argument("--learning_rate", type=float, default=5e-5)
    optim.add_argument("--weight_decay", type=float, default=0.0, help="not applied to biases and norms")
    optim.add_argument("--num_train_epochs", type=int, default=3)
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--lr_scheduler_type", type=str, default="linear", choices=SCHEDULERS)
    optim.add_argument("--num_warmup_steps", type=int, default=0)
    optim.add_argument("--min_lr_rate", type=float, default=0.1,
                       help="cosine_with_min_lr: the final learning rate as a fraction of --learning_rate")
    # transformers' Trainer names; nanoGPT's small-batch runs use beta2 = 0.99.
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--data_seed", type=int, default=None,
                       help="seed of splits drawn from the data (default: --seed); the sweep fixes it")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", type=str, default=None, required=False)
    out.add_argument("--checkpointing_steps", type=str, default=None, help="N (every N steps) or 'epoch'")
    out.add_argument("--resume_from_checkpoint", type=str, nargs="?", const="", default=None,
                     help="a checkpoint folder; without a value, the latest one in --output_dir")
    out.add_argument("--with_tracking", action=argparse.BooleanOptionalAction, default=False)
    out.add_argument("--report_to", type=str, default="all", choices=REPORT_TO)
    out.add_argument("--project_name", type=str, default="hf_attention")
    out.add_argument("--run_name", type=str, default=None)
    out.add_argument("--sweep_name", type=str, default=None, help="groups runs of one ablation sweep in trackers")
    out.add_argument("--logging_steps", type=int, default=10)
    out.add_argument("--push_to_hub", action=argparse.BooleanOptionalAction, default=False)
    out.add_argument("--hub_model_id", type=str, default=None)
    out.add_argument("--hub_token", type=str, default=None)
    out.add_argument("--do_train", action=argparse.BooleanOptionalAction, default=True)
    out.add_argument("--do_eval", action=argparse.BooleanOptionalAction, default=True)
    out.add_argument("--do_predict", action=argparse.BooleanOptionalAction, default=False,
                     help="score the test split (part of a preset's data block)")
    return parser


def load_yaml_config(path: str, parser: argparse.ArgumentParser,
                     data_flags: Sequence[str] = DATA_BLOCK_FLAGS) -> tuple[dict[str, Any], set[str]]:
    """The flag values of a YAML preset, and the keys of its data block.

    The data block is what the preset writes under `data:` plus any of `data_flags` written at the top level
    (so an old flat preset behaves the same).
    """
    import yaml

    file = Path(path)
    if not file.exists():
        raise SystemExit(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    block = values.pop("data", None) or {}
    if not isinstance(block, dict):
        raise SystemExit(f"--config {path}: 'data' must be a mapping of data flags (train_file: ...), "
                         f"got {type(block).__name__}")
    twice = sorted(set(block) & set(values))
    if twice:
        raise SystemExit(f"--config {path}: {', '.join(twice)} set both inside and outside the data block")
    values.update(block)
    valid = {action.dest for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise SystemExit(
            f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
        )
    return values, set(block) | (set(values) & set(data_flags))


def parse_recipe_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                      data_flags: Sequence[str] = (), data_sources: Sequence[str] = ()) -> argparse.Namespace:
    """Parse with YAML defaults under command-line values, then check what argparse can't.

    `data_flags` are the recipe's dataset-specific flags (its column names) and `data_sources` its extra flags
    naming a data source (a file): with them the preset's data block is known and replaced as a whole.
    """
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        sources = (*DATA_SOURCE_FLAGS, *data_sources)
        values, block = load_yaml_config(pre.config, parser, (*DATA_BLOCK_FLAGS, *data_sources, *data_flags))
        for action in parser._actions:
            if action.dest in values and action.choices is not None and values[action.dest] is not None:
                if values[action.dest] not in action.choices:
                    raise SystemExit(
                        f"--config {pre.config}: {action.dest}={values[action.dest]!r} is not valid; "
                        f"choose one of {', '.join(map(str, action.choices))}"
                    )
        # The model's source is one choice: a command-line --convert_from replaces the file's
        # model_name_or_path and vice versa (command line wins), instead of clashing with it.
        for cli_key, file_key in (("convert_from", "model_name_or_path"), ("model_name_or_path", "convert_from")):
            if getattr(pre, cli_key, None) and values.get(file_key):
                values[file_key] = None
        # So is the data: the user's own file or dataset replaces every data setting of the preset.
        given = [flag for flag in sources if getattr(pre, flag, None) is not None]
        if given:
            typed = {option.split("=", 1)[0] for option in (sys.argv[1:] if argv is None else argv)}
            on_command_line = {a.dest for a in parser._actions if typed & set(a.option_strings)}
            dropped = sorted(key for key in block if values.get(key) is not None and key not in on_command_line)
            for key in block:
                values.pop(key, None)
            if dropped:
                print(f"--config {pre.config}: {' '.join('--' + f for f in given)} on the command line replaces "
                      f"the preset's data block (not used: {', '.join(dropped)})", file=sys.stderr)
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("--output_dir is required (on the command line or in --config)")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit() or int(args.checkpointing_steps) <= 0:
            parser.error(f"--checkpointing_steps {args.checkpointing_steps!r}: give a positive integer or 'epoch'")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. user/my-model)")
    for flag in MODEL_PATH_FLAGS:
        value = getattr(args, flag, None)
        if value and looks_like_local_path(value) and not Path(value).expanduser().exists():
            parser.error(f"--{flag} {value}: no such folder (a Hub model id looks like 'name' or 'org/name')")
    if args.convert_from:
        if args.model_name_or_path:
            parser.error("give --convert_from or --model_name_or_path, not both")
        args.model_name_or_path = convert_once(args, parser)
    return args


def looks_like_local_path(name: str) -> bool:
    """True when `name` can only be a local path, never a Hub id ('name' or 'org/name').

    Without this, a missing folder reached huggingface_hub and failed with "Repo id must be in the form
    'repo_name' or 'namespace/repo_name'", which names the wrong problem.
    """
    return (name.startswith(("/", "./", "../", "~", "\\")) or name in (".", "..") or name.endswith(("/", "\\"))
            or name.count("/") > 1 or "\\" in name or Path(name).is_absolute())


# The recipe a parser belongs to, told by a flag only that recipe has: the head to convert to.
_CONVERT_TASKS = {"doc_stride": "question-answering", "max_source_length": "seq2seq",
                  "image_column_name": "image-classification"}


def convert_once(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Convert `--convert_from` into <output_dir>/converted_model once (a file lock serialises the processes)."""
    from filelock import FileLock

    from ..convert import convert

    dests = {action.dest for action in parser._actions}
    task = next((t for flag, t in _CONVERT_TASKS.items() if flag in dests), None)
    target = Path(args.output_dir) / "converted_model"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            overrides = {k: v for k, v in variant_overrides(args).items()
                         if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
            try:  # convert() resolves the checkpoint aliases (convert.CHECKPOINT_ALIASES), as hf-attention-convert
                report = convert(args.convert_from, target, task=task, seed=args.seed, **overrides).conversion_report
            except ValueError as err:
                raise SystemExit(f"--convert_from {args.convert_from}: {err}") from err
            print(report.summary())
    return str(target)


def variant_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The variant/shape flags the user set, for HfAttentionConfig."""
    return {name: getattr(args, name) for name in VARIANT_FLAGS if getattr(args, name, None) is not None}
