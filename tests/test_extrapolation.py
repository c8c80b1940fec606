"""Length extrapolation (ALiBi's appendix B protocols): losses against naive per-window loops, learned position
tables reported rather than crashing, and the CLI's table and plot on tiny saved models."""

import csv
import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT

from hf_attention import HfAttentionConfig, HfAttentionForCausalLM
from hf_attention.training.extrapolation import (
    STATUS_BEYOND_TABLE,
    evaluate_lengths,
    markdown_table,
    parse_args,
    plot_extrapolation,
    run,
)


def load_recipe():
    spec = importlib.util.spec_from_file_location("lm_recipe", REPO_ROOT / "recipes" / "language_modeling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_recipe"] = module
    spec.loader.exec_module(module)
    return module


def tiny_lm(position: str, vocab_size: int = 13, max_positions: int = 16, **kwargs) -> HfAttentionForCausalLM:
    config = HfAttentionConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        norm_position="pre", max_position_embeddings=max_positions, pad_token_id=None, type_vocab_size=0,
        position_embedding_type=position, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs)
    return HfAttentionForCausalLM(config).eval()


def naive_nonoverlapping(model, ids: torch.Tensor, length: int) -> tuple[float, int]:
    """Press et al.'s non-overlapping evaluation, one window at a time: window k feeds ids[kL : kL+L], each
    position predicts the next token."""
    total, count, start = 0.0, 0, 0
    with torch.no_grad():
        while start + length + 1 <= len(ids):
            logits = model(input_ids=ids[start : start + length][None]).logits[0]
            for t in range(length):
                total += float(F.cross_entropy(logits[t : t + 1].double(), ids[start + t + 1 : start + t + 2]))
                count += 1
            start += length
    return total / count, count


def naive_sliding(model, ids: torch.Tensor, length: int, stride: int) -> tuple[float, int]:
    """Sliding window: windows of `length` start every `stride` tokens; the first scores every prediction,
    the others their last `stride` ones."""
    total, count, start = 0.0, 0, 0
    with torch.no_grad():
        while start + length + 1 <= len(ids):
            logits = model(input_ids=ids[start : start + length][None]).logits[0]
            first = 0 if start == 0 else length - stride
            for t in range(first, length):
                total += float(F.cross_entropy(logits[t : t + 1].double(), ids[start + t + 1 : start + t + 2]))
                count += 1
            start += stride
    return total / count, count


@pytest.mark.parametrize("position", ["alibi", "sinusoidal"])
def test_nonoverlapping_loss_matches_a_naive_window_loop(position):
    model = tiny_lm(position, max_positions=8)
    ids = torch.randint(0, 13, (61,))
    rows = evaluate_lengths(model, ids, [4, 8, 16], "nonoverlapping", batch_size=2)
    for row in rows:
        loss, count = naive_nonoverlapping(model, ids, row["length"])
        assert row["status"] == "ok" and row["protocol"] == "nonoverlapping"
        assert row["tokens"] == count == (60 // row["length"]) * row["length"]
        assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_nonoverlapping_equals_the_lm_recipes_validation_loss():
    lm = load_recipe()
    model = tiny_lm("rope", max_positions=8)
    ids = torch.randint(0, 13, (50,))
    with torch.no_grad():
        recipe_loss = float(lm.next_token_loss(model, lm.validation_windows(ids, 8, None)))
    assert evaluate_lengths(model, ids, [8])[0]["loss"] == pytest.approx(recipe_loss, rel=1e-5)


@pytest.mark.parametrize("length,stride", [(8, 3), (8, 8), (12, 4), (6, None)])
def test_sliding_loss_matches_a_naive_loop_scoring_the_last_stride_tokens(length, stride):
    model = tiny_lm("alibi")
    ids = torch.randint(0, 13, (57,))
    row = evaluate_lengths(model, ids, [length], "sliding", stride=stride, batch_size=3)[0]
    used = stride or length // 2
    loss, count = naive_sliding(model, ids, length, used)
    assert row["stride"] == used and row["status"] == "ok"
    assert row["tokens"] == count
    assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_sliding_with_stride_of_the_window_is_nonoverlapping():
    model = tiny_lm("sinusoidal")
    ids = torch.randint(0, 13, (45,))
    slide = evaluate_lengths(model, ids, [8], "sliding", stride=8)[0]
    plain = evaluate_lengths(model, ids, [8], "nonoverlapping")[0]
    assert (slide["loss"], slide["tokens"]) == pytest.approx((plain["loss"], plain["tokens"]))


def test_max_tokens_caps_the_scored_text():
    model = tiny_lm("alibi")
    ids = torch.randint(0, 13, (200,))
    row = evaluate_lengths(model, ids, [8], "nonoverlapping", max_tokens=40)[0]
    assert row["tokens"] == 40
    assert row["loss"] == pytest.approx(naive_nonoverlapping(model, ids[:41], 8)[0], rel=1e-5)


def test_learned_positions_past_their_table_are_reported_not_raised():
    model = tiny_lm("learned", max_positions=16)
    ids = torch.randint(0, 13, (80,))
    with pytest.raises(ValueError):  # the model itself refuses: the evaluation must not get there
        model(input_ids=ids[None, :32])
    for protocol in ("nonoverlapping", "sliding"):
        rows = evaluate_lengths(model, ids, [16, 32, 64], protocol)
        assert [row["status"] for row in rows] == ["ok", STATUS_BEYOND_TABLE, STATUS_BEYOND_TABLE]
        assert rows[0]["loss"] is not None and [row["loss"] for row in rows[1:]] == [None, None]


def test_text_shorter_than_a_window_is_a_status():
    row = evaluate_lengths(tiny_lm("alibi"), torch.randint(0, 13, (10,)), [16])[0]
    assert row["status"] == "text too short" and row["loss"] is None


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_rope_and_alibi_run_at_four_times_their_training_length(position):
    model = tiny_lm(position, max_positions=16)
    ids = torch.randint(0, 13, (200,))
    for protocol in ("nonoverlapping", "sliding"):
        row = evaluate_lengths(model, ids, [64], protocol, stride=16)[0]
        assert row["status"] == "ok" and torch.isfinite(torch.tensor(row["loss"]))


def test_bad_arguments_name_the_value():
    model, ids = tiny_lm("alibi"), torch.arange(40) % 13
    with pytest.raises(ValueError, match="'overlapping'.*nonoverlapping"):
        evaluate_lengths(model, ids, [8], "overlapping")
    with pytest.raises(ValueError, match="stride=0"):
        evaluate_lengths(model, ids, [8], "sliding", stride=0)
    with pytest.raises(ValueError, match=r"\[0\]"):
        evaluate_lengths(model, ids, [0])


def test_table_and_plot_average_seeds(tmp_path):
    def rows(loss_at_8):
        return [{"length": 8, "protocol": "nonoverlapping", "stride": 8, "loss": loss_at_8, "tokens": 8,
                 "status": "ok"},
                {"length": 16, "protocol": "nonoverlapping", "stride": 16, "loss": None, "tokens": 0,
                 "status": STATUS_BEYOND_TABLE}]

    by_variant = {"standard+learned": [rows(1.0), rows(2.0)]}
    table = markdown_table(by_variant)
    assert "| standard+learned | 1.5000 ± 0.7071 (2) | beyond position table |" in table
    path = plot_extrapolation(by_variant, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_table_csv_json_and_plot_for_saved_models(tmp_path):
    lm = load_recipe()
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    (tmp_path / "input.txt").write_text(text)
    tokenizer = lm.char_tokenizer(text)
    dirs = []
    for name, position, seed in [("alibi0", "alibi", 0), ("alibi1", "alibi", 1), ("learned0", "learned", 0)]:
        torch.manual_seed(seed)
        model = tiny_lm(position, vocab_size=len(tokenizer), max_positions=8)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
    out = tmp_path / "out"
    results = run([*dirs, "--text_file", str(tmp_path / "input.txt"), "--split", "validation",
                    "--train_split", "0.9", "--train_length", "8", "--factors", "1,2,4", "--protocol", "both",
                    "--max_tokens", "64", "--output_dir", str(out)])
    assert results["lengths"] == [8, 16, 32]
    for name in ("extrapolation.md", "extrapolation.csv", "extrapolation.json", "extrapolation.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "extrapolation.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "extrapolation.md").read_text()
    assert "### nonoverlapping" in table and "### sliding" in table
    assert "standard+alibi" in table and "(2)" in table  # two seeds grouped into one variant
    assert "standard+learned" in table and STATUS_BEYOND_TABLE in table
    with (out / "extrapolation.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == 3 * 2 * 3
    learned = [r for r in csv_rows if r["variant"] == "standard+learned" and r["length"] != "8"]
    assert {r["status"] for r in learned} == {STATUS_BEYOND_TABLE}
    # The CLI's number is evaluate_lengths on the recipe's validation split of the text.
    validation = text[int(len(text) * 0.9):]
    ids = torch.tensor(tokenizer(validation, add_special_tokens=False)["input_ids"])
    model = HfAttentionForCausalLM.from_pretrained(dirs[0]).eval()
    expected, _ = naive_sliding(model, ids[:65], 32, 8)
    got = next(r for r in json.loads((out / "extrapolation.json").read_text())["rows"]
               if r["model_dir"] == dirs[0] and r["protocol"] == "sliding" and r["length"] == 32)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)


def test_sweep_dir_collects_every_saved_cell(tmp_path):
    for cell in ("standard+alibi-seed0", "standard+alibi-seed1"):
        (tmp_path / "sweep" / cell).mkdir(parents=True)
        (tmp_path / "sweep" / cell / "config.json").write_text("{}")
    (tmp_path / "sweep" / "logs").mkdir()  # not a model: skipped
    args = parse_args(["--sweep_dir", str(tmp_path / "sweep"), "--text_file", "t.txt", "--output_dir", "o"])
    assert [p.rsplit("/", 1)[-1] for p in args.model_dirs] == ["standard+alibi-seed0", "standard+alibi-seed1"]
    with pytest.raises(SystemExit):
        parse_args(["--sweep_dir", str(tmp_path / "sweep" / "logs"), "--text_file", "t.txt", "--output_dir", "o"])
