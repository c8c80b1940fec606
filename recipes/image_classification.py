"""Patch-based image classification with any attention variant, launched by accelerate.

    accelerate launch recipes/image_classification.py --dataset_name sklearn-digits --output_dir out/digits \
        --attention_type sparse --sparse_pattern local --position_embedding_type alibi

Data: `--dataset_name` (a Hub dataset such as `fashion_mnist`, or `sklearn-digits`, which ships with
scikit-learn), or local `--train_file/--validation_file` (image folders, or IDX files such as
Fashion-MNIST's `*-images-idx3-ubyte.gz` with the labels file beside them). Images go through the same
image processor that is saved with the model, so `pipeline("image-classification")` sees what training saw.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageClassification

from hf_attention.modeling_hf_attention_vision import make_image_processor
from hf_attention.training.arguments import add_common_args, parse_recipe_args
from hf_attention.training.data import TensorDictDataset, load_digits_dataset, require_columns
from hf_attention.training.metrics import accuracy
from hf_attention.training.runner import RecipeRunner, make_accelerator, model_card
from hf_attention.training.setup import build_model, load_raw_datasets, select_samples

TASK = "image-classification"
BUILTIN_DATASETS = {"sklearn-digits": load_digits_dataset}
AUGMENTATIONS = ("none", "crop", "crop_flip")
# Dataset-specific flags: part of a preset's data block, replaced with it when the user names other data.
DATA_FLAGS = ("image_column_name", "label_column_name")
DEFAULTS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, patch_size=4,
                norm_position="pre", pooling="cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                layer_norm_eps=1e-6, vocab_size=1, type_vocab_size=0, pad_token_id=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    task = parser.add_argument_group("image classification")
    task.add_argument("--image_column_name", type=str, default="image")
    task.add_argument("--label_column_name", type=str, default="label")
    task.add_argument("--train_val_split", type=float, default=0.15,
                      help="fraction of train held out when the data has no validation split")
    task.add_argument("--image_size", type=int, default=None, help="resize to this (default: the data's size)")
    task.add_argument("--num_channels", type=int, default=3, choices=(1, 3),
                      help="3 = RGB (default: what pipeline('image-classification') feeds); 1 = grey")
    task.add_argument("--augment", type=str, default="crop", choices=AUGMENTATIONS,
                      help="train transform: random crop with padding (and horizontal flips)")
    parser.set_defaults(learning_rate=1e-3, weight_decay=0.05, per_device_train_batch_size=64,
                        per_device_eval_batch_size=256, num_train_epochs=10, num_warmup_steps=50,
                        lr_scheduler_type="cosine")
    return parse_recipe_args(parser, argv, data_flags=DATA_FLAGS)


def load_splits(args: argparse.Namespace):
    """(train, eval, test) datasets; eval falls back to a seeded split of train."""
    if args.dataset_name in BUILTIN_DATASETS:
        raw = BUILTIN_DATASETS[args.dataset_name]()
    else:
        raw = load_raw_datasets(args)
    source = args.dataset_name or args.train_file or args.validation_file
    try:
        require_columns(raw, [args.image_column_name, args.label_column_name], source)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    train = raw["train"] if "train" in raw else None
    evaluation = raw["validation"] if "validation" in raw else None
    test = raw["test"] if "test" in raw else None
    if args.do_predict and test is None:  # else test_accuracy would be missing without a word
        raise SystemExit(f"--do_predict: no test split in {source}; give --test_file or pass --no-do_predict")
    if train is not None and evaluation is None:
        if test is not None and not args.do_predict:
            evaluation, test = test, None
        else:
            data_seed = args.seed if args.data_seed is None else args.data_seed
            parts = train.train_test_split(test_size=args.train_val_split, seed=data_seed,
                                           stratify_by_column=args.label_column_name)
            train, evaluation = parts["train"], parts["test"]
    return (select_samples(train, args.max_train_samples) if train is not None else None,
            select_samples(evaluation, args.max_eval_samples) if evaluation is not None else None,
            select_samples(test, args.max_predict_samples) if test is not None else None)


def encode(dataset, processor, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """All images through the image processor once (the data sets here fit in memory)."""
    mode = "L" if args.num_channels == 1 else "RGB"
    pixels, labels = [], []
    for start in range(0, len(dataset), 1024):
        rows = dataset[start : start + 1024]
        images = [image.convert(mode) for image in rows[args.image_column_name]]
        arrays = processor(images, return_tensors="np", input_data_format="channels_last"
                           if mode == "RGB" else None)["pixel_values"]
        pixels.append(torch.as_tensor(np.asarray(arrays), dtype=torch.float32))
        labels.append(torch.as_tensor(rows[args.label_column_name]))
    return {"pixel_values": torch.cat(pixels), "labels": torch.cat(labels)}


def augment_batch(batch: dict[str, torch.Tensor], augment: str) -> dict[str, torch.Tensor]:
    """Random crop after reflection padding (and flips): cheap, vectorised, torch RNG (so resumes are exact)."""
    if augment == "none":
        return batch
    pixels = batch["pixel_values"]
    size = pixels.shape[-1]
    pad = max(size // 8, 1)
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (pixels.shape[0], 2))
    span = torch.arange(size)
    rows = (offsets[:, 0, None] + span)[:, :, None]  # [B, size, 1]
    cols = (offsets[:, 1, None] + span)[:, None, :]  # [B, 1, size]
    batch_index = torch.arange(pixels.shape[0])[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2).contiguous()
    if augment == "crop_flip":
        flip = torch.rand(pixels.shape[0]) < 0.5
        crops[flip] = crops[flip].flip(-1)
    return {**batch, "pixel_values": crops}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    runner = RecipeRunner(args, accelerator)
    with accelerator.main_process_first():
        train, evaluation, test = load_splits(args)
    reference = train if train is not None else evaluation
    if reference is None:
        raise SystemExit("no training or evaluation data: give --train_file/--validation_file or --dataset_name")
    first = reference[0][args.image_column_name]
    if args.image_size is None:
        args.image_size = max(first.size)
    feature = reference.features[args.label_column_name]
    names = list(feature.names) if hasattr(feature, "names") else [str(i) for i in sorted(set(reference["label"]))]
    task_config = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                       label2id={name: i for i, name in enumerate(names)})
    if not args.model_name_or_path:
        task_config.update(image_size=args.image_size, num_channels=args.num_channels)
    model = build_model(args, AutoModelForImageClassification, DEFAULTS, task_config)
    processor = make_processor(args, model.config)
    with accelerator.main_process_first():
        encoded = {name: encode(split, processor, args) for name, split in
                   (("train", train), ("eval", evaluation), ("test", test)) if split is not None}
    runner.init_trackers(TASK)

    def augmented_loss(model, batch):
        return model(**augment_batch(batch, args.augment)).loss

    def evaluate_split(model, tensors) -> tuple[float, list[int]]:
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            TensorDictDataset(tensors), batch_size=args.per_device_eval_batch_size))
        model.eval()
        predictions, references = [], []
        for batch in loader:
            with torch.no_grad():
                logits = model(pixel_values=batch["pixel_values"]).logits
            preds, refs = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            predictions.append(preds.cpu())
            references.append(refs.cpu())
        predictions, references = torch.cat(predictions), torch.cat(references)
        return accuracy(predictions.numpy(), references.numpy()), predictions.tolist()

    def evaluate(model, epoch: int) -> dict[str, float]:
        value, _ = evaluate_split(model, encoded["eval"])
        return {"eval_accuracy": value}

    if args.do_train and "train" in encoded:
        loader = torch.utils.data.DataLoader(TensorDictDataset(encoded["train"]), shuffle=True,
                                             batch_size=args.per_device_train_batch_size)
        model = runner.train(model, loader, evaluate=evaluate if "eval" in encoded else None,
                             loss_fn=augmented_loss)
    else:
        model = accelerator.prepare(model)
    metrics, extra = {}, {}
    if "eval" in encoded and args.do_eval:
        metrics["eval_accuracy"], predictions = evaluate_split(model, encoded["eval"])
        metrics["eval_samples"] = len(encoded["eval"]["labels"])
        extra["eval_predictions.json"] = [names[p] for p in predictions]
    if "test" in encoded and args.do_predict:
        metrics["test_accuracy"], predictions = evaluate_split(model, encoded["test"])
        extra["test_predictions.json"] = [names[p] for p in predictions]
    data_desc = args.dataset_name or ", ".join(filter(None, (args.train_file, args.validation_file)))
    card = model_card(TASK, args, accelerator.unwrap_model(model).config, data_desc)
    results = runner.finish(model, processor, metrics, card, extra)
    accelerator.print(json.dumps(results, indent=2, default=float))
    return results


def make_processor(args: argparse.Namespace, config):
    """The model folder's image processor if it has one, else ViT's for this size, normalised to [-1, 1]."""
    if args.model_name_or_path and (Path(args.model_name_or_path) / "preprocessor_config.json").exists():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(args.model_name_or_path)
    channels = config.num_channels
    return make_image_processor(config, image_mean=[0.5] * channels, image_std=[0.5] * channels)


if __name__ == "__main__":
    main()
