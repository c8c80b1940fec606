"""Every attention variant at the layer level against dense SDPA: forward, forward+backward, peak memory.

    python benchmarks/bench_attention.py --threads 2                       # L = 256 1024 4096
    python benchmarks/bench_attention.py --device cuda --dtype bf16

Each case is one `HfAttentionAttention` layer (q/k/v/out projections + the variant) on batch 1, 8 heads,
head dim 64. The reference is the same projections around `torch.nn.functional.scaled_dot_product_attention`
with no mask, so a ratio of 1.0 means the variant costs nothing over plain SDPA. Times are medians over
interleaved repeats in one process; peak memory is measured per case in a fresh subprocess (CPU: growth of
the peak RSS over the step; CUDA: max_memory_allocated over the step).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hf_attention import HfAttentionConfig
from hf_attention.modeling_hf_attention import AttentionInputs, HfAttentionStackMixin
from hf_attention.modeling_hf_attention import HfAttentionAttention as Attention
from hf_attention.registry_hf_attention import ATTENTION_SCORES, POSITIONAL_ENCODINGS, SPARSE_PATTERN_CLASSES
from hf_attention.training.tables import markdown_row, markdown_table


def _variants() -> dict[str, dict | None]:
    """The reference, then every scoring function, positional encoding and sparse pattern of the registries,
    each alone on top of the standard dense variant (names: the scoring function, the positional type, or
    `sparse-<pattern>`)."""
    variants: dict[str, dict | None] = {"sdpa (reference)": None}
    for name in ATTENTION_SCORES:
        variants[name] = dict(attention_type=name, position_embedding_type="none")
    for name, cls in POSITIONAL_ENCODINGS.items():
        if not cls.adds_to_embeddings and name != "none":  # absolute tables live outside the attention layer
            variants[name] = dict(attention_type="standard", position_embedding_type=name)
    for name in SPARSE_PATTERN_CLASSES:
        variants[f"sparse-{name}"] = dict(attention_type="standard", sparse_pattern=name,
                                          position_embedding_type="none")
    return variants


VARIANTS = _variants()


def _fast(name: str) -> bool:
    overrides = VARIANTS[name]
    return overrides is None or ATTENTION_SCORES[overrides["attention_type"]].fast_kernel


class Positional(HfAttentionStackMixin, torch.nn.Module):
    """The stack-level objects (rotary, bias, pattern) one layer needs, without a whole model."""

    def __init__(self, config):
        torch.nn.Module.__init__(self)
        self._build_positional(config, bidirectional=True)


def build(name: str, length: int, device: str, dtype: torch.dtype):
    heads, dim = 8, 64
    overrides = VARIANTS[name] or dict(attention_type="standard", position_embedding_type="none")
    config = HfAttentionConfig(
        hidden_size=heads * dim, num_attention_heads=heads, max_position_embeddings=max(length, 512),
        attention_probs_dropout_prob=0.0, sparse_window_size=128, sparse_block_size=64, sparse_stride=128,
        sparse_num_global_tokens=1, sparse_num_random_blocks=1, **overrides,
    )
    config._attn_implementation = "flex_attention" if device == "cuda" and "sparse" in name else "sdpa"
    torch.manual_seed(0)
    layer = Attention(config).to(device=device, dtype=dtype)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=dim**-0.5)
    positional = Positional(config).to(device)
    x = torch.randn(1, length, heads * dim, device=device, dtype=dtype)
    positions = torch.arange(length, device=device)[None]

    def inputs():
        rotary = positional.rotary_emb.rotary_tables(positions) if positional.rotary_emb is not None else None
        return AttentionInputs(q_positions=positions, k_positions=positions, key_padding_mask=None,
                               rotary=rotary, rotary_keys=rotary, positions=positional.score_bias,
                               pattern=positional.sparse_pattern)

    if VARIANTS[name] is None:
        def run(x):
            def split(t):
                return t.view(1, length, heads, dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(split(layer.q_proj(x)), split(layer.k_proj(x)), split(layer.v_proj(x)))
            return layer.out_proj(out.transpose(1, 2).reshape(1, length, heads * dim))
    else:
        def run(x):
            return layer(x, inputs())[0]
    return run, x, list(layer.parameters()) + list(positional.parameters())


def step(run, x, params, backward: bool, device: str) -> None:
    if backward:
        x = x.detach().requires_grad_()
        run(x).float().sum().backward()
        for p in params:
            p.grad = None
    else:
        with torch.no_grad():
            run(x)
    if device == "cuda":
        torch.cuda.synchronize()


def memory_case(args, name: str, length: int, backward: bool) -> float:
    run, x, params = build(name, length, args.device, DTYPES[args.dtype])
    step(run, x, params, backward, args.device)  # warm-up (compilation, caches) does not count
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(run, x, params, backward, args.device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak RSS (Linux)
        handle.write("5")
    base = _rss("VmRSS")
    step(run, x, params, backward, args.device)
    return (_rss("VmHWM") - base) / 1024


def _rss(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--slow_max_length", type=int, default=1024,
                        help="scoring functions without a fused kernel (fast_kernel=False, e.g. additive: O(N^2 d)) "
                             "are skipped beyond this length")
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory:
        name, length, backward = json.loads(args._memory)
        print(json.dumps(memory_case(args, name, length, backward)))
        return
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} batch=1 heads=8 head_dim=64 "
          f"repeats={args.repeats} (ratios to 'sdpa (reference)' in the same run)")
    header = ["variant", "L", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "fwd+bwd peak MiB"]
    print(markdown_table(header, [], align=[None, *["right"] * 6]))  # rows stream below: each takes a while
    for length in args.lengths:
        names = [n for n in args.variants if _fast(n) or length <= args.slow_max_length]
        if "sdpa (reference)" not in names:
            names.insert(0, "sdpa (reference)")
        cases = {n: build(n, length, args.device, DTYPES[args.dtype]) for n in names}
        times = {(n, b): [] for n in names for b in (False, True)}
        for n in names:  # warm-up: compilation and caches
            for b in (False, True):
                step(*cases[n], b, args.device)
        for _ in range(args.repeats):
            for n in names:
                for b in (False, True):
                    start = time.perf_counter()
                    step(*cases[n], b, args.device)
                    times[(n, b)].append(time.perf_counter() - start)
        med = {key: statistics.median(v) * 1000 for key, v in times.items()}
        for n in names:
            memory = "—"
            if not args.no_memory:
                cmd = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--threads",
                       str(args.threads), "--_memory", json.dumps([n, length, True])]
                result = subprocess.run(cmd, capture_output=True, text=True)
                memory = f"{float(result.stdout.strip().splitlines()[-1]):.0f}" if result.returncode == 0 else "error"
            ref_f, ref_b = med[("sdpa (reference)", False)], med[("sdpa (reference)", True)]
            print(markdown_row([n, length, f"{med[(n, False)]:.1f}", f"{med[(n, False)] / ref_f:.2f}x",
                                f"{med[(n, True)]:.1f}", f"{med[(n, True)] / ref_b:.2f}x", memory]), flush=True)


if __name__ == "__main__":
    main()
