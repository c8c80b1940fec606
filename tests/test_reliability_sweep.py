"""Reliability of the runner and the sweep: signals stop a cell's whole process group, one log per run,
cumulative runtime over resumes, the loss in the progress bar, clear errors for incomplete checkpoints,
and a data split that stays fixed across seeds."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_attention.training.arguments import add_common_args
from hf_attention.training.runner import RecipeRunner, make_accelerator

REPO = Path(__file__).resolve().parents[1]
STEP_SLEEP_S = 0.15  # every training step sleeps this long: a lower bound of any honest train_runtime


# ---- the runner, in process, on a tiny model -------------------------------------------------------------


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def save_pretrained(self, folder, is_main_process=True, save_function=torch.save):
        save_function(self.state_dict(), Path(folder) / "tiny.pt")


def tiny_args(output_dir: Path, *extra: str) -> argparse.Namespace:
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args([
        "--output_dir", str(output_dir), "--seed", "0", "--learning_rate", "0.05", "--lr_scheduler_type", "constant",
        "--max_train_steps", "6", "--per_device_train_batch_size", "2", "--checkpointing_steps", "2",
        "--logging_steps", "3", "--report_to", "none", *extra,
    ])


def train_tiny(output_dir: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """8 samples, batch 2: 4 optimiser steps per epoch, 6 steps in all (checkpoints at 2, 4, 6)."""
    args = tiny_args(output_dir, *extra)
    accelerator = make_accelerator(args)
    runner = RecipeRunner(args, accelerator)
    data = torch.arange(32, dtype=torch.float32).reshape(8, 4) / 32
    dataset = [{"x": row, "y": row.sum(-1, keepdim=True)} for row in data]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)

    def loss_fn(model, batch):
        time.sleep(STEP_SLEEP_S)
        return torch.nn.functional.mse_loss(model.linear(batch["x"]), batch["y"])

    def evaluate(model, epoch):
        with torch.no_grad():
            return {"eval_loss": float(torch.nn.functional.mse_loss(model.linear(data), data.sum(-1, keepdim=True)))}

    model = runner.train(TinyModel(), loader, evaluate=evaluate, loss_fn=loss_fn)
    results = runner.finish(model, None, {}, "card")
    weights = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return results, weights


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[tuple]:
    """A log without the wall-clock fields (they differ from run to run)."""
    skip = {"train_runtime", "train_samples_per_second", "peak_memory_mb"}
    return [tuple(sorted((k, v) for k, v in r.items() if k not in skip)) for r in records]


def test_resume_keeps_one_log_cumulative_runtime_and_the_straight_losses(tmp_path, capsys):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight, straight_weights = train_tiny(straight_dir)
    assert "loss=" in capsys.readouterr().err, "the progress bar shows the running loss"
    straight_log = read_log(straight_dir)
    assert [r["step"] for r in straight_log if "train_loss" in r and "train_runtime" not in r] == [3, 6]
    assert [r["step"] for r in straight_log if "eval_loss" in r] == [4, 6]

    # A run killed after its step_4 checkpoint: its log and the later checkpoint are left behind.
    train_tiny(resumed_dir)
    import shutil

    shutil.rmtree(resumed_dir / "step_6")
    (resumed_dir / "all_results.json").unlink()
    resumed, resumed_weights = train_tiny(resumed_dir, "--resume_from_checkpoint")
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0, msg=name)
    # One log: every record once, equal to the straight run's (the step-6 loss averages steps 4-6 in both).
    assert comparable(read_log(resumed_dir)) == comparable(straight_log)
    assert resumed["train_loss"] == straight["train_loss"]
    # Runtime and samples/s count the whole training: 6 sleeping steps, 12 samples, not only the resumed 2 steps.
    assert resumed["train_runtime"] >= 6 * STEP_SLEEP_S
    assert resumed["train_samples_per_second"] * resumed["train_runtime"] == pytest.approx(12, rel=0.01)

    # A fresh rerun in the same folder starts its log afresh.
    train_tiny(straight_dir)
    assert comparable(read_log(straight_dir)) == comparable(straight_log)


def test_resume_from_the_final_checkpoint_trains_no_extra_step(tmp_path):
    out = tmp_path / "run"
    first, weights = train_tiny(out)
    log = read_log(out)
    again, weights_again = train_tiny(out, "--resume_from_checkpoint")  # latest: step_6, the last one
    assert again["train_steps"] == first["train_steps"] == 6
    for name, tensor in weights.items():
        torch.testing.assert_close(weights_again[name], tensor, rtol=0, atol=0, msg=name)
    assert comparable(read_log(out)) == comparable(log)


def test_an_incomplete_checkpoint_is_named_with_its_missing_files(tmp_path):
    out = tmp_path / "run"
    train_tiny(out)
    broken = out / "step_2"  # as a kill while saving leaves it: no weights yet, no completion marker
    (broken / "model.safetensors").unlink()
    (broken / "checkpoint_complete.json").unlink()
    with pytest.raises(SystemExit) as error:
        train_tiny(out, "--resume_from_checkpoint", str(broken))
    message = str(error.value)
    assert "incomplete" in message and str(broken) in message
    assert "missing model.safetensors or pytorch_model.bin" in message and "checkpoint_complete.json" in message
    assert "optimizer.bin," not in message.split("holds")[0], "present files are not reported missing"


# ---- the data split ------------------------------------------------------------------------------------


def test_data_seed_fixes_the_validation_split_across_seeds():
    sys.path.insert(0, str(REPO / "recipes"))
    import image_classification

    def eval_split(*flags: str) -> list:
        args = image_classification.parse_args(["--dataset_name", "sklearn-digits", "--do_predict",
                                                "--output_dir", "unused", *flags])
        _, evaluation, _ = image_classification.load_splits(args)
        return [(row["label"], row["image"].tobytes()) for row in evaluation]

    fixed = eval_split("--seed", "0", "--data_seed", "5")
    assert eval_split("--seed", "1", "--data_seed", "5") == fixed
    assert eval_split("--seed", "0") != eval_split("--seed", "1"), "without --data_seed the split follows --seed"


# ---- signals to the sweep ------------------------------------------------------------------------------


def live_processes_mentioning(text: str) -> list[int]:
    """Pids (not zombies) whose command line contains `text`, read from /proc: independent of the sweep's code."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the cell's processes")
def test_sigterm_stops_the_running_cell_and_writes_no_results(tmp_path):
    out = tmp_path / "sweep"
    long_cell = ["--dataset_name", "sklearn-digits", "--image_size", "8", "--patch_size", "2", "--hidden_size", "16",
                 "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "16",
                 "--augment", "none", "--max_train_samples", "64", "--max_eval_samples", "20",
                 "--per_device_train_batch_size", "16", "--max_train_steps", "100000", "--logging_steps", "1"]
    command = [sys.executable, "-m", "hf_attention.training.ablate", "--task", "image_classification",
               "--seeds", "0,1", "--output_dir", str(out), "--"] + long_cell
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    sweep = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cell = out / "standard+learned-seed0"
    children: list[int] = []
    try:
        deadline = time.time() + 240
        while not ((cell / "log.jsonl").exists() and len((cell / "log.jsonl").read_text().splitlines()) >= 3):
            assert sweep.poll() is None, sweep.communicate()
            assert time.time() < deadline, "training never started"
            time.sleep(0.1)
        children = [pid for pid in live_processes_mentioning(str(cell)) if pid != sweep.pid]
        assert len(children) >= 2, "expected the accelerate launcher and the training process"
        sweep.send_signal(signal.SIGTERM)
        _, stderr = sweep.communicate(timeout=60)
        assert sweep.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        assert "SIGTERM" in stderr and "no results written" in stderr
        assert live_processes_mentioning(str(cell)) == [], "a process of the cell outlived the sweep"
        size = (cell / "log.jsonl").stat().st_size
        time.sleep(2)
        assert (cell / "log.jsonl").stat().st_size == size, "training went on after the sweep had exited"
        assert not (cell / "all_results.json").exists() and not (out / "results.csv").exists()
        assert not (out / "standard+learned-seed1").exists(), "no cell starts after the signal"
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        for pid in live_processes_mentioning(str(cell)):
            if pid in children:
                os.kill(pid, signal.SIGKILL)
