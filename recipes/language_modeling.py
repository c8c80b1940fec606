"""Causal language modelling with any attention variant, launched by accelerate (nanoGPT's protocol).

    accelerate launch recipes/language_modeling.py --config configs/recipes/lm_quick.yaml --output_dir out/lm

Data: `--train_file` (plain text; `--validation_file` too, or the last `1 - --train_split` of the training text
is held out, contiguously, as nanoGPT splits Tiny Shakespeare), or `--dataset_name` with a `text` column.
Training draws `--block_size` windows at random offsets (seeded per sample index, so resumes are exact); the
validation loss is the mean next-token cross-entropy over every token of the held-out text, in
non-overlapping windows of `--block_size` (nats per token: per character with `--tokenizer_type char`).
Samples from the trained model are written to `samples.txt`.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from hf_attention.training.arguments import add_common_args, parse_recipe_args
from hf_attention.training.data import TensorDictDataset
from hf_attention.training.runner import RecipeRunner, make_accelerator, model_card
from hf_attention.training.setup import build_model, load_raw_datasets, train_wordpiece_tokenizer

TASK = "text-generation"
TOKENIZER_TYPES = ("char", "wordpiece")
# nanoGPT's CPU configuration of Tiny Shakespeare (4 layers, 4 heads, width 128, GELU MLP x4, pre-norm, no dropout).
DEFAULTS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                norm_position="pre", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                layer_norm_eps=1e-5, type_vocab_size=0, pad_token_id=None, tie_word_embeddings=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    task = parser.add_argument_group("language modelling")
    task.add_argument("--block_size", type=int, default=64, help="context length of training and evaluation")
    task.add_argument("--tokenizer_type", type=str, default="char", choices=TOKENIZER_TYPES,
                      help="tokenizer learnt from the training text when --tokenizer_name is not given")
    task.add_argument("--text_column_name", type=str, default="text")
    task.add_argument("--train_split", type=float, default=0.9,
                      help="without validation data: the first fraction of the training text trains, the rest "
                           "validates (contiguous, as nanoGPT)")
    task.add_argument("--num_samples", type=int, default=2, help="samples written to samples.txt")
    task.add_argument("--sample_length", type=int, default=300, help="new tokens per sample")
    task.add_argument("--sample_temperature", type=float, default=0.8)
    task.add_argument("--sample_top_k", type=int, default=200)
    parser.set_defaults(learning_rate=1e-3, weight_decay=0.1, per_device_train_batch_size=12,
                        per_device_eval_batch_size=64, max_train_steps=2000, num_warmup_steps=100,
                        lr_scheduler_type="cosine", logging_steps=50)
    args = parse_recipe_args(parser, argv, data_flags=("text_column_name", "train_split"))
    if args.block_size < 2:
        raise SystemExit(f"--block_size {args.block_size}: must be at least 2")
    if not 0.0 < args.train_split < 1.0:
        raise SystemExit(f"--train_split {args.train_split}: must be in (0, 1)")
    return args


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """One token per character of `text`, ids in sorted order (nanoGPT's `prepare.py` ids); decoding concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def load_texts(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(training text, validation text): whole files or dataset columns joined with newlines."""
    raw = load_raw_datasets(args)
    column = args.text_column_name

    def joined(split: str) -> str | None:
        if split not in raw:
            return None
        if column not in raw[split].column_names:
            raise SystemExit(f"the {split} data has no column {column!r} (columns: {raw[split].column_names}); "
                             "pass --text_column_name")
        return "\n".join(raw[split][column])

    train, validation = joined("train"), joined("validation")
    if train is not None and validation is None:
        cut = int(len(train) * args.train_split)
        train, validation = train[:cut], train[cut:]
    return train, validation


def load_plain_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


class RandomWindows(torch.utils.data.Dataset):
    """`num_samples` windows of `block_size + 1` tokens at offsets drawn once from `seed` (same in every process)."""

    def __init__(self, ids: torch.Tensor, block_size: int, num_samples: int, seed: int):
        if len(ids) <= block_size + 1:
            raise SystemExit(f"the training text has {len(ids)} tokens, fewer than --block_size {block_size} + 2")
        self.ids, self.block_size = ids, block_size
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(ids) - block_size - 1, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.ids[self.offsets[index] : self.offsets[index] + self.block_size + 1]
        return {"input_ids": window[:-1], "targets": window[1:]}


def next_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every position's next token (nanoGPT's loss: `block_size` predictions per window)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())


def validation_windows(ids: torch.Tensor, block_size: int, limit: int | None) -> dict[str, torch.Tensor]:
    """Non-overlapping windows covering the text (the last, shorter one dropped), with their next tokens."""
    count = (len(ids) - 1) // block_size
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise SystemExit(f"the validation text has {len(ids)} tokens, fewer than --block_size {block_size} + 1")
    inputs = ids[: count * block_size].view(count, block_size)
    targets = ids[1 : count * block_size + 1].view(count, block_size)
    return {"input_ids": inputs, "targets": targets}


@torch.no_grad()
def sample(model, tokenizer, block_size: int, length: int, temperature: float, top_k: int, seed: int,
           prompt_id: int) -> str:
    """nanoGPT's `sample.py`: temperature and top-k sampling, the context cropped to `block_size` (so absolute
    position tables never run past their length)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([[prompt_id]], device=device)
    for _ in range(length):
        logits = model(input_ids=ids[:, -block_size:]).logits[0, -1].float().cpu() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, next_id.to(device)[None]], dim=1)
    return tokenizer.decode(ids[0].tolist())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    runner = RecipeRunner(args, accelerator)
    with accelerator.main_process_first():
        if args.dataset_name is None and args.train_file and args.train_file.endswith(".txt"):
            train_text = load_plain_text(args.train_file)
            validation_text = load_plain_text(args.validation_file) if args.validation_file else None
            if validation_text is None:
                cut = int(len(train_text) * args.train_split)
                train_text, validation_text = train_text[:cut], train_text[cut:]
        else:
            train_text, validation_text = load_texts(args)
    if train_text is None:
        raise SystemExit("no training text: give --train_file or --dataset_name")

    if args.tokenizer_name or args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path,
                                                  trust_remote_code=args.trust_remote_code)
    elif args.tokenizer_type == "char":
        tokenizer = char_tokenizer(train_text)
    else:
        tokenizer = train_wordpiece_tokenizer(train_text.splitlines(), args.vocab_size)

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    train_ids = encode(train_text)
    validation_ids = encode(validation_text) if validation_text else None
    task_config = dict(vocab_size=len(tokenizer))
    if not args.model_name_or_path and not args.config_name:
        task_config["max_position_embeddings"] = args.max_position_embeddings or args.block_size
    model = build_model(args, AutoModelForCausalLM, DEFAULTS, task_config)
    runner.init_trackers(TASK)

    eval_data = (validation_windows(validation_ids, args.block_size, args.max_eval_samples)
                 if validation_ids is not None else None)

    def evaluate_loss(model) -> float:
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            TensorDictDataset(eval_data), batch_size=args.per_device_eval_batch_size))
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for batch in loader:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"]).logits.float()
            losses = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
            losses = accelerator.gather_for_metrics(losses.view(batch["targets"].shape))
            total += losses.double().sum().cpu()
            count += losses.numel()
        model.train()
        return float(total / max(count, 1))

    def evaluate(model, epoch: int) -> dict[str, float]:
        return {"eval_loss": evaluate_loss(model)}

    if args.do_train:
        samples = args.max_train_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        samples *= accelerator.num_processes
        loader = torch.utils.data.DataLoader(
            RandomWindows(train_ids, args.block_size, samples, args.seed),
            batch_size=args.per_device_train_batch_size, shuffle=False,
        )
        model = runner.train(model, loader, evaluate=None, loss_fn=next_token_loss)
    else:
        model = accelerator.prepare(model)
    metrics: dict[str, float] = {}
    extra: dict[str, str] = {}
    if eval_data is not None and args.do_eval:
        loss = evaluate_loss(model)
        metrics.update(eval_loss=loss, eval_perplexity=math.exp(min(loss, 50.0)),
                       eval_tokens=int(eval_data["targets"].numel()), eval_block_size=args.block_size)
    if accelerator.is_main_process and args.num_samples:
        unwrapped = accelerator.unwrap_model(model).eval()
        prompt = tokenizer("\n", add_special_tokens=False)["input_ids"]
        prompt_id = prompt[0] if prompt else 0
        texts = [sample(unwrapped, tokenizer, args.block_size, args.sample_length, args.sample_temperature,
                        args.sample_top_k, args.seed + i, prompt_id) for i in range(args.num_samples)]
        extra["samples.txt"] = "\n\n---\n\n".join(texts)
    data_desc = args.dataset_name or ", ".join(filter(None, (args.train_file, args.validation_file)))
    card = model_card(TASK, args, accelerator.unwrap_model(model).config, data_desc)
    results = runner.finish(model, tokenizer, metrics, card, extra)
    accelerator.print(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
