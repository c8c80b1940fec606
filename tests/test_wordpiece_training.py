"""The WordPiece tokenizer the recipes learn from training text: the same vocabulary in every process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCITLDR_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/summarization/scitldr/SciTLDR-A/train.jsonl"

TRAIN_IN_A_FRESH_PROCESS = """
import json, sys
from hf_attention.training.setup import train_wordpiece_tokenizer
rows = [json.loads(line) for line in open(sys.argv[1])][:300]
texts = [" ".join(r["source"]) for r in rows] + [r["target"][0] for r in rows]
print(json.dumps(train_wordpiece_tokenizer(texts, 2000).get_vocab()))
"""


@pytest.mark.skipif(not SCITLDR_TRAIN.exists(), reason="needs ../shared/data")
def test_same_text_gives_the_same_vocabulary_in_every_process():
    # Each process hashes with its own random seed: that is what made tokenizers' trainer disagree with itself.
    vocabs = [
        json.loads(subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, str(SCITLDR_TRAIN)],
                                  check=True, capture_output=True, text=True).stdout)
        for _ in range(3)
    ]
    assert len(vocabs[0]) == 2000
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_continuation_pieces_stay_ordinary_tokens():
    from hf_attention.training.setup import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(["attention attends", "sparse attention is fast", "tokens attend"], 60)
    assert sorted(tokenizer.all_special_tokens) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    ids = tokenizer("attends tend")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert any(p.startswith("##") for p in pieces), pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == "attends tend"
