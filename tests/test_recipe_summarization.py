"""Smoke runs of recipes/summarization.py on real SciTLDR-A rows: what a user finds in the output folder.

The numbers in all_results.json are re-derived here from the written predictions with `rouge_scores`, so a
mismatch between what is generated, written and reported cannot hide behind a plausible-looking score.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_attention  # noqa: F401  (registers the Auto classes)
from hf_attention.training.data import load_scitldr_jsonl
from hf_attention.training.metrics import ROUGE_TYPES, first_sentence_baseline, rouge_scores

REPO = Path(__file__).resolve().parents[1]
SCITLDR = REPO.parent / "shared" / "data" / "summarization" / "scitldr" / "SciTLDR-A"

TINY = [
    "--max_train_samples", "32", "--max_eval_samples", "8", "--max_predict_samples", "8",
    "--hidden_size", "32", "--encoder_layers", "2", "--decoder_layers", "2", "--num_attention_heads", "4",
    "--intermediate_size", "64", "--vocab_size", "600", "--max_source_length", "64", "--max_target_length", "24",
    "--val_max_target_length", "12", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3", "--num_warmup_steps", "0",
    "--logging_steps", "2", "--seed", "0",
]
ROUGE_KEYS = [f"{t}{suffix}" for t in ROUGE_TYPES for suffix in ("", "_mean", "_first")]


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_summarization", REPO / "recipes" / "summarization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture
def data() -> Path:
    if not SCITLDR.exists():
        pytest.skip(f"SciTLDR-A not found at {SCITLDR}")
    return SCITLDR


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (accelerate keeps process-wide singletons); one thread,
    because these models are tiny and a second thread only adds synchronisation on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(threads)


def files(data: Path) -> list[str]:
    return ["--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "dev.jsonl"),
            "--test_file", str(data / "test.jsonl")]


def check_rouge(results: dict, prefix: str, out: Path, data_file: Path, n: int) -> list[str]:
    """all_results' ROUGE (model and Lead-1 baseline) equals rouge_scores on the written predictions."""
    gold = load_scitldr_jsonl(data_file).select(range(n))
    references = [list(refs) for refs in gold["targets"]]
    records = json.loads((out / f"{prefix}_predictions.json").read_text())
    assert [r["index"] for r in records] == list(range(n))
    assert [r["id"] for r in records] == list(gold["paper_id"])
    assert [r["references"] for r in records] == references
    predictions = [r["prediction"] for r in records]
    model_scores = rouge_scores(predictions, references)
    baseline_scores = rouge_scores([first_sentence_baseline(s) for s in gold["source"]], references)
    for key in ROUGE_KEYS:
        assert results[f"{prefix}_{key}"] == pytest.approx(model_scores[key], abs=1e-9), key
        assert results[f"{prefix}_baseline_{key}"] == pytest.approx(baseline_scores[key], abs=1e-9), key
    assert results[f"{prefix}_baseline_rouge1"] > 5.0  # Lead-1 really overlaps the TLDRs
    assert results[f"{prefix}_rouge1"] >= results[f"{prefix}_rouge1_mean"] - 1e-9  # max over golds >= mean
    assert results[f"{prefix}_samples"] == n
    return predictions


def check_folder(out: Path) -> dict:
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "all_results.json", "README.md", "log.jsonl",
                 "eval_predictions.json", "eval_generated_predictions.txt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "peak_memory_mb", "eval_loss",
                "eval_gen_len", *(f"eval_{k}" for k in ROUGE_KEYS), *(f"eval_baseline_{k}" for k in ROUGE_KEYS)):
        assert results.get(key) is not None, key
    assert results["train_loss"] > 0 and results["train_runtime"] > 0 and results["peak_memory_mb"] > 0
    card = (out / "README.md").read_text()
    assert "summarization" in card and "eval_rouge1" in card and "baseline" in card
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("train_loss" in record for record in log) and any("eval_rouge1" in record for record in log)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 12
    return results


def test_fresh_sparse_relative_end_to_end(recipe, data, tmp_path):
    out = tmp_path / "sparse"
    results = recipe.main([*files(data), "--output_dir", str(out), "--do_predict", *TINY,
                           "--attention_type", "sparse", "--sparse_pattern", "local", "--sparse_window_size", "8",
                           "--position_embedding_type", "relative", "--num_beams", "2"])
    assert results == json.loads((out / "all_results.json").read_text())
    check_folder(out)
    predictions = check_rouge(results, "eval", out, data / "dev.jsonl", 8)
    check_rouge(results, "test", out, data / "test.jsonl", 8)
    assert any(predictions), "a trained model writes some words"
    eval_lines = (out / "eval_generated_predictions.txt").read_text().splitlines()
    assert eval_lines == predictions
    assert len((out / "generated_predictions.txt").read_text().splitlines()) == 8

    config = json.loads((out / "config.json").read_text())
    assert config["sparse_pattern"] == "local" and config["position_embedding_type"] == "relative"
    assert config["decoder_start_token_id"] == config["bos_token_id"] != config["eos_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens([config["pad_token_id"], config["decoder_start_token_id"],
                                            config["eos_token_id"]]) == ["[PAD]", "[CLS]", "[SEP]"]
    assert json.loads((out / "generation_config.json").read_text())["num_beams"] == 2

    # The saved folder alone reproduces the recipe's predictions (weights, tokenizer, generation config).
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    sources = list(load_scitldr_jsonl(data / "dev.jsonl").select(range(8))["source"])
    batch = tokenizer(sources, max_length=64, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**batch)
    assert generated.shape[1] <= 12 + 1
    decoded = [" ".join(text.split()) for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert decoded == predictions


def test_fresh_additive_alibi_eval_at_end(recipe, data, tmp_path):
    out = tmp_path / "additive"
    results = recipe.main([*files(data), "--output_dir", str(out), *TINY, "--num_train_epochs", "2",
                           "--attention_type", "additive", "--position_embedding_type", "alibi",
                           "--eval_strategy", "end", "--checkpointing_steps", "epoch"])
    check_folder(out)
    check_rouge(results, "eval", out, data / "dev.jsonl", 8)
    assert "test_rouge1" not in results and not (out / "generated_predictions.txt").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    per_epoch = [record for record in log if "eval_loss" in record and "train_steps" not in record]
    assert len(per_epoch) == 2 and all("eval_rouge1" not in record for record in per_epoch)
    assert (out / "epoch_1").is_dir()
    config = json.loads((out / "config.json").read_text())
    assert (config["attention_type"], config["position_embedding_type"]) == ("additive", "alibi")


def test_bart_checkpoint(recipe, data, tmp_path):
    """Any AutoModelForSeq2SeqLM checkpoint: a tiny random BART with a trained tokenizer (BART's decoder start is
    its eos, so the labels keep their leading [CLS] here)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from hf_attention.training.setup import train_wordpiece_tokenizer

    train = load_scitldr_jsonl(data / "train.jsonl").select(range(32))
    tokenizer = train_wordpiece_tokenizer([*train["source"], *train["target"]], 600)
    pad, cls, sep = (tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, pad_token_id=pad, bos_token_id=cls, eos_token_id=sep,
                        decoder_start_token_id=sep, forced_eos_token_id=sep)
    checkpoint = tmp_path / "bart-tiny"
    BartForConditionalGeneration(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    out = tmp_path / "bart"
    results = recipe.main(["--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "dev.jsonl"),
                           "--output_dir", str(out), "--model_name_or_path", str(checkpoint), *bart_args()])
    check_folder(out)
    check_rouge(results, "eval", out, data / "dev.jsonl", 8)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "bart"
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(model).__name__ == "BartForConditionalGeneration"
    batch = AutoTokenizer.from_pretrained(out)(["We propose a new method."], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=4).shape[0] == 1


def test_resume_continues_exactly(recipe, data, tmp_path):
    """A run that died after step 2 (its step_2 checkpoint and tokenizer are all that is left) resumes with
    `--resume_from_checkpoint` (latest) and ends with the weights of the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    base = ["--train_file", str(data / "train.jsonl"), "--no-do_eval", *TINY, "--max_train_steps", "4",
            "--checkpointing_steps", "2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    recipe.main([*base, "--output_dir", str(whole)])
    resumed.mkdir()
    shutil.copytree(whole / "step_2", resumed / "step_2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(whole / name, resumed / name)
    reset_accelerate()
    recipe.main([*base, "--output_dir", str(resumed), "--resume_from_checkpoint"])
    first, second = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("preset", ["summarization_quick.yaml", "summarization_full.yaml"])
def test_presets_parse(recipe, preset, tmp_path):
    args = recipe.parse_args(["--config", str(REPO / "configs" / "recipes" / preset), "--output_dir", str(tmp_path)])
    assert args.do_predict and args.references_column == "targets"
    assert (REPO / args.train_file).exists() or not SCITLDR.exists()


def test_list_valued_columns_as_on_the_hub(recipe, data, tmp_path):
    """The Hub's allenai/scitldr keeps the abstract as a list of sentences and the TLDRs as a list: the document is
    joined, training uses the first TLDR, evaluation scores against all of them, Lead-1 is the first listed sentence."""
    def convert(name: str, n: int) -> Path:
        lines = (data / name).read_text().splitlines()[:n]
        rows = [{"sentences": r["source"], "tldrs": r["target"]} for r in map(json.loads, lines)]
        return write_jsonl(tmp_path / f"hub_{name}", rows)

    out = tmp_path / "hub_style"
    results = recipe.main(["--train_file", str(convert("train.jsonl", 32)),
                           "--validation_file", str(convert("dev.jsonl", 8)), "--output_dir", str(out),
                           "--text_column", "sentences", "--summary_column", "tldrs", *TINY, "--max_train_steps", "2"])
    records = json.loads((out / "eval_predictions.json").read_text())
    gold = [json.loads(line) for line in (data / "dev.jsonl").read_text().splitlines()[:8]]
    assert [r["references"] for r in records] == [g["target"] for g in gold]
    assert [r["baseline"] for r in records] == [g["source"][0].strip() for g in gold]
    expected = rouge_scores([g["source"][0] for g in gold], [g["target"] for g in gold])
    assert results["eval_baseline_rouge1"] == pytest.approx(expected["rouge1"], abs=1e-9)
    assert results["eval_rouge1"] == pytest.approx(
        rouge_scores([r["prediction"] for r in records], [g["target"] for g in gold])["rouge1"], abs=1e-9)


def bart_args() -> list[str]:
    """TINY without the fresh-model shape flags (they apply to hf_attention models only)."""
    skip = {"--hidden_size", "--encoder_layers", "--decoder_layers", "--num_attention_heads", "--intermediate_size",
            "--vocab_size"}
    out, i = [], 0
    while i < len(TINY):
        if TINY[i] in skip:
            i += 2
            continue
        out += TINY[i : i + 2]
        i += 2
    return out


def test_two_processes_score_every_example_once(data, tmp_path):
    """7 examples over 2 ranks in batches of 3: uneven shards (accelerate repeats examples to even them out) and
    generated lengths that differ per rank; every example must be scored once, in order. Launched the way
    DESIGN.md says really gives 2 CPU processes (accelerate's fork-based debug_launcher ran ~100x slower here)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = [*files(data), "--output_dir", str(out), *TINY, "--max_eval_samples", "7", "--max_predict_samples", "5",
            "--per_device_eval_batch_size", "3", "--max_train_steps", "2", "--do_predict"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(REPO / "recipes" / "summarization.py"), *argv]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    check_rouge(results, "eval", out, data / "dev.jsonl", 7)
    check_rouge(results, "test", out, data / "test.jsonl", 5)
    assert len((out / "eval_generated_predictions.txt").read_text().splitlines()) == 7


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty_summary", "bad_json", "no_validation",
                                  "too_long_for_positions", "variant_flag_on_bart"])
def test_bad_input_stops_with_a_clear_message(recipe, data, tmp_path, case):
    train, dev = str(data / "train.jsonl"), str(data / "dev.jsonl")
    base = ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--max_eval_samples", "4"]
    rows = [{"document": "We study attention. It works.", "summary": "Attention works."}] * 3
    if case == "missing_file":
        argv, pattern = ["--train_file", str(tmp_path / "nope.jsonl"), "--validation_file", dev], r"--train_file .*nope"
    elif case == "missing_column":
        argv, pattern = ["--train_file", train, "--validation_file", dev, "--summary_column", "abstract"], (
            r"--train_file .*train.jsonl: no column 'abstract' \(--summary_column\)")
    elif case == "empty_summary":
        bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:2], {"document": "Text.", "summary": "  "}])
        argv, pattern = ["--train_file", str(bad), "--no-do_eval"], (
            r"--train_file .*bad.jsonl: row 3 .*column 'summary' \(--summary_column\) is empty")
    elif case == "bad_json":
        bad = tmp_path / "broken.jsonl"
        bad.write_text(json.dumps({"paper_id": "a", "source": ["x."], "target": ["y."]}) + "\n{not json\n")
        argv, pattern = ["--train_file", str(bad), "--no-do_eval"], r"broken.jsonl, line 2: not valid JSON"
    elif case == "no_validation":
        argv, pattern = ["--train_file", train], r"--do_eval: no validation split.*--validation_file"
    elif case == "too_long_for_positions":
        argv, pattern = ["--train_file", train, "--validation_file", dev, "--max_source_length", "600",
                         "--max_position_embeddings", "256", "--position_embedding_type", "learned",
                         "--vocab_size", "300"], r"--max_source_length 600 exceeds .*max_position_embeddings=256"
    else:
        from transformers import BartConfig, BartForConditionalGeneration

        from hf_attention.training.setup import train_wordpiece_tokenizer

        checkpoint = tmp_path / "bart"
        BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                encoder_ffn_dim=16, decoder_ffn_dim=16)).save_pretrained(checkpoint)
        train_wordpiece_tokenizer(["we study attention"], 50).save_pretrained(checkpoint)
        argv, pattern = ["--train_file", train, "--validation_file", dev, "--model_name_or_path", str(checkpoint),
                         "--attention_type", "additive"], r"BartConfig; variant flags \(--attention_type\)"
    with pytest.raises(SystemExit, match=pattern):
        recipe.main([*argv, *base])
