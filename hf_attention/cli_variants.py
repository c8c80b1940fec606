"""`hf-attention-variants`: build every variant, run a forward/backward step, print one table.

A quick health check of an install: each row is a real model with its parameter count, the masked-LM
loss of one padded batch, whether every gradient is finite, and the step time.
"""

import argparse
import math
import time

import torch

from . import HfAttentionConfig, HfAttentionForMaskedLM
from .training.tables import markdown_table
from .variants import iter_variants, variant_name


def check_variant(overrides: dict, args: argparse.Namespace) -> dict:
    config = HfAttentionConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=max(args.seq_len, 512),
        sparse_window_size=16,
        sparse_block_size=16,
        sparse_stride=16,
        attn_implementation=args.attn_implementation,
        **overrides,
    )
    torch.manual_seed(args.seed)
    model = HfAttentionForMaskedLM(config)
    input_ids = torch.randint(1, args.vocab_size, (args.batch_size, args.seq_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, args.seq_len // 2 :] = 0  # one padded row: masks are exercised too
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    start = time.perf_counter()
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return {
        "variant": variant_name(
            overrides["attention_type"], overrides["position_embedding_type"], overrides.get("sparse_pattern")
        ),
        "params": sum(p.numel() for p in model.parameters()),
        "loss": float(loss),
        "ok": math.isfinite(float(loss)) and grads_finite,
        "seconds": elapsed,
    }


def format_table(rows: list[dict]) -> str:
    cells = [
        [row["variant"], f"{row['params']:,}", f"{row['loss']:.4f}", "yes" if row["ok"] else "NO",
         f"{row['seconds']:.3f}"]
        for row in rows
    ]
    return markdown_table(["variant", "parameters", "MLM loss", "fwd+bwd ok", "fwd+bwd s"], cells,
                          align=[None, "right", "right", "center", "right"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn_implementation", default="sdpa", choices=("eager", "sdpa", "flex_attention"))
    args = parser.parse_args(argv)
    rows = [check_variant(overrides, args) for overrides in iter_variants()]
    print(format_table(rows))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
