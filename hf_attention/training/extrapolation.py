"""`hf-attention-extrapolate`: a trained causal LM's loss at context lengths L x {1, 2, 4, 8, 16} (ALiBi's test).

    hf-attention-extrapolate out/lm-alibi-seed0 out/lm-alibi-seed1 out/lm-learned-seed0 \
        --text_file ../shared/data/lm/tinyshakespeare/input.txt --split validation --train_split 0.9 \
        --train_length 64 --factors 1,2,4,8,16 --protocol both --output_dir out/extrapolation
    hf-attention-extrapolate --sweep_dir sweeps/lm --text_file ... --output_dir out/extrapolation

Both protocols of Press et al. (2022, "Train Short, Test Long", appendix B), on a text of N tokens t_0..t_{N-1};
a window of length `length` is `length` input tokens, each predicting the token after it:
- `nonoverlapping`: window k feeds t_{kL}..t_{kL+L-1} and scores the next token of every position,
  t_{kL+1}..t_{kL+L}. Every token but t_0 is scored exactly once; the token at a window's start is the target of
  the previous window's last position, so a window has L predictions, with 0..L-1 tokens of context (the
  paper's definition, and the LM recipe's validation loss at L = `--block_size`).
- `sliding`: windows of `length` inputs start at 0, S, 2S, ... (S = `stride`); the first scores all its L
  predictions, each later one only its last S, so every scored token after the first window sees at least
  L - S tokens of context and each is scored once. S = L is `nonoverlapping`; smaller S costs L / S times more.
  Default S in the API: `length // 2`; in the CLI: `--stride`, default the training length (`--train_length`).
Only whole windows are scored (a text tail shorter than a window is dropped, as the recipe does). Losses are mean
next-token cross-entropy in nats per token. A model whose learned position table is shorter than a length is not
run there: its row has status "beyond position table" and loss None.

Models are grouped into variants by their config (attention type, sparse pattern, position type, as the sweep
names them), so several seeds of one variant give a mean and a spread. Writes `extrapolation.md` (variant x
length, mean +- std over seeds, per protocol), `extrapolation.csv` (one row per model, protocol and length),
`extrapolation.json` (the rows and the summary) and `extrapolation.png` (loss against length, log2 axis, a line
per variant with its min-max band over seeds, a panel per protocol).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..variants import position_table_length
from .tables import markdown_table as _markdown_table

PROTOCOLS = ("nonoverlapping", "sliding")
SPLITS = ("validation", "train", "all")
STATUS_OK = "ok"
STATUS_BEYOND_TABLE = "beyond position table"
STATUS_TEXT_TOO_SHORT = "text too short"


def position_table_size(model: nn.Module) -> int | None:
    """Longest input the model's absolute position table covers; None when its positions have no end."""
    sizes = [module.num_embeddings for name, module in model.named_modules()
             if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe")]
    if sizes:
        return min(sizes)
    config = getattr(model, "config", None)
    return position_table_length(config) if config is not None else None


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _window_plan(num_tokens: int, length: int, protocol: str, stride: int) -> tuple[list[int], list[int]]:
    """Start of each window and how many of its last predictions are scored."""
    last_start = num_tokens - 1 - length  # a window needs `length` inputs plus the target after the last one
    if last_start < 0:
        return [], []
    step = length if protocol == "nonoverlapping" else stride
    starts = list(range(0, last_start + 1, step))
    scored = [length] + [step] * (len(starts) - 1)
    return starts, scored


@torch.no_grad()
def evaluate_lengths(
    model: nn.Module,
    token_ids: torch.Tensor,
    lengths: list[int],
    protocol: str = "nonoverlapping",
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> list[dict]:
    """One row per length: {length, protocol, stride, loss, tokens, status} (protocols: see the module docstring).

    `stride` (sliding only): scored tokens per window, default `length // 2`, capped at `length`. `max_tokens`
    keeps only the first `max_tokens + 1` tokens of the text, so at most `max_tokens` are scored (long windows
    stay cheap on CPU). The model runs in eval mode without a cache; its training mode is restored after.
    """
    _check_choice("protocol", protocol, PROTOCOLS)
    if stride is not None and stride < 1:
        raise ValueError(f"stride={stride}: must be a positive number of tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be positive")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be positive (or None for the whole text)")
    bad = [length for length in lengths if int(length) < 1]
    if bad:
        raise ValueError(f"lengths {bad}: every context length must be a positive number of tokens")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    table = position_table_size(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        for length in map(int, lengths):
            window_stride = length if protocol == "nonoverlapping" else min(stride or max(1, length // 2), length)
            row = {"length": length, "protocol": protocol, "stride": window_stride, "loss": None, "tokens": 0}
            starts, scored = _window_plan(len(ids), length, protocol, window_stride)
            if table is not None and length > table:
                row["status"] = STATUS_BEYOND_TABLE
            elif not starts:
                row["status"] = STATUS_TEXT_TOO_SHORT
            else:
                total, count = _score_windows(model, ids, length, starts, scored, batch_size, device)
                row.update(loss=total / count, tokens=count, status=STATUS_OK)
            rows.append(row)
    finally:
        model.train(was_training)
    return rows


def _score_windows(model, ids, length, starts, scored, batch_size, device) -> tuple[float, int]:
    """Summed cross-entropy (float64) of each window's last `scored` predictions, and their count."""
    offsets = torch.arange(length + 1)
    total, count = 0.0, 0
    for first in range(0, len(starts), batch_size):
        batch_starts = torch.tensor(starts[first : first + batch_size])
        windows = ids[batch_starts[:, None] + offsets].to(device)
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(batch_starts), length).double()
        keep = torch.tensor(scored[first : first + batch_size], device=device)
        mask = torch.arange(length, device=device)[None] >= (length - keep)[:, None]
        total += float(losses[mask].sum())
        count += int(mask.sum())
    return total, count


# ----------------------------------------------------------------------------------------------------------------
# Reports: rows of several seeds per variant -> table, csv, plot.


def _ok_losses(runs: list[list[dict]], protocol: str, length: int) -> tuple[list[float], list[str]]:
    losses, statuses = [], []
    for rows in runs:
        for row in rows:
            if row["protocol"] == protocol and row["length"] == length:
                if row["status"] == STATUS_OK:
                    losses.append(row["loss"])
                else:
                    statuses.append(row["status"])
    return losses, statuses


def _lengths_and_protocols(rows_by_variant: dict[str, list[list[dict]]]) -> tuple[list[int], list[str]]:
    rows = [row for runs in rows_by_variant.values() for seed_rows in runs for row in seed_rows]
    lengths = sorted({row["length"] for row in rows})
    protocols = [p for p in PROTOCOLS if any(row["protocol"] == p for row in rows)]
    return lengths, protocols


def summarize(rows_by_variant: dict[str, list[list[dict]]]) -> list[dict]:
    """Per variant, protocol and length: mean, std (0 for one seed), min, max, n seeds; status when none ran."""
    lengths, protocols = _lengths_and_protocols(rows_by_variant)
    summary = []
    for variant, runs in rows_by_variant.items():
        for protocol in protocols:
            for length in lengths:
                losses, statuses = _ok_losses(runs, protocol, length)
                if not losses and not statuses:
                    continue
                entry = {"variant": variant, "protocol": protocol, "length": length, "seeds": len(losses),
                         "mean": None, "std": None, "min": None, "max": None,
                         "status": STATUS_OK if losses else statuses[0]}
                if losses:
                    entry.update(mean=statistics.fmean(losses),
                                 std=statistics.stdev(losses) if len(losses) > 1 else 0.0,
                                 min=min(losses), max=max(losses))
                if statuses and losses:  # some seeds ran, others did not: say so
                    entry["status"] = f"{STATUS_OK} ({len(statuses)} not run: {statuses[0]})"
                summary.append(entry)
    return summary


def markdown_table(rows_by_variant: dict[str, list[list[dict]]]) -> str:
    """One table per protocol: variant x length, `mean ± std (n)` nats/token, or the reason a cell did not run."""
    lengths, protocols = _lengths_and_protocols(rows_by_variant)
    by_key = {(e["variant"], e["protocol"], e["length"]): e for e in summarize(rows_by_variant)}
    parts = []
    for protocol in protocols:
        strides = sorted({row["stride"] for runs in rows_by_variant.values() for rows in runs for row in rows
                          if row["protocol"] == protocol})
        title = f"### {protocol}" + (f" (stride {', '.join(map(str, strides))})" if protocol == "sliding" else "")
        table = []
        for variant in rows_by_variant:
            cells = []
            for length in lengths:
                entry = by_key.get((variant, protocol, length))
                if entry is None:
                    cells.append("")
                elif entry["mean"] is None:
                    cells.append(entry["status"])
                else:
                    cells.append(f"{entry['mean']:.4f} ± {entry['std']:.4f} ({entry['seeds']})")
            table.append([variant, *cells])
        header = ["variant", *(f"L={length}" for length in lengths)]
        parts.append(f"{title}\n\n{_markdown_table(header, table)}")
    note = "Mean next-token cross-entropy (nats/token) ± std over seeds (number of seeds)."
    return "\n\n".join([note, *parts]) + "\n"


def plot_extrapolation(rows_by_variant: dict[str, list[list[dict]]], path: str | Path) -> Path:
    """Loss against length (log2 axis), a line per variant (mean over seeds) and its min-max band; a panel per
    protocol. A variant that stops (a position table too short) simply ends where it last ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, protocols = _lengths_and_protocols(rows_by_variant)
    by_key = {(e["variant"], e["protocol"], e["length"]): e for e in summarize(rows_by_variant)}
    figure, axes = plt.subplots(1, max(len(protocols), 1), figsize=(6 * max(len(protocols), 1), 4.5),
                                squeeze=False, sharey=True)
    for axis, protocol in zip(axes[0], protocols):
        for variant in rows_by_variant:
            entries = [e for e in (by_key.get((variant, protocol, length)) for length in lengths) if e is not None]
            points = [e for e in entries if e["mean"] is not None]
            if not points:
                continue
            skipped = [e for e in entries if e["mean"] is None]
            label = variant + (f" (from {skipped[0]['length']}: {skipped[0]['status']})" if skipped else "")
            xs = [p["length"] for p in points]
            (line,) = axis.plot(xs, [p["mean"] for p in points], marker="o", label=label)
            axis.fill_between(xs, [p["min"] for p in points], [p["max"] for p in points],
                              color=line.get_color(), alpha=0.2, linewidth=0)
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.set_xlabel("context length (tokens)")
        axis.set_title(protocol)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats/token)")
    axes[0][-1].legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _int_list(value: str) -> list[int]:
    try:
        items = [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated integers, e.g. 1,2,4,8,16") from None
    if not items or any(item < 1 for item in items):
        raise argparse.ArgumentTypeError(f"{value!r}: expected positive integers, e.g. 1,2,4,8,16")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("model_dirs", nargs="*", help="saved causal LMs (config, weights and tokenizer)")
    parser.add_argument("--sweep_dir", action="append", default=[],
                        help="a sweep's output folder (hf-attention-ablate): every subfolder with a config.json")
    parser.add_argument("--text_file", required=True, help="plain text the models are scored on")
    parser.add_argument("--split", default="validation", choices=SPLITS,
                        help="validation: the text after the first --train_split fraction (the LM recipe's split)")
    parser.add_argument("--train_split", type=float, default=0.9)
    parser.add_argument("--train_length", type=int, default=None,
                        help="training context length L (default: the first model's max_position_embeddings, "
                             "which the LM recipe sets to --block_size)")
    parser.add_argument("--factors", type=_int_list, default=[1, 2, 4, 8, 16], help="lengths are L x factor")
    parser.add_argument("--protocol", default="both", choices=(*PROTOCOLS, "both"))
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding: tokens scored per window (default: --train_length)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=None, help="score at most this many tokens per length")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if not 0.0 < args.train_split < 1.0:
        parser.error(f"--train_split {args.train_split}: must be in (0, 1)")
    for name in ("train_length", "stride", "batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be a positive integer")
    for sweep in args.sweep_dir:
        found = sorted(str(p.parent) for p in Path(sweep).glob("*/config.json"))
        if not found:
            parser.error(f"--sweep_dir {sweep}: no subfolder with a config.json")
        args.model_dirs.extend(found)
    if not args.model_dirs:
        parser.error("give at least one MODEL_DIR or --sweep_dir")
    return args


def select_text(text: str, split: str, train_split: float) -> str:
    """The LM recipe's contiguous split on characters: the first `train_split` trains, the rest validates."""
    _check_choice("split", split, SPLITS)
    cut = int(len(text) * train_split)
    return {"validation": text[cut:], "train": text[:cut], "all": text}[split]


def variant_of(config) -> str:
    from ..variants import variant_name  # noqa: I001

    return variant_name(config.attention_type, config.position_embedding_type, getattr(config, "sparse_pattern", None))


def run(argv: list[str] | None = None) -> dict:
    """The CLI's work: evaluate every model, write the four files, return what extrapolation.json holds."""
    args = parse_args(argv)
    # importing this module imported the hf_attention package, which registers its Auto classes
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    text = select_text(Path(args.text_file).read_text(encoding="utf-8"), args.split, args.train_split)
    train_length = args.train_length
    if train_length is None:
        train_length = AutoConfig.from_pretrained(args.model_dirs[0],
                                                  trust_remote_code=args.trust_remote_code).max_position_embeddings
    lengths = [train_length * factor for factor in dict.fromkeys(args.factors)]
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    stride = args.stride or train_length
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    rows_by_variant: dict[str, list[list[dict]]] = {}
    flat: list[dict] = []
    for model_dir in args.model_dirs:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        variant = variant_of(model.config)
        rows = []
        for protocol in protocols:
            rows += evaluate_lengths(model, ids, lengths, protocol, stride=stride, batch_size=args.batch_size,
                                     max_tokens=args.max_tokens)
        for row in rows:
            row.update(variant=variant, model_dir=str(model_dir))
            loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
            print(f"{variant:<24} {Path(model_dir).name:<28} {row['protocol']:<14} L={row['length']:<6} "
                  f"loss={loss} tokens={row['tokens']} {row['status']}", file=sys.stderr)
        rows_by_variant.setdefault(variant, []).append(rows)
        flat += rows
        del model

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fields = ["variant", "model_dir", "protocol", "length", "stride", "loss", "tokens", "status"]
    with (output_dir / "extrapolation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows({key: row[key] for key in fields} for row in flat)
    markdown = markdown_table(rows_by_variant)
    header = (f"# Length extrapolation\n\nText: {args.text_file} ({args.split}, train_split {args.train_split}); "
              f"training length {train_length}; lengths {lengths}.\n\n")
    (output_dir / "extrapolation.md").write_text(header + markdown)
    summary = summarize(rows_by_variant)
    results = {"train_length": train_length, "lengths": lengths, "protocols": list(protocols),
               "sliding_stride": stride, "text_file": args.text_file, "split": args.split,
               "train_split": args.train_split, "max_tokens": args.max_tokens, "rows": flat, "summary": summary}
    (output_dir / "extrapolation.json").write_text(json.dumps(results, indent=2))
    plot_extrapolation(rows_by_variant, output_dir / "extrapolation.png")
    print(markdown)
    return results


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    main()
