"""`hf-attention-ablate`: train a grid of variants (x seeds), each cell its own `accelerate launch`, one table.

    hf-attention-ablate --task image_classification --base_config configs/recipes/image_classification_digits.yaml \
        --attention_types standard,sparse,additive --position_types learned,alibi --seeds 0,1 \
        --output_dir sweeps/digits

Cells that already finished (their `all_results.json` exists) are skipped, so a sweep resumes where it
stopped; a cell that fails is marked failed (its log kept) and the sweep goes on. `results.csv` and
`results.md` hold one row per variant: the task metric as mean ± std over seeds, parameters, train time,
samples/s and peak memory.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from itertools import product
from pathlib import Path

from ..configuration_hf_attention import ATTENTION_TYPES, POSITION_EMBEDDING_TYPES, SPARSE_PATTERNS
from ..variants import variant_name

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = {
    # task: (recipe file, headline metric, other metrics shown)
    "image_classification": ("image_classification.py", "eval_accuracy", ()),
    "question_answering": ("question_answering.py", "eval_f1", ("eval_exact_match",)),
    "summarization": ("summarization.py", "eval_rouge1", ("eval_rouge2", "eval_rougeL")),
}


def _csv_choices(value: str, valid: tuple[str, ...], flag: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    bad = [item for item in items if item not in valid]
    if bad:
        raise argparse.ArgumentTypeError(f"{flag}: {', '.join(bad)} not valid; choose from {', '.join(valid)}")
    return items


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=tuple(TASKS))
    parser.add_argument("--base_config", type=str, default=None, help="recipe YAML shared by every cell")
    parser.add_argument("--attention_types", default="standard",
                        type=lambda v: _csv_choices(v, ATTENTION_TYPES, "--attention_types"))
    parser.add_argument("--position_types", default="learned",
                        type=lambda v: _csv_choices(v, POSITION_EMBEDDING_TYPES, "--position_types"))
    parser.add_argument("--sparse_patterns", default="local",
                        type=lambda v: _csv_choices(v, SPARSE_PATTERNS, "--sparse_patterns"))
    parser.add_argument("--seeds", default="0", type=lambda v: [int(s) for s in v.split(",") if s.strip()])
    parser.add_argument("--accelerate_config", type=str, default=None,
                        help="accelerate config file (default: configs/accelerate/cpu_single.yaml if present)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sweep_name", default=None, help="groups the runs in trackers (default: output dir name)")
    parser.add_argument("--recipes_dir", default=str(REPO_ROOT / "recipes"))
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args, recipe_args = parser.parse_known_args(argv)
    if recipe_args and recipe_args[0] == "--":
        recipe_args = recipe_args[1:]
    return args, recipe_args


def grid(args: argparse.Namespace) -> list[dict]:
    """Cells of the grid; rope attention implies rope positions, so it gets one position type."""
    cells = []
    for attention in args.attention_types:
        patterns = args.sparse_patterns if attention == "sparse" else [None]
        positions = ["rope"] if attention == "rope" else args.position_types
        for pattern, position, seed in product(patterns, positions, args.seeds):
            variant = variant_name(attention, position, pattern)
            cell = {"variant": variant, "seed": seed, "attention_type": attention, "position_embedding_type": position}
            if pattern:
                cell["sparse_pattern"] = pattern
            cells.append(cell)
    return cells


def cell_command(args: argparse.Namespace, cell: dict, cell_dir: Path, recipe_args: list[str]) -> list[str]:
    recipe = Path(args.recipes_dir) / TASKS[args.task][0]
    if not recipe.exists():
        raise SystemExit(f"recipe {recipe} not found; pass --recipes_dir (the repository's recipes/ folder)")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    accelerate_config = args.accelerate_config or REPO_ROOT / "configs" / "accelerate" / "cpu_single.yaml"
    if Path(accelerate_config).exists():
        command += ["--config_file", str(accelerate_config)]
    command += [str(recipe)]
    if args.base_config:
        command += ["--config", args.base_config]
    command += ["--output_dir", str(cell_dir), "--seed", str(cell["seed"]), "--attention_type", cell["attention_type"],
                "--position_embedding_type", cell["position_embedding_type"],
                "--sweep_name", args.sweep_name, "--run_name", cell_dir.name]
    if "sparse_pattern" in cell:
        command += ["--sparse_pattern", cell["sparse_pattern"]]
    return command + recipe_args


def run_cell(command: list[str], cell_dir: Path) -> str:
    """'done', 'skipped' (finished earlier) or 'failed'; the launch log stays in the cell folder."""
    if (cell_dir / "all_results.json").exists():
        return "skipped"
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "FAILED").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with (cell_dir / "launch.log").open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not (cell_dir / "all_results.json").exists():
        (cell_dir / "FAILED").write_text(f"exit code {code}; see launch.log\n")
        return "failed"
    return "done"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def aggregate(task: str, cells: list[dict], output_dir: Path) -> list[dict]:
    """One row per variant over its seeds."""
    metric, others = TASKS[task][1], TASKS[task][2]
    rows: dict[str, dict] = {}
    for cell in cells:
        row = rows.setdefault(cell["variant"], {"variant": cell["variant"], "results": [], "failed": []})
        results_file = output_dir / cell["dir"] / "all_results.json"
        if results_file.exists():
            row["results"].append(json.loads(results_file.read_text()))
        else:
            row["failed"].append(cell["seed"])
    table = []
    for row in rows.values():
        results = row["results"]

        def values(key: str, results=results) -> list[float]:
            return [float(r[key]) for r in results if r.get(key) is not None]

        entry = {
            "variant": row["variant"],
            "seeds": len(results),
            metric: _mean_std(values(metric)),
            **{name: _mean_std(values(name)) for name in others},
            "parameters": f"{int(values('num_parameters')[0]):,}" if values("num_parameters") else "—",
            "train_s": f"{statistics.mean(values('train_runtime')):.1f}" if values("train_runtime") else "—",
            "samples_per_s": (f"{statistics.mean(values('train_samples_per_second')):.1f}"
                              if values("train_samples_per_second") else "—"),
            "peak_memory_mb": f"{statistics.mean(values('peak_memory_mb')):.0f}" if values("peak_memory_mb") else "—",
            "failed_seeds": ",".join(map(str, row["failed"])) or "",
        }
        table.append(entry)
    return table


def write_tables(table: list[dict], output_dir: Path) -> str:
    header = list(table[0]) if table else []
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in table]
    markdown = "\n".join(lines)
    (output_dir / "results.md").write_text(markdown + "\n")
    return markdown


def main(argv: list[str] | None = None) -> int:
    args, recipe_args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args.sweep_name = args.sweep_name or output_dir.name
    cells = grid(args)
    statuses = []
    for index, cell in enumerate(cells, 1):
        cell["dir"] = f"{cell['variant']}-seed{cell['seed']}"
        command = cell_command(args, cell, output_dir / cell["dir"], recipe_args)
        if args.dry_run:
            print(" ".join(command))
            continue
        status = run_cell(command, output_dir / cell["dir"])
        statuses.append(status)
        print(f"[{index}/{len(cells)}] {cell['dir']}: {status}", flush=True)
    if args.dry_run:
        return 0
    markdown = write_tables(aggregate(args.task, cells, output_dir), output_dir)
    print(markdown)
    failed = statuses.count("failed")
    if failed:
        print(f"{failed} cell(s) failed; their launch.log files say why.", file=sys.stderr)
    return 1 if failed == len(cells) else 0


if __name__ == "__main__":
    raise SystemExit(main())
