"""The sweep's statistics (CI, Welch and paired tests against naive formulas), the results table and plot built
from fake cell folders with a baseline, the metric direction, the --baseline check, and the live progress line."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from hf_attention.training import ablate
from hf_attention.training import statistics as sweep_stats

# ---- naive references --------------------------------------------------------------------------------------


def naive_mean(values):
    return sum(values) / len(values)


def naive_var(values):
    m = naive_mean(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


def naive_ci(values, confidence=0.95):
    n = len(values)
    half = scipy_stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * math.sqrt(naive_var(values) / n)
    return naive_mean(values) - half, naive_mean(values) + half


def naive_welch(a, b):
    """t of b against a, Welch-Satterthwaite df, two-sided p from the t tail."""
    va, vb = naive_var(a) / len(a), naive_var(b) / len(b)
    t = (naive_mean(b) - naive_mean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, 2 * scipy_stats.t.sf(abs(t), df)


def naive_paired(a, b):
    d = [y - x for x, y in zip(a, b)]
    t = naive_mean(d) / math.sqrt(naive_var(d) / len(d))
    return naive_mean(d), t, 2 * scipy_stats.t.sf(abs(t), len(d) - 1)


# ---- statistics.py -----------------------------------------------------------------------------------------


def test_summary_mean_std_and_t_interval():
    values = [0.81, 0.84, 0.79, 0.86, 0.80]
    summary = sweep_stats.summarize(values)
    assert summary.n == 5
    assert summary.mean == pytest.approx(naive_mean(values), abs=1e-15)
    assert summary.std == pytest.approx(math.sqrt(naive_var(values)), rel=1e-12)
    low, high = naive_ci(values)
    assert (summary.ci_low, summary.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert summary.note is None
    # Two values: the t quantile of 1 df is 12.706 (the textbook table), not 1.96.
    pair = sweep_stats.summarize([1.0, 2.0])
    assert pair.ci_high - pair.mean == pytest.approx(12.7062047 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)
    # One seed: no std, no CI, and the reason; never a made-up number.
    one = sweep_stats.summarize([0.5])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.5, None, None, None)
    assert "n=1" in one.note
    assert sweep_stats.summarize([]).mean is None and sweep_stats.summarize([]).n == 0
    # A diverged seed's NaN is left out (and said), it does not poison the mean.
    nan = sweep_stats.summarize([1.0, float("nan"), 3.0])
    assert nan.n == 2 and nan.mean == 2.0 and "non-finite" in nan.note


def test_welch_p_value_matches_the_hand_formula():
    baseline, variant = [0.71, 0.74, 0.69, 0.73], [0.78, 0.80, 0.75, 0.83, 0.79, 0.74]
    result = sweep_stats.compare(baseline, variant)
    t, df, p = naive_welch(baseline, variant)
    assert result.test == sweep_stats.DEFAULT_TEST == "welch"
    assert result.diff == pytest.approx(naive_mean(variant) - naive_mean(baseline), rel=1e-12)
    assert result.statistic == pytest.approx(t, rel=1e-10) and result.df == pytest.approx(df, rel=1e-10)
    assert result.p_value == pytest.approx(p, rel=1e-8) and result.significant()
    # One side without variance still has a defined test (the other side's variance carries it).
    flat = sweep_stats.compare([1.0, 1.0, 1.0], [1.2, 1.5, 1.1])
    assert flat.p_value == pytest.approx(naive_welch([1.0, 1.0, 1.0], [1.2, 1.5, 1.1])[2], rel=1e-8)


def test_paired_p_value_matches_the_hand_formula_over_common_seeds():
    baseline_seeds, baseline = [0, 1, 2, 3], [2.10, 2.04, 2.20, 2.15]
    seeds, variant = [3, 1, 0, 2, 7], [2.05, 2.00, 2.02, 2.16, 1.5]  # another order, and seed 7 the baseline lacks
    result = sweep_stats.compare(baseline, variant, "paired", baseline_seeds, seeds)
    by_seed = dict(zip(seeds, variant))
    diff, t, p = naive_paired(baseline, [by_seed[s] for s in baseline_seeds])
    assert result.n == 4 and result.test == "paired"
    assert result.diff == pytest.approx(diff, rel=1e-12) and result.statistic == pytest.approx(t, rel=1e-10)
    assert result.p_value == pytest.approx(p, rel=1e-8)
    with pytest.raises(ValueError, match="baseline_seeds"):
        sweep_stats.compare(baseline, variant, "paired")
    with pytest.raises(ValueError, match="welch, paired"):
        sweep_stats.compare(baseline, variant, "mann-whitney")


def test_undefined_tests_give_none_and_the_reason():
    one = sweep_stats.compare([0.5], [0.6, 0.7])
    assert one.p_value is None and "n<2" in one.reason and "baseline n=1" in one.reason
    assert one.diff == pytest.approx(0.15)  # the difference of means exists; only the test does not
    none = sweep_stats.compare([], [0.6, 0.7])
    assert none.p_value is None and none.diff is None
    constant = sweep_stats.compare([1.0, 1.0], [2.0, 2.0])
    assert constant.p_value is None and "zero variance" in constant.reason and constant.diff == 1.0
    shifted = sweep_stats.compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], "paired", [0, 1, 2], [0, 1, 2])
    assert shifted.p_value is None and "zero variance" in shifted.reason and shifted.diff == pytest.approx(0.5)
    lonely = sweep_stats.compare([1.0, 2.0], [1.5, 2.5], "paired", [0, 1], [1, 5])
    assert lonely.p_value is None and "1 common seed" in lonely.reason


# ---- results.md / results.csv / results.png from fake cell folders ----------------------------------------


def fake_sweep(out: Path, per_variant: dict[str, dict[int, dict | None]]) -> list[dict]:
    """Cell folders as the recipes leave them: all_results.json, or nothing for a failed seed (value None)."""
    cells = []
    for variant, seeds in per_variant.items():
        attention, position = variant.split("+")
        for seed, results in seeds.items():
            cell = {"variant": variant, "seed": seed, "attention_type": attention,
                    "position_embedding_type": position, "dir": f"{variant}-seed{seed}"}
            (out / cell["dir"]).mkdir(parents=True)
            if results is not None:
                (out / cell["dir"] / "all_results.json").write_text(json.dumps(
                    {**results, "num_parameters": 1000, "train_runtime": 1.5}))
            cells.append(cell)
    return cells


def read_csv(path: Path) -> dict[str, dict]:
    return {row["variant"]: row for row in csv.DictReader(path.open())}


ACCURACY = {"standard+learned": [0.70, 0.72, 0.71], "standard+alibi": [0.80, 0.83, 0.82],
            "sparse+learned": [0.69, 0.75, 0.70], "additive+learned": [0.60]}


def test_tables_with_a_baseline_from_fake_cells(tmp_path):
    runs = {variant: {seed: {"eval_accuracy": acc, "test_accuracy": acc - 0.01} for seed, acc in enumerate(values)}
            for variant, values in ACCURACY.items()}
    runs["additive+learned"][1] = None  # a failed seed
    cells = fake_sweep(tmp_path, runs)
    table = ablate.aggregate("image_classification", cells, tmp_path, baseline="sparse+learned")
    markdown = ablate.write_tables(table, tmp_path, metric="eval_accuracy")
    rows = read_csv(tmp_path / "results.csv")
    base = ACCURACY["sparse+learned"]
    for variant, values in ACCURACY.items():
        row = rows[variant]
        assert float(row["eval_accuracy_mean"]) == pytest.approx(naive_mean(values), abs=1e-15)
        assert int(row["eval_accuracy_n"]) == len(values)
        if len(values) > 1:
            low, high = naive_ci(values)
            assert float(row["eval_accuracy_std"]) == pytest.approx(math.sqrt(naive_var(values)), rel=1e-12)
            assert float(row["eval_accuracy_ci_low"]) == pytest.approx(low, rel=1e-12)
            assert float(row["eval_accuracy_ci_high"]) == pytest.approx(high, rel=1e-12)
        else:
            assert row["eval_accuracy_std"] == row["eval_accuracy_ci_low"] == row["eval_accuracy_ci_high"] == ""
        if variant == "sparse+learned":
            assert row["is_baseline"] == "1" and row["eval_accuracy_diff_vs_baseline"] == ""
            assert row["eval_accuracy_p_value"] == ""
            continue
        assert row["is_baseline"] == "0"
        assert float(row["eval_accuracy_diff_vs_baseline"]) == pytest.approx(naive_mean(values) - naive_mean(base))
        if len(values) > 1:
            assert float(row["eval_accuracy_p_value"]) == pytest.approx(naive_welch(base, values)[2], rel=1e-8)
            # Same seeds 0, 1, 2: the paired test is offered too.
            assert float(row["eval_accuracy_p_value_paired"]) == pytest.approx(naive_paired(base, values)[2],
                                                                               rel=1e-8)
        else:
            assert row["eval_accuracy_p_value"] == ""
    # Test metrics get the same columns; the rank follows accuracy upwards.
    assert float(rows["standard+alibi"]["test_accuracy_p_value"]) == pytest.approx(
        naive_welch([a - 0.01 for a in base], [a - 0.01 for a in ACCURACY["standard+alibi"]])[2], rel=1e-6)
    assert [rows[v]["rank"] for v in ACCURACY] == ["3", "1", "2", "4"]
    assert rows["additive+learned"]["failed_seeds"] == "1"

    lines = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "| 95% CI |" in lines["variant"] and "Δ vs baseline" in lines["variant"] and "p (paired)" in lines["variant"]
    assert "baseline" in lines["sparse+learned"]
    p_alibi = naive_welch(base, ACCURACY["standard+alibi"])[2]
    assert p_alibi < 0.05 and f"{p_alibi:.3f}*" in lines["standard+alibi"]
    assert "(better)" in lines["standard+alibi"] and "**0.8167 ± 0.0153**" in lines["standard+alibi"]
    p_standard = naive_welch(base, ACCURACY["standard+learned"])[2]
    assert p_standard > 0.05 and f"| {p_standard:.3f} |" in lines["standard+learned"]
    assert "undefined (n=1)" in lines["additive+learned"] and "(worse)" in lines["additive+learned"]
    assert "Welch" in markdown and "alpha 0.05" in markdown and "higher is better" in markdown
    assert "baseline `sparse+learned`" in markdown
    assert "additive+learned: n<2" in markdown  # why it has no p-value
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "(results.png)" in (tmp_path / "results.md").read_text()


def test_lower_is_better_for_eval_loss(tmp_path):
    losses = {"standard+learned": [2.00, 2.02, 2.01], "standard+rope": [1.80, 1.82, 1.79],
              "standard+none": [2.30, 2.25, 2.28]}
    cells = fake_sweep(tmp_path, {v: {s: {"eval_loss": x, "eval_perplexity": math.exp(x)} for s, x in enumerate(xs)}
                                  for v, xs in losses.items()})
    table = ablate.aggregate("language_modeling", cells, tmp_path)  # baseline: the first cell
    markdown = ablate.write_tables(table, tmp_path, metric="eval_loss")
    rows = read_csv(tmp_path / "results.csv")
    assert rows["standard+learned"]["is_baseline"] == "1"
    assert [rows[v]["rank"] for v in losses] == ["2", "1", "3"], "the lowest loss ranks first"
    lines = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "**1.8033 ± 0.0153**" in lines["standard+rope"], "the best (lowest) loss is bold"
    assert "**" not in lines["standard+none"]
    assert "-0.2067 (better)" in lines["standard+rope"] and "(worse)" in lines["standard+none"]
    assert "lower is better" in markdown and "negative Δ is an improvement" in markdown
    assert not ablate.higher_is_better("eval_perplexity") and ablate.higher_is_better("eval_rouge1")


# ---- --baseline ---------------------------------------------------------------------------------------------


def test_unknown_baseline_is_a_clear_error_listing_the_cells(tmp_path, capsys):
    argv = ["--task", "image_classification", "--attention_types", "standard,rope", "--position_types",
            "learned,alibi", "--seeds", "0", "--output_dir", str(tmp_path), "--dry_run"]
    with pytest.raises(SystemExit) as error:
        ablate.main(argv + ["--baseline", "linear+learned"])
    message = str(error.value)
    assert "--baseline 'linear+learned'" in message
    for cell in ("standard+learned", "standard+alibi", "standard+rope"):
        assert cell in message
    with pytest.raises(SystemExit, match="runs as 'standard\\+rope'"):  # a folded request says what it became
        ablate.main(argv + ["--baseline", "rope+alibi"])
    assert ablate.main(argv + ["--baseline", "standard+rope"]) == 0
    assert ablate.parse_args(argv + ["--baseline", "x"])[0].baseline == "x"
    with pytest.raises(SystemExit, match="choose from: a"):
        ablate.aggregate("image_classification", [{"variant": "a", "seed": 0, "dir": "a"}], tmp_path, baseline="b")


# ---- live progress -----------------------------------------------------------------------------------------


def bar(step: int, total: int, rate: str, postfix: str = "") -> str:
    return f"\r{100 * step // total:3d}%|##        | {step}/{total} [00:10<00:20, {rate}{postfix}]"


def test_progress_line_follows_the_logs(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    records = [{"step": 100, "train_loss": 2.5, "learning_rate": 1e-3, "epoch": 0},
               {"step": 200, "train_loss": 2.4, "learning_rate": 1e-3, "epoch": 0},
               {"step": 200, "eval_accuracy": 0.61, "eval_loss": 1.9, "epoch": 0}]
    log = cell / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 300, "train_lo')  # cut mid-line
    monitor = ablate.CellMonitor(cell)
    progress = monitor.read(now=0.0)
    assert (progress.step, progress.loss, progress.eval_step) == (200, 2.4, 200)
    line = ablate.progress_line("[2/6] standard+alibi seed 1", progress, 75, metric="eval_accuracy")
    assert line.startswith("[2/6] standard+alibi seed 1: step 200,")
    assert "loss 2.4000" in line and "eval_accuracy 0.6100 (step 200)" in line and "1m15s elapsed" in line

    # The training bar in launch.log: newer step, the total, the rate and the running loss; ETA from them.
    (cell / "launch.log").write_text("python -m accelerate.commands.launch ...\n" + bar(300, 1000, "5.00it/s")
                                     + bar(340, 1000, "4.90it/s", ", loss=2.3012")
                                     + "\rMap:  50%|#####     | 30/60 [00:00<00:00, 900.00 examples/s]")
    with log.open("a") as handle:
        handle.write('ss": 2.35, "epoch": 0}\n')  # the cut line completes
    progress = monitor.read(now=10.0)
    assert (progress.step, progress.total, progress.rate, progress.loss) == (340, 1000, 4.9, 2.3012)
    line = ablate.progress_line("cell", progress, 10, metric="eval_accuracy")
    eta = round((1000 - 340) / 4.9)
    assert "step 340/1000 (34%)" in line and "4.90 steps/s" in line
    assert f"ETA {eta // 60}m{eta % 60:02d}s" in line and "loss 2.3012" in line
    # A slow bar says s/it; at the last step the line says training is done.
    (cell / "launch.log").write_text(bar(1000, 1000, "2.50s/it", ", loss=1.7"))
    progress = monitor.read(now=20.0)
    assert progress.rate == pytest.approx(0.4) and "training done, evaluating" in ablate.progress_line("c", progress, 1)

    # A resume cuts the log back: it is read again from its start, the old evaluation forgotten.
    log.write_text(json.dumps({"step": 50, "train_loss": 3.0}) + "\n")
    (cell / "launch.log").unlink()
    fresh = ablate.CellMonitor(cell)
    progress = fresh.read(now=0.0)
    assert progress.step == 50 and progress.eval_metrics == {} and progress.total is None
    with log.open("a") as handle:
        handle.write(json.dumps({"step": 90, "train_loss": 2.9}) + "\n")
    progress = fresh.read(now=8.0)  # no bar: the rate comes from what the monitor saw (40 steps in 8 s)
    assert progress.rate == pytest.approx(5.0)
    line = ablate.progress_line("c", progress, 8)
    assert "step 90," in line and "5.00 steps/s" in line and "ETA" not in line and "loss 2.9000" in line
    assert "starting" in ablate.progress_line("c", ablate.CellProgress(), 3)


def test_run_cell_prints_progress_while_the_cell_runs(tmp_path, capsys):
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "out = Path(sys.argv[1])\n"
        "for step in range(1, 9):\n"
        "    with (out / 'log.jsonl').open('a') as f:\n"
        "        f.write(json.dumps({'step': step, 'train_loss': 1 / step}) + '\\n')\n"
        "    bar = f'{step}/8 [00:01<00:01, 4.00it/s, loss={1 / step:.4f}]'\n"
        "    sys.stderr.write(f'\\r{100 * step // 8:3d}%|#   | ' + bar)\n"
        "    sys.stderr.flush(); time.sleep(0.25)\n"
        "(out / 'all_results.json').write_text(json.dumps({'eval_accuracy': 0.5}))\n"
    )
    cell = tmp_path / "fake-seed0"
    status = ablate.run_cell([sys.executable, "-c", script, str(cell)], cell, label="[1/1] fake seed 0",
                             metric="eval_accuracy", progress_every=0.5)
    printed = capsys.readouterr().out.splitlines()
    assert status == "done"
    assert printed[0].startswith("[1/1] fake seed 0: started")
    progress = [line for line in printed[1:] if line.startswith("[1/1] fake seed 0: step")]
    assert len(progress) >= 2, printed
    assert "/8 (" in progress[-1] and "4.00 steps/s" in progress[-1] and "loss " in progress[-1]
    assert ablate.run_cell([sys.executable, "-c", "raise SystemExit(3)"], cell) == "skipped"
