"""The language-modelling recipe: nanoGPT's character ids and split, the validation loss against a naive loop,
a tiny end-to-end run."""

import importlib.util
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT

from hf_attention import HfAttentionConfig, HfAttentionForCausalLM


def load_recipe():
    spec = importlib.util.spec_from_file_location("lm_recipe", REPO_ROOT / "recipes" / "language_modeling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_recipe"] = module
    spec.loader.exec_module(module)
    return module


lm = load_recipe()


def test_char_tokenizer_matches_nanogpt_ids_and_split(shared_data):
    text = (shared_data / "lm" / "tinyshakespeare" / "input.txt").read_text()
    # nanoGPT's prepare.py: chars = sorted(list(set(data))); stoi = {ch: i}; first 90% train.
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    tokenizer = lm.char_tokenizer(text)
    assert len(tokenizer) == 65
    sample = text[:2000]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert ids == [stoi[c] for c in sample]
    assert tokenizer.decode(ids) == sample
    cut = int(len(text) * 0.9)
    assert (cut, len(text) - cut) == (1_003_854, 111_540)  # the shared data README's nanoGPT split


def test_validation_loss_is_mean_next_token_cross_entropy_over_the_text():
    torch.manual_seed(0)
    model = HfAttentionForCausalLM(HfAttentionConfig(
        vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        norm_position="pre", max_position_embeddings=8, pad_token_id=None, type_vocab_size=0)).eval()
    ids = torch.randint(0, 11, (30,))
    windows = lm.validation_windows(ids, 8, None)
    assert windows["input_ids"].shape == (3, 8)  # (30 - 1) // 8 full windows
    torch.set_grad_enabled(False)
    loss = lm.next_token_loss(model, windows)
    # Naive: each window scored alone, every position predicts the token after it.
    total, count = 0.0, 0
    for w in range(3):
        x = ids[w * 8 : w * 8 + 8]
        logits = model(input_ids=x[None]).logits[0]
        for t in range(8):
            total += float(F.cross_entropy(logits[t : t + 1], ids[w * 8 + t + 1 : w * 8 + t + 2]))
            count += 1
    torch.set_grad_enabled(True)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_random_windows_are_seeded_and_aligned():
    ids = torch.arange(100)
    a, b = lm.RandomWindows(ids, 8, 20, seed=3), lm.RandomWindows(ids, 8, 20, seed=3)
    assert torch.equal(a.offsets, b.offsets)
    item = a[5]
    assert torch.equal(item["targets"], item["input_ids"] + 1)
    assert not torch.equal(a.offsets, lm.RandomWindows(ids, 8, 20, seed=4).offsets)


def test_tiny_run_trains_and_writes_samples(tmp_path):
    text = "to be or not to be, that is the question.\n" * 200
    (tmp_path / "t.txt").write_text(text)
    results = lm.main([
        "--train_file", str(tmp_path / "t.txt"), "--output_dir", str(tmp_path / "out"), "--block_size", "16",
        "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--max_train_steps", "150", "--num_warmup_steps", "5", "--learning_rate", "3e-3", "--sample_length", "20",
        "--position_embedding_type", "alibi",
    ])
    vocab = len(set(text))
    assert results["eval_loss"] < 0.5 * math.log(vocab)  # far below the uniform guess on this repetitive text
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["eval_loss"] == pytest.approx(results["eval_loss"])
    samples = (tmp_path / "out" / "samples.txt").read_text()
    assert len(samples) > 20 and set(samples) <= set(text) | set("-")
    with pytest.raises(SystemExit, match="block_size"):
        lm.parse_args(["--train_file", "x.txt", "--output_dir", str(tmp_path), "--block_size", "1"])
