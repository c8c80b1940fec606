"""Speed and memory of additive (Bahdanau) attention against SDPA on the same q/k/v.

Times are medians over repeats at a fixed thread count, each additive run interleaved with an SDPA
run so that a busy machine slows both alike; ratios are to SDPA in the same process. Peak memory is
the resident-set growth during one forward+backward, sampled from /proc in a fresh subprocess per
configuration (Linux only), so compile-time memory and earlier runs do not count.

    python benchmarks/bench_additive.py --lengths 1024 4096
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_attention.attention_additive import additive_attention, naive_additive_scores  # noqa: E402


def make_inputs(length: int, heads: int, dim: int, grad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(grad)

    return {
        "query": rand(1, heads, length, dim),
        "key": rand(1, heads, length, dim),
        "value": rand(1, heads, length, dim),
        "w_q": rand(heads, dim, dim, scale=dim**-0.5),
        "w_k": rand(heads, dim, dim, scale=dim**-0.5),
        "b": rand(heads, dim, scale=0.1),
        "v": rand(heads, dim, scale=dim**-0.5),
    }


def additive_fn(inp: dict[str, torch.Tensor], backend: str, backward: bool) -> Callable[[], None]:
    def run() -> None:
        out, _ = additive_attention(**inp, backend=backend)
        if backward:
            out.sum().backward()

    return run


def naive_fn(inp: dict[str, torch.Tensor], backward: bool) -> Callable[[], None]:
    def run() -> None:
        qa = inp["query"] @ inp["w_q"] + inp["b"][:, None, :]
        ka = inp["key"] @ inp["w_k"]
        probs = torch.softmax(naive_additive_scores(qa, ka, inp["v"]), dim=-1)
        out = (probs @ inp["value"]).transpose(1, 2)
        if backward:
            out.sum().backward()

    return run


def sdpa_fn(inp: dict[str, torch.Tensor], backward: bool) -> Callable[[], None]:
    def run() -> None:
        out = F.scaled_dot_product_attention(inp["query"], inp["key"], inp["value"])
        if backward:
            out.sum().backward()

    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], None]], baseline: Callable[[], None], repeats: int
) -> dict[str, float]:
    """Median seconds per function, each run preceded by a baseline run (also reported)."""
    times: dict[str, list[float]] = {name: [] for name in fns} | {"sdpa": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            times["sdpa"].append(timed(baseline))
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_growth(fn: Callable[[], None]) -> int:
    """Largest resident-set growth (bytes) while ``fn`` runs, sampled every ~0.2 ms."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    gc.collect()
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], rss()) - base)


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a subprocess: warm up (compile) on a throwaway input, then measure one fwd+bwd."""
    torch.set_num_threads(args.threads)
    length, which = args.memory_child
    warm = make_inputs(int(length), args.heads, args.dim, grad=True, seed=1)
    inp = make_inputs(int(length), args.heads, args.dim, grad=True)
    if which == "sdpa":
        fn_warm, fn = sdpa_fn(warm, True), sdpa_fn(inp, True)
    elif which == "naive":
        fn_warm, fn = (lambda: None), naive_fn(inp, True)
    else:
        fn_warm, fn = additive_fn(warm, which, True), additive_fn(inp, which, True)
    fn_warm()
    del warm
    print(json.dumps({"peak_bytes": peak_rss_growth(fn)}))


def measure_memory(args: argparse.Namespace, length: int, which: str) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        str(length),
        which,
        "--heads",
        str(args.heads),
        "--dim",
        str(args.dim),
        "--threads",
        str(args.threads),
    ]
    # Big blocks straight from mmap, so that freed memory leaves the RSS (glibc would otherwise keep
    # blocks below its adaptive threshold, up to 32 MB, and hide later reuse of them).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--backends", nargs="+", default=["auto", "eager"], choices=["auto", "eager", "compile"]
    )
    parser.add_argument("--naive", action="store_true", help="also time the broadcast formula (6 GB at 1024)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, B=1 H={args.heads} A=D={args.dim}, fp32")
    for length in args.lengths:
        if args.memory_only:
            measure_all_memory(args, length)
            continue
        inp = make_inputs(length, args.heads, args.dim, grad=False)
        ginp = make_inputs(length, args.heads, args.dim, grad=True)
        for backend in args.backends:  # first calls: compile time when compiling
            t0 = time.perf_counter()
            additive_fn(inp, backend, False)()
            t1 = time.perf_counter()
            additive_fn(ginp, backend, True)()
            t2 = time.perf_counter()
            print(f"L={length} {backend:6s} first fwd {t1 - t0:6.2f} s, first fwd+bwd {t2 - t1:6.2f} s")
        fwd = {f"{b} fwd": additive_fn(inp, b, False) for b in args.backends}
        fwdbwd = {f"{b} fwd+bwd": additive_fn(ginp, b, True) for b in args.backends}
        if args.naive:
            fwd["naive fwd"], fwdbwd["naive fwd+bwd"] = naive_fn(inp, False), naive_fn(ginp, True)
        with torch.no_grad():
            res_f = interleaved(fwd, sdpa_fn(inp, False), args.repeats)
        res_b = interleaved(fwdbwd, sdpa_fn(ginp, True), max(3, args.repeats // 2))
        for res, label in ((res_f, "fwd"), (res_b, "fwd+bwd")):
            base = res.pop("sdpa")
            print(f"L={length} sdpa {label:8s} {base * 1e3:9.1f} ms")
            for name, sec in res.items():
                print(f"L={length} {name:16s} {sec * 1e3:9.1f} ms  = {sec / base:6.2f}x sdpa {label}")
        if not args.no_memory:
            measure_all_memory(args, length)


def measure_all_memory(args: argparse.Namespace, length: int) -> None:
    if not sys.platform.startswith("linux"):
        print("peak memory needs /proc (Linux)")
        return
    for which in [*args.backends, "sdpa"] + (["naive"] if args.naive else []):
        mb = measure_memory(args, length, which)
        print(f"L={length} peak memory fwd+bwd {which:6s} {mb:9.1f} MB")


if __name__ == "__main__":
    main()
