"""Greedy generation speed: our encoder-decoder with/without the KV cache, and against BART of the same size.

    python benchmarks/bench_generation.py --threads 2

Setting (issue #3): batch 8, source 512 tokens, 64 new tokens, d_model 256, 3+3 layers, 4 heads, FFN 1024.
Targets: cache >= 3x faster than no cache; standard variant within 1.2x of BartForConditionalGeneration.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, set_threads  # noqa: E402

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration  # noqa: E402
from hf_attention.training.tables import markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--variants", default="standard+learned,sparse-local+alibi,additive+none,rope+rope")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    common = dict(vocab_size=args.vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    bart = BartForConditionalGeneration(BartConfig(
        d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=1024, forced_eos_token_id=None,
        attn_implementation="sdpa", **common,
    )).eval()
    from hf_attention.variants import parse_variant

    ours = {}
    for name in args.variants.split(","):
        config = HfAttentionConfig(
            hidden_size=256, encoder_layers=3, decoder_layers=3, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=1024, sparse_window_size=128,
            attn_implementation="sdpa", **parse_variant(name), **common,
        )
        ours[name] = HfAttentionForConditionalGeneration(config).eval()
    source = torch.randint(3, args.vocab, (args.batch, args.source))
    mask = torch.ones_like(source)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)

    def run(model, use_cache):
        def fn():
            with torch.inference_mode():
                out = model.generate(source, attention_mask=mask, use_cache=use_cache, **gen)
            assert out.shape[1] >= args.new_tokens
        return fn

    fns = {"bart (cache)": run(bart, True)}
    for name, model in ours.items():
        fns[f"{name} (cache)"] = run(model, True)
        fns[f"{name} (no cache)"] = run(model, False)
    medians = interleaved_medians(fns, repeats=args.repeats)
    rows = []
    for name in ours:
        cached, uncached = medians[f"{name} (cache)"], medians[f"{name} (no cache)"]
        rows.append([name, f"{cached:.2f}", f"{uncached:.2f}", f"{uncached / cached:.2f}x",
                     f"{cached / medians['bart (cache)']:.2f}x"])
    print(f"threads={threads} batch={args.batch} source={args.source} new_tokens={args.new_tokens} "
          f"repeats={args.repeats}; BART with cache: {medians['bart (cache)']:.2f} s")
    print(markdown_table(["variant", "cache s", "no cache s", "cache speed-up", "time / BART"], rows))


if __name__ == "__main__":
    main()
