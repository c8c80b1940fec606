"""`hf-attention-ablate`: train a grid of variants (x seeds), each cell its own `accelerate launch`, one table.

    hf-attention-ablate --task image_classification --base_config configs/recipes/image_classification_digits.yaml \
        --attention_types standard,additive --sparse_patterns none,local --position_types learned,alibi \
        --seeds 0,1 \
        --output_dir sweeps/digits -- --do_predict --checkpointing_steps 100

Rerunning the same command continues the sweep: finished cells (their `all_results.json` exists) are skipped,
an unfinished cell with a complete checkpoint resumes from it, and the rest start afresh; a cell that fails is
marked failed (its log kept) and the sweep goes on. SIGTERM/SIGINT stop the running cell's whole process group
(launcher and training processes), wait for it, and write no results. Every cell of a variant uses the same data
split (`--data_seed`), so the spread over seeds is the spread of initialisation and data order alone.
The grid is scoring functions x sparse patterns (`none` = dense) x positional types, all read from the variant
registries. A requested combination that is folded into another cell (the first release's attention_type `rope`
implies position `rope`) or cannot be built (the config's reason) is listed as such, never silently dropped.
`results.csv` holds one row per variant with plain numbers (mean and std over seeds of the validation and test
metrics, parameters, train time, samples/s, peak memory); `results.md` shows the same as a table.
"""

import argparse
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..configuration_hf_attention import LEGACY_ATTENTION_TYPES, normalise_legacy_variant
from ..variants import attention_types, position_embedding_types, refusal, sparse_patterns, variant_name
from . import statistics as sweep_stats
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
# Which way a metric is better: higher, unless its name ends in one of these (eval_loss, eval_perplexity). The
# ranking, the best marks, the sign of an improvement in results.md and the plot's label follow it.
LOWER_IS_BETTER_SUFFIXES = ("loss", "perplexity")
PROGRESS_EVERY_S = 30.0  # a running cell prints a progress line at least this often
PROGRESS_POLL_S = 1.0


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
    parser.add_argument("--attention_types", default="standard", help="scoring functions",
                        type=lambda v: _csv_choices(v, (*attention_types(), *LEGACY_ATTENTION_TYPES),
                                                    "--attention_types"))
    parser.add_argument("--position_types", default="learned",
                        type=lambda v: _csv_choices(v, position_embedding_types(), "--position_types"))
    parser.add_argument("--sparse_patterns", default=None,
                        help="for every scoring function; 'none' is dense (default: none; legacy 'sparse': local)",
                        type=lambda v: _csv_choices(v, ("none", *sparse_patterns()), "--sparse_patterns"))
    parser.add_argument("--seeds", default="0", type=lambda v: [int(s) for s in v.split(",") if s.strip()])
    parser.add_argument("--data_seed", type=int, default=0,
                        help="seed of any split drawn from the data, the same for every cell and seed")
    parser.add_argument("--accelerate_config", type=str, default=None,
                        help="accelerate config file (default: configs/accelerate/cpu_single.yaml if present)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sweep_name", default=None, help="groups the runs in trackers (default: output dir name)")
    parser.add_argument("--recipes_dir", default=str(REPO_ROOT / "recipes"))
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--baseline", default=None,
                        help="the variant (cell name, e.g. standard+learned) the others are tested against in "
                             "results.md/csv (default: the first cell of the grid)")
    args, recipe_args = parser.parse_known_args(argv)
    if recipe_args and recipe_args[0] == "--":
        recipe_args = recipe_args[1:]
    return args, recipe_args


def plan(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The cells to run, and a note for every requested combination that is not a cell of its own.

    A note is folded (it runs as another cell: `runs_as`) or impossible (the config refuses it), with the reason.
    """
    cells: list[dict] = []
    notes: list[dict] = []
    seen: set[str] = set()
    seeds = list(dict.fromkeys(args.seeds))
    patterns = [None if p == "none" else p for p in dict.fromkeys(args.sparse_patterns or ["none"])]
    for attention in dict.fromkeys(args.attention_types):
        # The first release's attention_type "sparse" meant a pattern (default local) of standard scoring.
        own_patterns = [p for p in patterns if p] or ["local"] if attention == "sparse" else patterns
        for pattern in own_patterns:
            for position in dict.fromkeys(args.position_types):
                requested = f"{attention}{'' if pattern is None else '-' + pattern}+{position}"
                values = {"attention_type": attention, "sparse_pattern": pattern, "position_embedding_type": position}
                try:
                    values, reason = normalise_legacy_variant(values), None
                except ValueError:  # a fused legacy name fixes the positions: the cell runs with those
                    values = normalise_legacy_variant({**values, "position_embedding_type": None})
                    reason = (f"attention_type {attention!r} implies position_embedding_type "
                              f"{values['position_embedding_type']!r}")
                why_not = refusal(values["attention_type"], values["position_embedding_type"], values["sparse_pattern"])
                if why_not:
                    notes.append({"requested": requested, "status": "impossible", "reason": why_not})
                    continue
                variant = variant_name(values["attention_type"], values["position_embedding_type"],
                                       values["sparse_pattern"])
                if variant != requested and reason is None and variant in seen:
                    reason = f"the same variant as {variant}"
                if reason:
                    notes.append({"requested": requested, "status": "folded", "runs_as": variant, "reason": reason})
                if variant in seen:
                    continue
                seen.add(variant)
                for seed in seeds:
                    cell = {"variant": variant, "seed": seed, "attention_type": values["attention_type"],
                            "position_embedding_type": values["position_embedding_type"]}
                    if values["sparse_pattern"]:
                        cell["sparse_pattern"] = values["sparse_pattern"]
                    cells.append(cell)
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


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# The runner's tqdm bar as it lands in launch.log: " 34%|███▍      | 340/1000 [01:09<02:15, 4.90it/s, loss=2.3012]".
# A described bar ("Map:  50%|...") or one counting examples is not the training bar and does not match.
_TQDM_BAR = re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^\]<]*<[^\]]*?(?:, ([0-9.]+)(it/s|s/it))?(?:, ([^\]]*))?\]")
_POSTFIX_LOSS = re.compile(r"loss=([-+0-9.eE]+|nan|inf)")
_LAUNCH_TAIL_BYTES = 16384


@dataclass
class CellProgress:
    """What a running cell has shown of itself so far (None where it has not)."""

    step: int | None = None
    total: int | None = None
    rate: float | None = None  # optimiser steps per second
    loss: float | None = None  # the running training loss
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation's metrics
    eval_step: int | None = None


class CellMonitor:
    """Follows a running cell: the new complete lines of its `log.jsonl` (the runner's records: step, train_loss,
    eval metrics) since the last look, and the tail of its `launch.log` (the runner's tqdm bar: step, total steps,
    rate, running loss). A log that shrank (a resume cuts it back to its checkpoint) is read again from the start."""

    def __init__(self, cell_dir: Path):
        self.log_path = cell_dir / "log.jsonl"
        self.launch_log = cell_dir / "launch.log"
        self.progress = CellProgress()
        self._offset = 0
        self._partial = b""
        self._first_seen: tuple[float, int] | None = None  # (time, step): the rate where tqdm gives none

    def _follow_log(self) -> None:
        try:
            size = self.log_path.stat().st_size
        except OSError:
            return
        if size < self._offset:
            self._offset, self._partial = 0, b""
            self.progress.eval_metrics, self.progress.eval_step = {}, None
        with self.log_path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its end
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            self.progress.step = max(self.progress.step or 0, record["step"])
            if "train_loss" in record and "train_runtime" not in record and record["train_loss"] is not None:
                self.progress.loss = float(record["train_loss"])
            evals = {k: float(v) for k, v in record.items()
                     if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if evals:
                self.progress.eval_metrics, self.progress.eval_step = evals, record["step"]

    def _read_bar(self) -> None:
        try:
            with self.launch_log.open("rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - _LAUNCH_TAIL_BYTES))
                tail = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return
        for segment in reversed(re.split(r"[\r\n]", tail)):
            match = _TQDM_BAR.match(segment)
            if match is None:
                continue
            step, total, rate, unit, postfix = match.groups()
            self.progress.step, self.progress.total = int(step), int(total)
            if rate is not None and float(rate) > 0:
                self.progress.rate = float(rate) if unit == "it/s" else 1 / float(rate)
            loss = _POSTFIX_LOSS.search(postfix or "")
            if loss is not None:
                self.progress.loss = float(loss.group(1))
            return

    def read(self, now: float | None = None) -> CellProgress:
        """The progress now (the bar's step and loss are newer than the log's, so the bar wins where it has them)."""
        now = time.monotonic() if now is None else now
        self._follow_log()
        self._read_bar()
        step = self.progress.step
        if step is not None:
            if self._first_seen is None:
                self._first_seen = (now, step)
            elif self.progress.rate is None and step > self._first_seen[1] and now > self._first_seen[0]:
                self.progress.rate = (step - self._first_seen[1]) / (now - self._first_seen[0])
        return self.progress


def progress_line(label: str, progress: CellProgress, elapsed_s: float, metric: str | None = None) -> str:
    """One console line for a running cell: step/total, rate, ETA of its training, running loss, latest evaluation."""
    parts = []
    if progress.step is None:
        parts.append("starting (no training step logged yet)")
    elif progress.total:
        parts.append(f"step {progress.step}/{progress.total} ({100 * progress.step / progress.total:.0f}%)")
    else:
        parts.append(f"step {progress.step}")
    if progress.rate:
        parts.append(f"{progress.rate:.2f} steps/s" if progress.rate >= 1 else f"{1 / progress.rate:.1f} s/step")
    if progress.step is not None and progress.total:
        if progress.step >= progress.total:
            parts.append("training done, evaluating")
        elif progress.rate:
            parts.append(f"ETA {_duration((progress.total - progress.step) / progress.rate)}")
        else:
            parts.append("ETA unknown")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eval_metrics:
        name = next((m for m in (metric, "eval_loss") if m in progress.eval_metrics), next(iter(progress.eval_metrics)))
        parts.append(f"{name} {progress.eval_metrics[name]:.4f} (step {progress.eval_step})")
    parts.append(f"{_duration(elapsed_s)} elapsed")
    return f"{label}: " + ", ".join(parts)


def _wait_reporting(process: subprocess.Popen, monitor: CellMonitor, label: str, metric: str | None,
                    progress_every: float) -> int:
    """`process.wait()` that prints a progress line every `progress_every` seconds; signals interrupt it as before."""
    started = time.monotonic()
    next_report = started + progress_every
    while True:
        try:
            return process.wait(timeout=max(0.01, min(PROGRESS_POLL_S, next_report - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now < next_report:
            continue
        next_report = now + progress_every
        try:
            line = progress_line(label, monitor.read(now), now - started, metric)
        except Interrupted:
            raise
        except Exception as err:  # reading the logs must never end a cell
            line = f"{label}: running, {_duration(now - started)} elapsed (progress unreadable: {err})"
        print(line, flush=True)


def run_cell(command: list[str], cell_dir: Path, label: str | None = None, metric: str | None = None,
             progress_every: float = PROGRESS_EVERY_S) -> str:
    """'done', 'skipped' (finished earlier) or 'failed'; the launch log stays in the cell folder.

    The cell runs in its own process group (session): an `Interrupted` signal is forwarded to all of it,
    launcher and training processes alike, and re-raised once they are gone. While it runs, a line says which
    cell started and then every `progress_every` seconds how far it is (`progress_line`), so a long cell is
    never minutes of silence.
    """
    if (cell_dir / "all_results.json").exists():
        return "skipped"
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "FAILED").unlink(missing_ok=True)
    label = label or cell_dir.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with (cell_dir / "launch.log").open("a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            print(f"{label}: started (log: {cell_dir / 'launch.log'})", flush=True)
            code = _wait_reporting(process, CellMonitor(cell_dir), label, metric, progress_every)
        except Interrupted as stop:
            stop_process_group(process, stop.signum)
            log.write(f"\n{stop}: the sweep stopped this cell; rerun the sweep to resume it\n")
            raise
    if code != 0 or not (cell_dir / "all_results.json").exists():
        (cell_dir / "FAILED").write_text(f"exit code {code}; see launch.log\n")
        return "failed"
    return "done"


def higher_is_better(metric: str) -> bool:
    """The direction of a metric: higher is better unless its name ends in a `LOWER_IS_BETTER_SUFFIXES` entry."""
    return not metric.endswith(LOWER_IS_BETTER_SUFFIXES)


def resolve_baseline(variants: list[str], baseline: str | None, notes: list[dict] | None = None) -> str | None:
    """The baseline cell: `baseline` if it is a variant of the sweep, else a clear error; None: the first cell."""
    valid = list(dict.fromkeys(variants))
    if baseline is None:
        return valid[0] if valid else None
    if baseline in valid:
        return baseline
    hint = next((f" (the request {baseline!r} runs as {note['runs_as']!r})" for note in notes or []
                 if note.get("requested") == baseline and note.get("runs_as")), "")
    raise SystemExit(f"--baseline {baseline!r} is not a cell of this sweep{hint}; "
                     f"choose from: {', '.join(valid) or '(no cells)'}")


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    summary = sweep_stats.summarize(values)
    return summary.mean, summary.std


def _format(mean: float | None, std: float | None, pattern: str = "{:.4f}") -> str:
    if mean is None:
        return "—"
    return pattern.format(mean) + (f" ± {pattern.format(std)}" if std is not None else "")


def _ranks(values: list[float | None], higher: bool) -> list[int | None]:
    """Competition ranks (1 = best, ties share a rank); None where there is no value."""
    present = [v for v in values if v is not None]
    return [None if v is None else 1 + sum((o > v) if higher else (o < v) for o in present) for v in values]


def aggregate(task: str, cells: list[dict], output_dir: Path, baseline: str | None = None) -> list[dict]:
    """One row per variant over its seeds: plain numbers (None where there are none).

    Per metric: mean, std (ddof=1), n, the 95% Student-t CI, and against the baseline cell (default: the first
    cell) the difference of means with Welch's p-value (the default test) and the paired p-value over the common
    seeds. `rank` orders the headline metric by its direction. Keys starting with "_" are not CSV columns:
    `_values` holds the (seed, value) pairs per metric, `_notes` why a number is missing.
    """
    _, metric, others, tests = TASKS[task]
    baseline = resolve_baseline([cell["variant"] for cell in cells], baseline)
    rows: dict[str, dict] = {}
    for cell in cells:
        row = rows.setdefault(cell["variant"], {"cell": cell, "results": [], "failed": []})
        results_file = output_dir / cell["dir"] / "all_results.json"
        if results_file.exists():
            row["results"].append((cell["seed"], json.loads(results_file.read_text())))
        else:
            row["failed"].append(cell["seed"])
    present = {key for row in rows.values() for _, result in row["results"] for key in result}
    metrics = [metric, *others] + [name for name in tests if name in present]
    table = []
    for variant, row in rows.items():
        results = row["results"]

        def values(key: str, results=results) -> list[float]:
            return [float(r[key]) for _, r in results if r.get(key) is not None]

        entry = {"variant": variant, "attention_type": row["cell"].get("attention_type"),
                 "position_embedding_type": row["cell"].get("position_embedding_type"),
                 "sparse_pattern": row["cell"].get("sparse_pattern"), "seeds": len(results),
                 "failed_seeds": " ".join(map(str, row["failed"])), "is_baseline": int(variant == baseline),
                 "rank": None, "_values": {}, "_notes": {}}
        for name in metrics:
            pairs = [(seed, float(r[name])) for seed, r in results if r.get(name) is not None]
            summary = sweep_stats.summarize([value for _, value in pairs])
            entry["_values"][name] = pairs
            if summary.note:
                entry["_notes"][name] = summary.note
            entry.update({f"{name}_mean": summary.mean, f"{name}_std": summary.std, f"{name}_n": summary.n,
                          f"{name}_ci_low": summary.ci_low, f"{name}_ci_high": summary.ci_high,
                          f"{name}_diff_vs_baseline": None, f"{name}_p_value": None, f"{name}_p_value_paired": None})
        parameters = values("num_parameters")
        entry["num_parameters"] = int(parameters[0]) if parameters else None
        for key, _, _ in RESOURCES:
            entry[f"{key}_mean"] = _stats(values(key))[0]
        table.append(entry)
    reference = next((entry for entry in table if entry["is_baseline"]), None)
    for entry in table:
        if reference is None or entry is reference:
            continue
        for name in metrics:
            base_seeds, base_values = zip(*reference["_values"][name]) if reference["_values"][name] else ((), ())
            seeds, vals = zip(*entry["_values"][name]) if entry["_values"][name] else ((), ())
            welch = sweep_stats.compare(base_values, vals)
            both = sweep_stats.compare(base_values, vals, "paired", base_seeds, seeds)
            entry[f"{name}_diff_vs_baseline"], entry[f"{name}_p_value"] = welch.diff, welch.p_value
            entry[f"{name}_p_value_paired"] = both.p_value
            entry["_notes"][f"{name}_test"] = welch.reason
            entry["_notes"][f"{name}_paired_test"] = both.reason
    for entry, rank in zip(table, _ranks([e[f"{metric}_mean"] for e in table], higher_is_better(metric))):
        entry["rank"] = rank
    return table


def _headline(table: list[dict], metric: str | None) -> str:
    return metric or next(key[: -len("_mean")] for key in table[0] if key.endswith("_mean"))


def _p_text(p: float | None) -> str:
    if p is None:
        return "—"
    return (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}") + ("*" if p < sweep_stats.ALPHA else "")


def markdown_table(table: list[dict], metric: str | None = None) -> str:
    """The table for reading: the headline metric (`metric`, default the first) with mean ± std, n, 95% CI, the
    difference to the baseline and its p-value; the other metrics as mean ± std; the best value of each metric
    column in bold (by the metric's direction); a footnote that says which test, alpha and direction."""
    if not table:
        return ""
    metric = _headline(table, metric)
    metrics = [key[: -len("_mean")] for key in table[0] if key.endswith("_mean")
               and key[: -len("_mean")] not in {r[0] for r in RESOURCES}]
    others = [name for name in metrics if name != metric]
    show_paired = any(row.get(f"{metric}_p_value_paired") is not None for row in table)
    header = ["variant", "seeds", "rank", metric, "n", "95% CI", "Δ vs baseline", "p (Welch)",
              *(["p (paired)"] if show_paired else []), *others, "parameters",
              *(column for _, column, _ in RESOURCES), "failed_seeds"]
    best = {}
    for name in metrics:
        means = [row[f"{name}_mean"] for row in table if row[f"{name}_mean"] is not None]
        best[name] = (max if higher_is_better(name) else min)(means) if means else None

    def value(row: dict, name: str) -> str:
        text = _format(row[f"{name}_mean"], row[f"{name}_std"])
        return f"**{text}**" if row[f"{name}_mean"] is not None and row[f"{name}_mean"] == best[name] else text

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        n = row[f"{metric}_n"]
        if row[f"{metric}_ci_low"] is not None:
            interval = f"[{row[f'{metric}_ci_low']:.4f}, {row[f'{metric}_ci_high']:.4f}]"
        else:
            interval = "undefined (n=1)" if n == 1 else "—"
        diff = row[f"{metric}_diff_vs_baseline"]
        if row["is_baseline"]:
            delta = "baseline"
        elif diff is None:
            delta = "—"
        else:
            better = (diff > 0) == higher_is_better(metric)
            delta = f"{diff:+.4f}" + ("" if diff == 0 else " (better)" if better else " (worse)")
        cells = [row["variant"], str(row["seeds"]), str(row["rank"]) if row["rank"] is not None else "—",
                 value(row, metric), str(n), interval, delta,
                 "—" if row["is_baseline"] else _p_text(row[f"{metric}_p_value"])]
        if show_paired:
            cells.append("—" if row["is_baseline"] else _p_text(row[f"{metric}_p_value_paired"]))
        cells += [value(row, name) for name in others]
        cells.append(f"{row['num_parameters']:,}" if row["num_parameters"] is not None else "—")
        cells += [_format(row[f"{key}_mean"], None, pattern) for key, _, pattern in RESOURCES]
        cells.append(row["failed_seeds"].replace(" ", ","))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _footnote(table, metric, show_paired)


def _footnote(table: list[dict], metric: str, show_paired: bool) -> str:
    baseline = next((row["variant"] for row in table if row["is_baseline"]), None)
    higher = higher_is_better(metric)
    text = [
        f"Headline metric `{metric}`: {'higher' if higher else 'lower'} is better (rank 1 is the best mean; the best "
        "value of each metric column is in bold, by that metric's direction). mean ± std over seeds (std with "
        "ddof=1); n: seeds with a value; 95% CI: Student-t interval of the mean (n−1 degrees of freedom, undefined "
        "for n=1).",
        f"Δ vs baseline: mean(variant) − mean(baseline `{baseline}`), so a {'positive' if higher else 'negative'} Δ "
        f"is an improvement. p (Welch): {sweep_stats.TEST_NAMES['welch']}, the default, since the seeds of "
        "different variants are independent initialisations (the same `--seed` draws different weights for "
        "different architectures; the cells share only the data split, `--data_seed`). "
        f"* marks p < {sweep_stats.ALPHA} (alpha {sweep_stats.ALPHA}, two-sided, no correction for the "
        f"{max(len(table) - 1, 0)} comparisons)."
        + (" p (paired): a paired t-test over the seeds both cells share, for runs a seed couples (same data order)."
           if show_paired else ""),
    ]
    untested = [f"- {row['variant']}: {row['_notes'][f'{metric}_test']}" for row in table
                if not row["is_baseline"] and row.get("_notes", {}).get(f"{metric}_test")]
    if untested:
        text.append(f"No p-value for `{metric}`:\n\n" + "\n".join(untested))
    dropped = [f"- {row['variant']}: {row['_notes'][metric]}" for row in table
               if "non-finite" in row.get("_notes", {}).get(metric, "")]
    if dropped:
        text.append(f"Left out of `{metric}`:\n\n" + "\n".join(dropped))
    return "\n\n".join(text)


def plot_results(table: list[dict], path: Path, metric: str | None = None) -> Path:
    """The headline metric per variant: mean with its 95% CI as an error bar, every seed as a dot, the baseline in
    its own colour with a dashed line at its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _headline(table, metric)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(table) + 2), 4.2))
    colours = {True: "tab:orange", False: "tab:blue"}
    for index, row in enumerate(table):
        colour = colours[bool(row["is_baseline"])]
        seeds = [value for _, value in row["_values"].get(metric, []) if math.isfinite(value)]
        spread = [0.5] if len(seeds) < 2 else [i / (len(seeds) - 1) for i in range(len(seeds))]
        if seeds:  # a variant whose every seed failed has none
            axis.scatter([index + 0.08 + 0.2 * s for s in spread], seeds, s=16, color=colour, alpha=0.55, zorder=2)
        mean = row[f"{metric}_mean"]
        if mean is None:
            axis.annotate("no results", (index, 0.5), xycoords=("data", "axes fraction"), ha="center", color="grey")
            continue
        error = None
        if row[f"{metric}_ci_low"] is not None:
            error = [[mean - row[f"{metric}_ci_low"]], [row[f"{metric}_ci_high"] - mean]]
        axis.errorbar([index - 0.1], [mean], yerr=error, fmt="o", color=colour, capsize=5, markersize=7, zorder=3)
        if row["is_baseline"]:
            axis.axhline(mean, color=colour, linestyle="--", linewidth=1, alpha=0.6, zorder=1)
    axis.set_xticks(range(len(table)))
    labels = axis.set_xticklabels([row["variant"] + (" (baseline)" if row["is_baseline"] else "") for row in table],
                                  rotation=25, ha="right")
    for label, row in zip(labels, table):
        if row["is_baseline"]:
            label.set_fontweight("bold")
            label.set_color(colours[True])
    axis.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
    axis.set_title(f"{metric}: mean and 95% CI (Student t) over seeds; dots are seeds", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_tables(table: list[dict], output_dir: Path, notes: list[dict] | None = None,
                 metric: str | None = None) -> str:
    """results.csv (numbers, empty where none), results.md (the formatted table, its footnote, the grid notes) and
    results.png (`plot_results`, skipped with a message where matplotlib is missing)."""
    header = [key for key in table[0] if not key.startswith("_")] if table else ["variant"]
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items() if not k.startswith("_")}
                         for row in table)
    markdown = markdown_table(table, metric)
    if notes:
        markdown += "\n\nNot run as requested:\n\n" + "\n".join(f"- {describe_note(note)}" for note in notes)
    if table:
        try:
            plot_results(table, output_dir / "results.png", metric)
            markdown += "\n\n![the headline metric per variant, 95% CI and seeds](results.png)"
        except ImportError as err:
            print(f"results.png not written: {err}", file=sys.stderr)
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
    baseline = resolve_baseline([cell["variant"] for cell in cells], args.baseline, notes)
    if not args.dry_run:
        (output_dir / "grid.json").write_text(json.dumps({"cells": cells, "not_run_as_requested": notes}, indent=2))
    statuses = []
    durations: list[float] = []  # of the cells run (not skipped), for the sweep's time left
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
                started = time.monotonic()
                status = run_cell(command, cell_dir, label=f"[{index}/{len(cells)}] {cell['variant']} seed "
                                  f"{cell['seed']}", metric=TASKS[args.task][1])
                statuses.append(status)
                resumed = f" (resumed from {checkpoint.name})" if checkpoint is not None and status != "skipped" else ""
                timing = ""
                if status != "skipped":
                    durations.append(time.monotonic() - started)
                    timing = f" in {_duration(durations[-1])}"
                    if index < len(cells):
                        left = statistics.mean(durations) * (len(cells) - index)
                        timing += f"; sweep: up to ~{_duration(left)} left ({len(cells) - index} cell(s) to go)"
                print(f"[{index}/{len(cells)}] {cell['dir']}: {status}{resumed}{timing}", flush=True)
    except Interrupted as stop:
        where = f" cell {cell['dir']} and its processes stopped;" if cell and "dir" in cell else ""
        print(f"{stop}:{where} no results written. Run the same command again to resume the sweep.",
              file=sys.stderr, flush=True)
        return 128 + stop.signum
    if args.dry_run:
        return 0
    table = aggregate(args.task, cells, output_dir, baseline)
    markdown = write_tables(table, output_dir, notes, metric=TASKS[args.task][1])
    print(markdown)
    failed = statuses.count("failed")
    if failed:
        print(f"{failed} cell(s) failed; their launch.log files say why.", file=sys.stderr)
    return 1 if failed == len(cells) else 0


if __name__ == "__main__":
    raise SystemExit(main())
