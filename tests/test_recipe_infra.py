"""The shared recipe loop: exact resume after a kill, 2 real CPU ranks, trackers' files, FSDP sharding, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "image_classification.py"
BASE = [
    "--dataset_name", "sklearn-digits", "--image_size", "8", "--patch_size", "2", "--hidden_size", "32",
    "--num_hidden_layers", "1", "--num_attention_heads", "4", "--intermediate_size", "64", "--augment", "none",
    "--max_train_samples", "256", "--max_eval_samples", "100", "--learning_rate", "0.003",
    "--num_warmup_steps", "2", "--seed", "7",
]


def recipe_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    return env


def run_recipe(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + [str(RECIPE)] + BASE + args
    result = subprocess.run(command, capture_output=True, text=True, env=recipe_env(), timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    common = ["--per_device_train_batch_size", "32", "--max_train_steps", "20", "--checkpointing_steps", "4",
              "--logging_steps", "4", "--hidden_dropout_prob", "0.1", "--augment", "crop"]
    straight = tmp_path / "straight"
    run_recipe(common + ["--output_dir", str(straight)])

    killed = tmp_path / "killed"
    command = [sys.executable, str(RECIPE)] + BASE + common + ["--output_dir", str(killed)]
    process = subprocess.Popen(command, env=recipe_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "step_4" / "checkpoint_complete.json").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "all_results.json").exists(), "the kill must interrupt training"
    run_recipe(common + ["--output_dir", str(killed), "--resume_from_checkpoint"])

    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(killed)[name], tensor, rtol=0, atol=0, msg=name)
    a = json.loads((straight / "all_results.json").read_text())
    b = json.loads((killed / "all_results.json").read_text())
    assert a["train_steps"] == b["train_steps"] == 20
    assert a["train_loss"] == b["train_loss"]
    assert a["eval_accuracy"] == b["eval_accuracy"]


def test_two_cpu_processes_really_run_and_match_one_process(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
    env_note = "ACCELERATE_USE_CPU"
    os.environ[env_note] = "1"
    try:
        two = tmp_path / "two"
        run_recipe(["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "7",
                    "--max_train_steps", "8", "--output_dir", str(two)], launcher=launcher)
    finally:
        os.environ.pop(env_note)
    one = tmp_path / "one"
    run_recipe(["--per_device_train_batch_size", "32", "--max_train_steps", "8", "--output_dir", str(one)])
    two_results = json.loads((two / "all_results.json").read_text())
    one_results = json.loads((one / "all_results.json").read_text())
    assert two_results["num_processes"] == 2 and one_results["num_processes"] == 1
    predictions_two = json.loads((two / "eval_predictions.json").read_text())
    predictions_one = json.loads((one / "eval_predictions.json").read_text())
    assert len(predictions_two) == len(predictions_one) == 100 == two_results["eval_samples"]
    assert predictions_two == predictions_one
    for name, tensor in weights(one).items():
        torch.testing.assert_close(weights(two)[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_outputs_trackers_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_recipe(["--max_train_steps", "4", "--checkpointing_steps", "epoch", "--with_tracking", "--report_to", "all",
                "--per_device_train_batch_size", "64", "--output_dir", str(out), "--sweep_name", "unit"])
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_accuracy", "train_loss", "train_runtime", "train_samples_per_second", "peak_memory_mb",
                "num_parameters"):
        assert results[key] is not None, key
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in records) and any("eval_accuracy" in r for r in records)
    assert list(out.glob("wandb/offline-run-*")), "wandb offline run missing"
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard events missing"
    assert (out / "epoch_0" / "checkpoint_complete.json").exists()
    assert "attention_type" in (out / "README.md").read_text()
    from transformers import AutoModelForImageClassification, pipeline

    import hf_attention  # noqa: F401  (registers the Auto classes, as a user's script would)

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label[3] == "3"
    from hf_attention.training.data import load_digits_dataset

    image = load_digits_dataset()["test"][0]["image"]
    prediction = pipeline("image-classification", model=str(out))(image)
    assert prediction[0]["label"] in model.config.label2id


@pytest.mark.parametrize(
    "args,message",
    [
        (["--attention_type", "dense"], "invalid choice: 'dense'"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps 'often'"),
        (["--label_column_name", "class"], "class"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    ],
)
def test_bad_flags_are_explained(args, message, tmp_path, capsys):
    recipe = _import_recipe()
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(BASE + ["--output_dir", str(tmp_path / "x")] + args)
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert message in captured.err + captured.out + str(exit_info.value.code)


def _import_recipe():
    sys.path.insert(0, str(REPO / "recipes"))
    import image_classification

    return image_classification


def test_yaml_config_sets_flags_and_command_line_wins(tmp_path):
    image_classification = _import_recipe()

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.01\nnum_train_epochs: 2\noutput_dir: somewhere\n")
    args = image_classification.parse_args(["--config", str(config), "--num_train_epochs", "5"])
    assert args.learning_rate == 0.01 and args.num_train_epochs == 5 and args.output_dir == "somewhere"
    config.write_text("learning_rat: 0.01\n")
    with pytest.raises(SystemExit, match="unknown key\\(s\\) learning_rat"):
        image_classification.parse_args(["--config", str(config), "--output_dir", "x"])
    config.write_text("attention_type: dense\n")
    with pytest.raises(SystemExit, match="attention_type='dense' is not valid"):
        image_classification.parse_args(["--config", str(config), "--output_dir", "x"])


FSDP_WORKER = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from hf_attention import HfAttentionConfig, HfAttentionForMaskedLM

rank, world = int(sys.argv[1]), 2
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
config = HfAttentionConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           attention_type="sparse", sparse_window_size=4, position_embedding_type="alibi")
model = HfAttentionForMaskedLM(config)
reference = HfAttentionForMaskedLM(config)
reference.load_state_dict(model.state_dict())
mesh = init_device_mesh("cpu", (world,))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
ids = torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
loss = model(ids[rank * 2 : rank * 2 + 2], labels=ids[rank * 2 : rank * 2 + 2]).loss
loss.backward()
optimizer.step()
sharded = {n: p.full_tensor() for n, p in model.named_parameters()}
assert any(type(p).__name__ == "DTensor" for p in model.parameters())
ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
reference(ids, labels=ids).loss.backward()
ref_opt.step()
for name, param in reference.named_parameters():
    torch.testing.assert_close(sharded[name], param.detach(), rtol=1e-4, atol=1e-5, msg=name)
if rank == 0:
    print("FSDP-OK", float(loss))
dist.destroy_process_group()
"""


def test_fully_shard_on_two_cpu_ranks_trains_like_one_process(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), port], env=recipe_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
    assert "FSDP-OK" in outputs[0][0]


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"cpu_single", "cpu_2proc", "multi_gpu_ddp", "fsdp_gpu", "deepspeed_zero2"}
    for file in files:
        config = load_config_from_file(str(file))
        assert config.num_processes >= 1, file.name


def test_convert_from_a_transformers_checkpoint_on_the_fly(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32,
                                              num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                              num_labels=10))
    vit.save_pretrained(tmp_path / "vit")
    recipe = _import_recipe()
    out = tmp_path / "run"
    preset = tmp_path / "preset.yaml"  # a preset naming another model: --convert_from on the command line wins
    preset.write_text("model_name_or_path: no/such-model\n")
    assert recipe.parse_args(["--config", str(preset), "--model_name_or_path", "x", "--output_dir", "o"]
                             ).model_name_or_path == "x"
    results = recipe.main(BASE[:2] + ["--config", str(preset), "--augment", "none", "--max_train_samples", "64",
                                      "--max_eval_samples", "20",
                                      "--max_train_steps", "2", "--convert_from", str(tmp_path / "vit"),
                                      "--attention_type", "sparse", "--position_embedding_type", "alibi",
                                      "--output_dir", str(out)])
    assert (out / "converted_model" / "conversion_report.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_attention" and config["sparse_pattern"] == "local"
    assert config["position_embedding_type"] == "alibi" and results["train_steps"] == 2


def test_augmentation_crops_the_reflect_padded_image_and_flips_half():
    recipe = _import_recipe()
    images = torch.randn(32, 3, 16, 16)
    torch.manual_seed(0)
    got = recipe.augment_batch({"pixel_values": images, "labels": torch.zeros(32)}, "crop_flip")["pixel_values"]
    torch.manual_seed(0)  # the definition, one image at a time: same draws, slicing by hand
    pad = 2
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (32, 2))
    expected = torch.stack([padded[i, :, y:y + 16, x:x + 16] for i, (y, x) in enumerate(offsets.tolist())])
    flip = torch.rand(32) < 0.5
    expected[flip] = expected[flip].flip(-1)
    assert 0 < int(flip.sum()) < 32 and len(set(map(tuple, offsets.tolist()))) > 1
    assert torch.equal(got, expected)
    assert recipe.augment_batch({"pixel_values": images}, "none")["pixel_values"] is images


@pytest.mark.parametrize("preset", ["image_classification_digits.yaml", "image_classification_quick.yaml",
                                    "image_classification_full.yaml"])
def test_image_presets_parse_and_point_at_the_shared_data(preset, tmp_path):
    recipe = _import_recipe()
    args = recipe.parse_args(["--config", str(REPO / "configs" / "recipes" / preset), "--output_dir", str(tmp_path)])
    assert args.image_size % args.patch_size == 0 and args.hidden_size % args.num_attention_heads == 0
    if args.train_file:  # Fashion-MNIST presets read ../shared/data, relative to the repository root
        assert (REPO / args.train_file).exists() or not (REPO.parent / "shared").exists()
