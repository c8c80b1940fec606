"""`hf-attention-ablate`: train a grid of variants (x seeds), each cell its own `accelerate launch`, one table.

    hf-attention-ablate --task image_classification --base_config configs/recipes/image_classification_digits.yaml \
        --attention_types standard,sparse,additive --position_types learned,alibi --seeds 0,1 \
        --output_dir sweeps/digits -- --do_predict --checkpointing_steps 100

Rerunning the same command continues the sweep: finished cells (their `all_results.json` exists) are skipped,
an unfinished cell with a complete checkpoint resumes from it, and the rest start afresh; a cell that fails is
marked failed (its log kept) and the sweep goes on. SIGTERM/SIGINT stop the running cell's whole process group
(launcher and training processes), wait for it, and write no results. Every cell of a variant uses the same data
split (`--data_seed`), so the spread over seeds is the spread of initialisation and data order alone.
A requested combination that is folded into another cell (attention_type `rope` implies position `rope`) or
cannot be built is listed as such, never silently dropped. `results.csv` holds one row per variant with plain
numbers (mean and std over seeds of the validation and test metrics, parameters, train time, samples/s, peak
memory); `results.md` shows the same as a table.
"""

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..configuration_hf_attention import ATTENTION_TYPES, POSITION_EMBEDDING_TYPES, SPARSE_PATTERNS, HfAttentionConfig
from ..variants import iter_variants, variant_name
from .runner import latest_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = {
    # task: (recipe file, headline metric, other validation metrics, test metrics)
    "image_classification": ("image_classification.py", "eval_accuracy", (), ("test_accuracy",)),
    "question_answering": ("question_answering.py", "eval_f1", ("eval_exact_match",),
                           ("predict_f1", "predict_exact_match")),
    "summarization": ("summarization.py", "eval_rouge1", ("eval_rouge2", "eval_rougeL"),
                      ("test_rouge1", "test_rouge2", "test_rougeL")),
    "language_modeling": ("language_modeling.py", "eval_loss", ("eval_perplexity",), ()),  # lower is better
}
# Resource columns: (results key, column name, markdown format).
RESOURCES = (("train_runtime", "train_s", "{:.1f}"), ("train_samples_per_second", "samples_per_s", "{:.1f}"),
             ("peak_memory_mb", "peak_memory_mb", "{:.0f}"))
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 20.0


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
    parser.add_argument("--sparse_patterns", default=None, help="for attention_type sparse (default: local)",
                        type=lambda v: _csv_choices(v, SPARSE_PATTERNS, "--sparse_patterns"))
    parser.add_argument("--seeds", default="0", type=lambda v: [int(s) for s in v.split(",") if s.strip()])
    parser.add_argument("--data_seed", type=int, default=0,
                        help="seed of any split drawn from the data, the same for every cell and seed")
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


def plan(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The cells to run, and a note for every requested combination that is not a cell of its own.

    A note is folded (it runs as another cell: `runs_as`) or impossible (the config rejects it), with the reason.
    Which positions an attention type allows comes from the variant registry, whether it builds from the config.
    """
    cells: list[dict] = []
    notes: list[dict] = []
    seen: set[str] = set()
    seeds = list(dict.fromkeys(args.seeds))
    sparse_patterns = args.sparse_patterns or ["local"]
    for attention in dict.fromkeys(args.attention_types):
        allowed = [o["position_embedding_type"] for o in iter_variants() if o["attention_type"] == attention]
        for pattern in (sparse_patterns if attention == "sparse" else [None]):
            for position in dict.fromkeys(args.position_types):
                requested = variant_name(attention, position, pattern)
                runs_as, reason = position, None
                if position not in allowed:
                    if len(allowed) != 1:
                        notes.append({"requested": requested, "status": "impossible",
                                      "reason": f"attention_type {attention!r} allows position_embedding_type "
                                                f"{', '.join(allowed)}"})
                        continue
                    runs_as = allowed[0]
                    reason = f"attention_type {attention!r} implies position_embedding_type {runs_as!r}"
                try:
                    HfAttentionConfig(attention_type=attention, position_embedding_type=runs_as,
                                      **({"sparse_pattern": pattern} if pattern else {}))
                except ValueError as err:
                    notes.append({"requested": requested, "status": "impossible", "reason": str(err)})
                    continue
                variant = variant_name(attention, runs_as, pattern)
                if reason:
                    notes.append({"requested": requested, "status": "folded", "runs_as": variant, "reason": reason})
                if variant in seen:
                    continue
                seen.add(variant)
                for seed in seeds:
                    cell = {"variant": variant, "seed": seed, "attention_type": attention,
                            "position_embedding_type": runs_as}
                    if pattern:
                        cell["sparse_pattern"] = pattern
                    cells.append(cell)
    if args.sparse_patterns and "sparse" not in args.attention_types:
        notes.append({"requested": "--sparse_patterns " + ",".join(args.sparse_patterns), "status": "unused",
                      "reason": "no sparse attention_type in --attention_types"})
    return cells, notes


def grid(args: argparse.Namespace) -> list[dict]:
    """The cells of the sweep (see `plan` for what became of the rest of the request)."""
    return plan(args)[0]


def describe_note(note: dict) -> str:
    target = f" -> {note['runs_as']}" if note.get("runs_as") else ""
    return f"{note['requested']}{target} ({note['status']}: {note['reason']})"


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
    command += ["--output_dir", str(cell_dir), "--seed", str(cell["seed"]), "--data_seed", str(args.data_seed),
                "--attention_type", cell["attention_type"], "--position_embedding_type",
                cell["position_embedding_type"], "--sweep_name", args.sweep_name, "--run_name", cell_dir.name]
    if "sparse_pattern" in cell:
        command += ["--sparse_pattern", cell["sparse_pattern"]]
    return command + recipe_args


class Interrupted(Exception):
    """A forwarded signal arrived: the running cell was stopped and the sweep ends without results."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP raise `Interrupted` (so the running cell's processes can be stopped) while inside."""
    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _group_alive(pgid: int) -> bool:
    """True while a process of the group lives (zombies waiting for their reaper do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False


def _wait_group(process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    while _group_alive(process.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_process_group(process: subprocess.Popen, signum: int, grace: float = STOP_GRACE_S) -> None:
    """Send `signum` to the cell's process group and wait for all of it; SIGKILL what outlives `grace` seconds."""
    ignored = {s: signal.signal(s, signal.SIG_IGN) for s in FORWARDED_SIGNALS}  # a second Ctrl-C must not cut this
    try:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass
        if not _wait_group(process, grace):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_group(process, 10.0)
    finally:
        for s, old in ignored.items():
            signal.signal(s, old)


def run_cell(command: list[str], cell_dir: Path) -> str:
    """'done', 'skipped' (finished earlier) or 'failed'; the launch log stays in the cell folder.

    The cell runs in its own process group (session): an `Interrupted` signal is forwarded to all of it,
    launcher and training processes alike, and re-raised once they are gone.
    """
    if (cell_dir / "all_results.json").exists():
        return "skipped"
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "FAILED").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with (cell_dir / "launch.log").open("a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait()
        except Interrupted as stop:
            stop_process_group(process, stop.signum)
            log.write(f"\n{stop}: the sweep stopped this cell; rerun the sweep to resume it\n")
            raise
    if code != 0 or not (cell_dir / "all_results.json").exists():
        (cell_dir / "FAILED").write_text(f"exit code {code}; see launch.log\n")
        return "failed"
    return "done"


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _format(mean: float | None, std: float | None, pattern: str = "{:.4f}") -> str:
    if mean is None:
        return "—"
    return pattern.format(mean) + (f" ± {pattern.format(std)}" if std is not None else "")


def aggregate(task: str, cells: list[dict], output_dir: Path) -> list[dict]:
    """One row per variant over its seeds: plain numbers (None where there are none)."""
    _, metric, others, tests = TASKS[task]
    rows: dict[str, dict] = {}
    for cell in cells:
        row = rows.setdefault(cell["variant"], {"cell": cell, "results": [], "failed": []})
        results_file = output_dir / cell["dir"] / "all_results.json"
        if results_file.exists():
            row["results"].append(json.loads(results_file.read_text()))
        else:
            row["failed"].append(cell["seed"])
    present = {key for row in rows.values() for result in row["results"] for key in result}
    metrics = [metric, *others] + [name for name in tests if name in present]
    table = []
    for variant, row in rows.items():
        results = row["results"]

        def values(key: str, results=results) -> list[float]:
            return [float(r[key]) for r in results if r.get(key) is not None]

        entry = {"variant": variant, "attention_type": row["cell"]["attention_type"],
                 "position_embedding_type": row["cell"]["position_embedding_type"],
                 "sparse_pattern": row["cell"].get("sparse_pattern"), "seeds": len(results),
                 "failed_seeds": " ".join(map(str, row["failed"]))}
        for name in metrics:
            entry[f"{name}_mean"], entry[f"{name}_std"] = _stats(values(name))
        parameters = values("num_parameters")
        entry["num_parameters"] = int(parameters[0]) if parameters else None
        for key, _, _ in RESOURCES:
            entry[f"{key}_mean"] = _stats(values(key))[0]
        table.append(entry)
    return table


def markdown_table(table: list[dict]) -> str:
    """The table for reading: mean ± std per metric, formatted."""
    if not table:
        return ""
    metrics = [key[: -len("_mean")] for key in table[0] if key.endswith("_mean")
               and key[: -len("_mean")] not in {r[0] for r in RESOURCES}]
    header = ["variant", "seeds", *metrics, "parameters", *(column for _, column, _ in RESOURCES), "failed_seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["variant"], str(row["seeds"])]
        cells += [_format(row[f"{name}_mean"], row[f"{name}_std"]) for name in metrics]
        cells.append(f"{row['num_parameters']:,}" if row["num_parameters"] is not None else "—")
        cells += [_format(row[f"{key}_mean"], None, pattern) for key, _, pattern in RESOURCES]
        cells.append(row["failed_seeds"].replace(" ", ","))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(table: list[dict], output_dir: Path, notes: list[dict] | None = None) -> str:
    """results.csv (numbers, empty where none) and results.md (the formatted table and the grid notes)."""
    header = list(table[0]) if table else ["variant"]
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in table)
    markdown = markdown_table(table)
    if notes:
        markdown += "\n\nNot run as requested:\n\n" + "\n".join(f"- {describe_note(note)}" for note in notes)
    (output_dir / "results.md").write_text(markdown + "\n")
    return markdown


def main(argv: list[str] | None = None) -> int:
    args, recipe_args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args.sweep_name = args.sweep_name or output_dir.name
    cells, notes = plan(args)
    for note in notes:
        print(f"grid: {describe_note(note)}", flush=True)
    if not args.dry_run:
        (output_dir / "grid.json").write_text(json.dumps({"cells": cells, "not_run_as_requested": notes}, indent=2))
    statuses = []
    cell = None
    try:
        with interruptible():
            for index, cell in enumerate(cells, 1):
                cell["dir"] = f"{cell['variant']}-seed{cell['seed']}"
                cell_dir = output_dir / cell["dir"]
                command = cell_command(args, cell, cell_dir, recipe_args)
                checkpoint = None
                if not (cell_dir / "all_results.json").exists() and "--resume_from_checkpoint" not in recipe_args:
                    checkpoint = latest_checkpoint(str(cell_dir))
                if checkpoint is not None:
                    command.append("--resume_from_checkpoint")  # the latest complete checkpoint of the cell
                if args.dry_run:
                    print(" ".join(command))
                    continue
                status = run_cell(command, cell_dir)
                statuses.append(status)
                resumed = f" (resumed from {checkpoint.name})" if checkpoint is not None and status != "skipped" else ""
                print(f"[{index}/{len(cells)}] {cell['dir']}: {status}{resumed}", flush=True)
    except Interrupted as stop:
        where = f" cell {cell['dir']} and its processes stopped;" if cell and "dir" in cell else ""
        print(f"{stop}:{where} no results written. Run the same command again to resume the sweep.",
              file=sys.stderr, flush=True)
        return 128 + stop.signum
    if args.dry_run:
        return 0
    markdown = write_tables(aggregate(args.task, cells, output_dir), output_dir, notes)
    print(markdown)
    failed = statuses.count("failed")
    if failed:
        print(f"{failed} cell(s) failed; their launch.log files say why.", file=sys.stderr)
    return 1 if failed == len(cells) else 0


if __name__ == "__main__":
    raise SystemExit(main())
