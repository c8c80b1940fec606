"""`hf-attention-maps`: attention maps, per-head summaries and a bertviz export of a saved model.

    hf-attention-maps out/scitldr --text "Attention is all you need." --output_dir maps/
    hf-attention-maps out/fashion --image shoe.png --output_dir maps/

Writes `attention_<stack>.png` (layers x heads), `overlay.png` (vision: the [CLS] attention over the image),
`summaries.png` (mean attention distance and entropy per head against depth), `summaries.csv` and, for text,
`bertviz.json` (`head_view(**hf_attention.attention_maps.load_bertviz("bertviz.json"))`).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
from pathlib import Path

import torch


def _text_inputs(model_path: str, model, text: str, target: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    inputs = dict(tokenizer(text, return_tensors="pt"))
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        inputs.pop("token_type_ids", None)
    tokens = [tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())]
    if getattr(model.config, "is_encoder_decoder", False):
        target_ids = tokenizer(target or text, return_tensors="pt")["input_ids"]
        inputs["decoder_input_ids"] = target_ids
        tokens.append(tokenizer.convert_ids_to_tokens(target_ids[0].tolist()))
    return inputs, tokens


def _image_inputs(model_path: str, model, image_path: str):
    from PIL import Image
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model_path)
    except (OSError, ValueError):
        from .modeling_hf_attention_vision import make_image_processor

        processor = make_image_processor(model.config)
    image = Image.open(image_path).convert("L" if model.config.num_channels == 1 else "RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-attention-maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder (ours or any transformers model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="input text (text models)")
    source.add_argument("--image", help="input image file (vision models)")
    parser.add_argument("--target", help="decoder text for an encoder-decoder (default: the input text)")
    parser.add_argument("--layers", help="comma-separated layer indices (default: all)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    import hf_attention  # noqa: F401  (registers our classes with the Auto factories)

    from .attention_maps import (
        attention_maps,
        export_bertviz,
        plot_attention_grid,
        plot_patch_overlay,
        plot_summaries,
        summaries_table,
    )

    path = Path(args.model)
    if not path.is_dir():
        parser.error(f"no such model folder: {args.model!r}")
    config = AutoConfig.from_pretrained(args.model)
    if args.image:
        auto = AutoModelForImageClassification
    elif any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        auto = AutoModelForCausalLM
    else:
        auto = AutoModel
    model = auto.from_pretrained(args.model)
    if args.image:
        inputs = _image_inputs(args.model, model, args.image)
        tokens = None
    else:
        inputs, tokens = _text_inputs(args.model, model, args.text, args.target)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    maps = attention_maps(model, inputs, layers=layers)
    maps.tokens = tokens

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_attention_grid(maps, out / f"attention_{stack}.png", stack=stack) for stack in maps.stacks]
    if args.image:
        written.append(plot_patch_overlay(maps, inputs["pixel_values"][0], out / "overlay.png"))
    else:
        written.append(export_bertviz(maps, out / "bertviz.json"))
    written.append(plot_summaries(maps, out / "summaries.png"))
    rows = summaries_table(maps)
    with open(out / "summaries.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written.append(out / "summaries.csv")
    print(json.dumps({"written": [str(p) for p in written]}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    torch.set_grad_enabled(False)
    raise SystemExit(main())
