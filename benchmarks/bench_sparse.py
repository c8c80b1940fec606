"""Speed and peak memory of the sparse attention kernels against dense SDPA (no mask), same process.

    python benchmarks/bench_sparse.py                      # CPU, 2 threads, L = 256 1024 4096
    python benchmarks/bench_sparse.py --device cuda --dtype bf16 --flex

Times are medians over ``--repeats`` rounds in which every case runs once in turn (interleaved, so a
busy core slows all cases alike); ratios are to dense SDPA without a mask in the same run. Peak memory
is measured in a fresh subprocess per case: on CPU the peak RSS (VmHWM, reset after the inputs are
made) over the RSS before the step, since tracemalloc does not see torch's allocations; on CUDA
``max_memory_allocated`` over the memory allocated before the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_MODULE_PATH = Path(__file__).resolve().parents[1] / "hf_attention" / "attention_sparse.py"


def _load_sparse():
    """Load the module from its file: no package (and no transformers) import needed to benchmark it."""
    spec = importlib.util.spec_from_file_location("bench_attention_sparse", _MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sp = _load_sparse()


def build_cases(args) -> dict:
    options = dict(window_size=args.window, stride=args.stride, block_size=args.block_size,
                   num_global_tokens=args.global_tokens, num_random_blocks=args.random_blocks, seed=0,
                   max_positions=max(args.lengths))
    patterns = {name: sp.make_sparse_pattern(name, **options) for name in sp.SPARSE_PATTERN_CLASSES}

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    def dense_masked(pattern):
        masks = {}  # built once per length, as a model would

        def run(q, k, v):
            if q.shape[2] not in masks:
                masks[q.shape[2]] = pattern.dense_mask(
                    q.shape[2], q.shape[2], causal=args.causal, device=q.device
                )
            return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[q.shape[2]])

        return run

    def sparse(pattern):
        return lambda q, k, v: sp.sparse_attention(q, k, v, pattern, causal=args.causal)

    def flex(pattern):
        return lambda q, k, v: sp.flex_sparse_attention(q, k, v, pattern, causal=args.causal)

    cases = {"dense-sdpa": (dense, True)}
    for name, pattern in patterns.items():
        cases[name] = (sparse(pattern), True)
    if args.masked:
        for name, pattern in patterns.items():
            cases[f"{name}-masked-sdpa"] = (dense_masked(pattern), True)
    if args.flex:
        backward = torch.device(args.device).type != "cpu"  # FlexAttention has no CPU backward
        for name, pattern in patterns.items():
            cases[f"{name}-flex"] = (flex(pattern), backward)
    return cases


class Inputs:
    """q, k, v as transformers hands them to attention kernels: [B, L, H, D] leaves viewed as [B, H, L, D]."""

    def __init__(self, args, seq_len: int, requires_grad: bool):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        shape = (args.batch, seq_len, args.heads, args.dim)
        self.leaves = [
            torch.randn(shape, device=args.device, dtype=dtype, requires_grad=requires_grad) for _ in range(3)
        ]
        self.views = [x.transpose(1, 2) for x in self.leaves]


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_GRADS: dict = {}


def step(fn, inputs: Inputs, backward: bool) -> None:
    if backward:
        out = fn(*inputs.views)
        # A dense upstream gradient as in a model: ``out.sum().backward()`` would feed an expanded
        # (stride-0) gradient that sends CPU bmm backward into a per-matrix loop and skews the ratios.
        key = (tuple(out.shape), out.dtype, out.device)
        if key not in _GRADS:
            _GRADS[key] = torch.randn(out.shape, dtype=out.dtype, device=out.device)
        out.backward(_GRADS[key])
        for x in inputs.leaves:
            x.grad = None
    else:
        with torch.no_grad():
            fn(*inputs.views)


def time_cases(args, seq_len: int, cases: dict) -> dict:
    inputs = Inputs(args, seq_len, requires_grad=True)
    for fn, backward in cases.values():  # warm-up: layouts, BlockMasks, compilation
        step(fn, inputs, False)
        if backward:
            step(fn, inputs, True)
    times = {(name, mode): [] for name in cases for mode in ("fwd", "fwd+bwd")}
    for _ in range(args.repeats):
        for name, (fn, backward) in cases.items():
            for mode in ("fwd", "fwd+bwd") if backward else ("fwd",):
                _sync(args.device)
                start = time.perf_counter()
                step(fn, inputs, mode == "fwd+bwd")
                _sync(args.device)
                times[name, mode].append(time.perf_counter() - start)
    return {key: statistics.median(v) if v else float("nan") for key, v in times.items()}


def measure_memory(args, name: str, seq_len: int, backward: bool) -> float:
    """Peak extra memory (MiB) of one step of one case; runs in this process (call via a subprocess)."""
    cases = build_cases(args)
    fn = cases[name][0]
    inputs = Inputs(args, seq_len, requires_grad=backward)
    step(fn, inputs, backward)  # warm-up: caches, thread pools and BLAS buffers are not the step's peak
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, inputs, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _reset_peak_rss():
        base = _proc_status("VmRSS")
        step(fn, inputs, backward)
        return (_proc_status("VmHWM") - base) / 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no reset: growth of the high-water mark
    step(fn, inputs, backward)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux


def _proc_status(field: str) -> int:
    """KiB from /proc/self/status (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM so the peak excludes the import-time high-water mark (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status("VmHWM") <= _proc_status("VmRSS") + 1024
    except OSError:
        return False


def memory_in_subprocess(argv: list[str], name: str, seq_len: int, backward: bool) -> float:
    cmd = [sys.executable, __file__, *argv, "--_memory", json.dumps([name, seq_len, backward])]
    # A fixed mmap threshold makes glibc return freed large blocks to the OS, so RSS follows live memory
    # and the warm-up step's freed buffers cannot hide the measured step's peak.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--global-tokens", type=int, default=64)
    parser.add_argument("--random-blocks", type=int, default=3)
    parser.add_argument("--masked", action="store_true", help="also time dense SDPA with each boolean mask")
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args._memory:
        name, seq_len, backward = json.loads(args._memory)
        print(measure_memory(args, name, seq_len, backward))
        return

    forwarded = [a for a in argv if a != "--_memory"]
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} B={args.batch} "
        f"H={args.heads} D={args.dim} causal={args.causal} window={args.window} stride={args.stride} "
        f"block={args.block_size} global={args.global_tokens} random={args.random_blocks} "
        f"repeats={args.repeats} torch={torch.__version__}"
    )
    header = f"{'L':>6} {'case':<20} {'fwd ms':>9} {'x dense':>8} {'fwd+bwd ms':>11} {'x dense':>8}"
    header += "" if args.no_memory else f" {'peak fwd MiB':>13} {'peak f+b MiB':>13}"
    print(header)
    summary = {}
    for seq_len in args.lengths:
        cases = build_cases(args)
        times = time_cases(args, seq_len, cases)
        ref_f, ref_b = times["dense-sdpa", "fwd"], times["dense-sdpa", "fwd+bwd"]
        for name, (_, backward) in cases.items():
            f, b = times[name, "fwd"], times[name, "fwd+bwd"]
            summary[seq_len, name] = (f / ref_f, b / ref_b)
            line = f"{seq_len:>6} {name:<20} {f * 1e3:>9.1f} {f / ref_f:>8.3f}"
            line += f" {b * 1e3:>11.1f} {b / ref_b:>8.3f}"
            if not args.no_memory:
                mem_f = memory_in_subprocess(forwarded, name, seq_len, False)
                mem_b = memory_in_subprocess(forwarded, name, seq_len, True) if backward else float("nan")
                line += f" {mem_f:>13.1f} {mem_b:>13.1f}"
            print(line, flush=True)
    target = summary.get((4096, "local"))
    if target is not None:
        verdict = "ok" if target[1] <= 0.3 else "ABOVE TARGET"
        print(f"local fwd+bwd at L=4096: {target[1]:.3f}x dense SDPA (target <= 0.3x): {verdict}")


if __name__ == "__main__":
    main()
