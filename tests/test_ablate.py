"""The ablation sweep: real accelerate launches per cell, skip and resume on rerun, failed cells, grid, table."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from hf_attention.training import ablate

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset_name", "sklearn-digits", "--image_size", "8", "--patch_size", "2", "--hidden_size", "36",
        "--num_hidden_layers", "1", "--num_attention_heads", "4", "--intermediate_size", "32", "--augment", "none",
        "--max_train_samples", "128", "--max_eval_samples", "60", "--max_train_steps", "3",
        "--per_device_train_batch_size", "32", "--do_predict", "--max_predict_samples", "60",
        "--checkpointing_steps", "2", "--logging_steps", "1"]


def test_sweep_runs_cells_survives_a_failure_skips_finished_ones_resumes_unfinished(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    # hidden 36 / 4 heads = head dim 9: RoPE needs an even head dim, so the rope cells fail and the rest go on.
    # --do_predict: validation is drawn from train (by --data_seed) and the test split is scored.
    argv = ["--task", "image_classification", "--attention_types", "standard,rope", "--position_types", "learned",
            "--seeds", "0,1", "--output_dir", str(out), "--sweep_name", "unit", "--"] + TINY
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "standard+learned-seed0: done" in printed and "standard+rope-seed1: failed" in printed
    assert (out / "standard+rope-seed0" / "FAILED").exists()
    assert "rope" in (out / "standard+rope-seed0" / "launch.log").read_text()
    # The grid is honest: rope x learned was requested and runs as standard+rope; that is said, not hidden.
    assert "rope+learned -> standard+rope (folded" in printed
    assert "rope+learned -> standard+rope (folded" in (out / "results.md").read_text()
    grid_notes = json.loads((out / "grid.json").read_text())["not_run_as_requested"]
    assert grid_notes == [{"requested": "rope+learned", "status": "folded", "runs_as": "standard+rope",
                           "reason": "attention_type 'rope' implies position_embedding_type 'rope'"}]

    # results.csv holds numbers: mean and std of the validation and test metrics over seeds.
    rows = {row["variant"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"standard+learned", "standard+rope"}
    results = [json.loads((out / f"standard+learned-seed{s}" / "all_results.json").read_text()) for s in (0, 1)]
    for metric in ("eval_accuracy", "test_accuracy"):
        values = [r[metric] for r in results]
        assert float(rows["standard+learned"][f"{metric}_mean"]) == statistics.mean(values)
        assert float(rows["standard+learned"][f"{metric}_std"]) == statistics.stdev(values)
    assert float(rows["standard+learned"]["train_runtime_mean"]) == statistics.mean(r["train_runtime"] for r in results)
    assert rows["standard+learned"]["seeds"] == "2" and rows["standard+rope"]["failed_seeds"] == "0 1"
    assert rows["standard+rope"]["eval_accuracy_mean"] == "" and rows["standard+rope"]["seeds"] == "0"
    assert int(rows["standard+learned"]["num_parameters"]) == results[0]["num_parameters"] > 0
    markdown = (out / "results.md").read_text()
    assert "| standard+learned | 2 |" in markdown and "test_accuracy" in markdown
    for result in results:
        assert result["num_processes"] == 1 and result["train_steps"] == 3

    # A rerun skips finished cells and resumes an unfinished one from its latest complete checkpoint.
    unfinished = out / "standard+learned-seed1"
    expected = json.loads((unfinished / "all_results.json").read_text())
    (unfinished / "all_results.json").unlink()
    again = ["--task", "image_classification", "--attention_types", "standard", "--position_types", "learned",
             "--seeds", "0,1", "--output_dir", str(out), "--"] + TINY
    assert ablate.main(again) == 0
    printed = capsys.readouterr().out
    assert "standard+learned-seed0: skipped" in printed
    assert "standard+learned-seed1: done (resumed from step_2)" in printed
    assert f"Resuming from {unfinished / 'step_2'}" in (unfinished / "launch.log").read_text()
    resumed = json.loads((unfinished / "all_results.json").read_text())
    assert resumed["train_steps"] == 3 and resumed["eval_accuracy"] == expected["eval_accuracy"]
    steps = [r["step"] for r in map(json.loads, (unfinished / "log.jsonl").read_text().splitlines())
             if "train_loss" in r and "train_runtime" not in r]
    assert steps == [1, 2, 3]


def test_grid_and_bad_names():
    args, recipe_args = ablate.parse_args(["--task", "summarization", "--attention_types", "sparse,rope",
                                           "--position_types", "alibi,none", "--sparse_patterns", "local,block",
                                           "--seeds", "1,2", "--output_dir", "x", "--", "--max_train_steps", "2"])
    cells, notes = ablate.plan(args)
    assert cells == ablate.grid(args)
    names = {(c["variant"], c["seed"]) for c in cells}
    # The first release's names: "sparse" is standard scoring on each pattern; "rope" fixes rotary positions
    # (and, like every scoring function now, takes the requested patterns).
    assert len(cells) == (2 * 2 + 2) * 2
    assert ("standard-block+none", 2) in names and ("standard-local+rope", 1) in names
    assert [(n["requested"], n["status"], n.get("runs_as")) for n in notes] == [
        ("rope-local+alibi", "folded", "standard-local+rope"), ("rope-local+none", "folded", "standard-local+rope"),
        ("rope-block+alibi", "folded", "standard-block+rope"), ("rope-block+none", "folded", "standard-block+rope")]
    assert recipe_args == ["--max_train_steps", "2"]
    # Every seed of a variant gets the same data split.
    commands = [ablate.cell_command(args, c, Path("x") / c["variant"], recipe_args) for c in cells]
    assert {cmd[cmd.index("--data_seed") + 1] for cmd in commands} == {"0"}
    assert {cmd[cmd.index("--seed") + 1] for cmd in commands} == {"1", "2"}
    with pytest.raises(SystemExit):
        ablate.parse_args(["--task", "summarization", "--attention_types", "dense", "--output_dir", "x"])


def test_grid_lists_impossible_and_unused_requests(monkeypatch):
    def picky(attention_type, position_embedding_type, sparse_pattern=None):  # as a variant's validation might
        if (attention_type, position_embedding_type) == ("additive", "relative"):
            return "position_embedding_type='relative' is not valid with attention_type='additive'"
        return None

    monkeypatch.setattr(ablate, "refusal", picky)
    args, _ = ablate.parse_args(["--task", "summarization", "--attention_types", "standard,additive,additive",
                                 "--position_types", "relative,alibi",
                                 "--seeds", "0,0,1", "--output_dir", "x"])
    cells, notes = ablate.plan(args)
    assert [(c["variant"], c["seed"]) for c in cells] == [
        ("standard+relative", 0), ("standard+relative", 1), ("standard+alibi", 0), ("standard+alibi", 1),
        ("additive+alibi", 0), ("additive+alibi", 1)]
    assert notes[0]["requested"] == "additive+relative" and notes[0]["status"] == "impossible"
    assert "not valid with attention_type='additive'" in notes[0]["reason"]
    assert len(notes) == 1
    # Patterns apply to every scoring function; "none" is the dense cell.
    args, _ = ablate.parse_args(["--task", "summarization", "--attention_types", "standard,additive",
                                 "--position_types", "alibi", "--sparse_patterns", "none,block", "--output_dir", "x"])
    assert [c["variant"] for c in ablate.plan(args)[0]] == [
        "standard+alibi", "standard-block+alibi", "additive+alibi", "additive-block+alibi"]
