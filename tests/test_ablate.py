"""The ablation sweep: real accelerate launches per cell, skip of finished cells, failed cells, the table."""

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
        "--per_device_train_batch_size", "32"]


def test_sweep_runs_cells_survives_a_failure_skips_finished_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    # hidden 36 / 4 heads = head dim 9: RoPE needs an even head dim, so the rope cells fail and the rest go on.
    argv = ["--task", "image_classification", "--attention_types", "standard,rope", "--position_types", "learned",
            "--seeds", "0,1", "--output_dir", str(out), "--sweep_name", "unit", "--"] + TINY
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "standard+learned-seed0: done" in printed and "rope+rope-seed1: failed" in printed
    assert (out / "rope+rope-seed0" / "FAILED").exists()
    assert "rope" in (out / "rope+rope-seed0" / "launch.log").read_text()

    rows = {row["variant"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"standard+learned", "rope+rope"}
    accuracies = [json.loads((out / f"standard+learned-seed{s}" / "all_results.json").read_text())["eval_accuracy"]
                  for s in (0, 1)]
    expected = f"{statistics.mean(accuracies):.4f} ± {statistics.stdev(accuracies):.4f}"
    assert rows["standard+learned"]["eval_accuracy"] == expected
    assert rows["standard+learned"]["seeds"] == "2" and rows["rope+rope"]["failed_seeds"] == "0,1"
    assert int(rows["standard+learned"]["parameters"].replace(",", "")) > 0
    assert "| standard+learned | 2 |" in (out / "results.md").read_text()
    for seed in (0, 1):
        results = json.loads((out / f"standard+learned-seed{seed}" / "all_results.json").read_text())
        assert results["num_processes"] == 1

    again = ["--task", "image_classification", "--attention_types", "standard", "--position_types", "learned",
             "--seeds", "0,1", "--output_dir", str(out), "--"] + TINY
    assert ablate.main(again) == 0
    assert capsys.readouterr().out.count(": skipped") == 2


def test_grid_and_bad_names():
    args, recipe_args = ablate.parse_args(["--task", "summarization", "--attention_types", "sparse,rope",
                                           "--position_types", "alibi,none", "--sparse_patterns", "local,block",
                                           "--seeds", "1,2", "--output_dir", "x", "--", "--max_train_steps", "2"])
    cells = ablate.grid(args)
    names = {(c["variant"], c["seed"]) for c in cells}
    assert len(cells) == (2 * 2 + 1) * 2
    assert ("sparse-block+none", 2) in names and ("rope+rope", 1) in names
    assert recipe_args == ["--max_train_steps", "2"]
    with pytest.raises(SystemExit):
        ablate.parse_args(["--task", "summarization", "--attention_types", "linear", "--output_dir", "x"])
