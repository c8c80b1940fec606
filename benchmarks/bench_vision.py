"""Vision forward+backward: HfAttentionForImageClassification vs transformers' ViTForImageClassification.

Same shape (32x32 images, patch 4, hidden 192, 6 layers, 3 heads, MLP 768, 10 classes, batch 64), standard
attention + learned positions, pre-norm, [CLS] pooling, SDPA, dropout off in both (ViT's defaults). Both
models run in one process, interleaved, at a fixed thread count; medians over the repeats after warmup.

    python benchmarks/bench_vision.py [--repeats 7] [--warmup 2] [--threads 2] [--batch 64]
"""

import argparse
import os
import statistics
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_attention import HfAttentionConfig, HfAttentionForImageClassification
from hf_attention.training.tables import markdown_table

SHAPE = dict(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
             intermediate_size=768, num_labels=10)


def build_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = HfAttentionForImageClassification(HfAttentionConfig(
        **SHAPE, attention_type="standard", position_embedding_type="learned", norm_position="pre", pooling="cls",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    ))
    vit = ViTForImageClassification(ViTConfig(**SHAPE, attn_implementation="sdpa"))
    return ours.train(), vit.train()


def step(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(pixel_values=pixels, labels=labels).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, vit = build_models()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_vit = sum(p.numel() for p in vit.parameters())
    pixels = torch.randn(args.batch, 3, SHAPE["image_size"], SHAPE["image_size"])
    labels = torch.randint(0, SHAPE["num_labels"], (args.batch,))
    times: dict[str, list[float]] = {"hf_attention": [], "ViT": []}
    order = [("hf_attention", ours), ("ViT", vit)]
    for i in range(args.warmup + args.repeats):
        for name, model in order if i % 2 == 0 else order[::-1]:  # alternate who runs first
            elapsed = step(model, pixels, labels)
            if i >= args.warmup:
                times[name].append(elapsed)
    med_ours, med_vit = statistics.median(times["hf_attention"]), statistics.median(times["ViT"])
    print(f"threads={args.threads} batch={args.batch} repeats={args.repeats} params ours={n_ours} vit={n_vit}")
    min_ours, min_vit = min(times["hf_attention"]), min(times["ViT"])
    rows = [
        ["hf_attention (standard + learned, sdpa)", f"{med_ours:.4f}", f"{med_ours / med_vit:.3f}", f"{min_ours:.4f}",
         f"{min_ours / min_vit:.3f}"],
        ["transformers ViTForImageClassification (sdpa)", f"{med_vit:.4f}", "1.000", f"{min_vit:.4f}", "1.000"],
    ]
    print(markdown_table(["model", "fwd+bwd median (s)", "median ratio to ViT", "min (s)", "min ratio"], rows))


if __name__ == "__main__":
    main()
