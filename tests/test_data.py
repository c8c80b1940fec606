"""Local-data loaders on the real files in shared/data, plus the error paths on tiny temp files."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from datasets import DatasetDict
from PIL import Image

from hf_attention.training.data import (
    FASHION_MNIST_LABELS,
    SQUAD_FEATURES,
    load_digits_dataset,
    load_idx_image_classification,
    load_local_dataset,
    load_scitldr_jsonl,
    load_squad_json,
    read_idx,
    require_columns,
    split_squad_by_article,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SQUAD_DEV = DATA / "qa" / "squad-v1.1" / "dev-v1.1.json"
SCITLDR_DEV = DATA / "summarization" / "scitldr" / "SciTLDR-A" / "dev.jsonl"
FASHION = DATA / "vision" / "fashion-mnist"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@pytest.fixture(scope="module")
def squad_dev():
    return load_squad_json(SQUAD_DEV)


def _squad_file(path: Path, answer_start: int, text: str = "Paris") -> Path:
    payload = {
        "version": "1.1",
        "data": [
            {
                "title": "France",
                "paragraphs": [
                    {
                        "context": "The capital of France is Paris.",
                        "qas": [
                            {
                                "id": "q-capital",
                                "question": "What is the capital of France?",
                                "answers": [{"text": text, "answer_start": answer_start}],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path.write_text(json.dumps(payload))
    return path


def _write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# ---------------------------------------------------------------------------------------------- SQuAD


@needs_data
def test_squad_dev_loads_in_hub_schema(squad_dev):
    assert squad_dev.num_rows == 10_570
    assert len(set(squad_dev["title"])) == 48
    assert squad_dev.features == SQUAD_FEATURES
    first = squad_dev[0]
    assert first["id"] == "56be4db0acb8001400a502ec"
    assert first["answers"] == {"text": ["Denver Broncos"] * 3, "answer_start": [177] * 3}
    assert sum(len(a["text"]) for a in squad_dev["answers"]) == 34_726


@needs_data
def test_squad_split_is_disjoint_by_article_and_deterministic(squad_dev):
    split = split_squad_by_article(squad_dev, validation_fraction=0.2, seed=0)
    train_titles, val_titles = set(split["train"]["title"]), set(split["validation"]["title"])
    assert not train_titles & val_titles
    assert len(train_titles) + len(val_titles) == 48
    assert len(val_titles) == 10  # round(0.2 * 48)
    assert split["train"].num_rows + split["validation"].num_rows == 10_570

    again = split_squad_by_article(SQUAD_DEV, validation_fraction=0.2, seed=0)  # from the path too
    assert again["validation"]["id"] == split["validation"]["id"]
    other = split_squad_by_article(squad_dev, validation_fraction=0.2, seed=1)
    assert set(other["validation"]["title"]) != val_titles


def test_squad_valid_tiny_file(tmp_path):
    ds = load_squad_json(_squad_file(tmp_path / "ok.json", answer_start=25))
    assert ds[0]["answers"] == {"text": ["Paris"], "answer_start": [25]}


@pytest.mark.parametrize("answer_start", [3, 29, 500, -1])
def test_squad_corrupted_span_names_file_and_id(tmp_path, answer_start):
    path = _squad_file(tmp_path / "bad.json", answer_start=answer_start)
    with pytest.raises(ValueError, match=r"bad\.json: question 'q-capital': answer 'Paris'"):
        load_squad_json(path)


def test_squad_bad_json_and_wrong_format(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_squad_json(broken)
    records = tmp_path / "records.json"
    records.write_text('[{"a": 1}]')
    with pytest.raises(ValueError, match="records.json: not SQuAD v1.1 format"):
        load_squad_json(records)


# ---------------------------------------------------------------------------------------------- SciTLDR


@needs_data
def test_scitldr_dev_counts():
    ds = load_scitldr_jsonl(SCITLDR_DEV)
    assert ds.num_rows == 619
    assert sum(len(t) for t in ds["targets"]) == 1_453
    assert ds.column_names == ["paper_id", "source", "target", "targets"]
    row = ds[0]
    assert isinstance(row["source"], str) and row["target"] == row["targets"][0]
    first_raw = json.loads(SCITLDR_DEV.read_text().splitlines()[0])
    assert row["source"] == " ".join(first_raw["source"])


def test_scitldr_bad_line_names_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"source": ["s."], "target": ["t"], "paper_id": "p1"}\n{"source": ["s."]}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl, line 2: missing key 'target'"):
        load_scitldr_jsonl(path)


# ---------------------------------------------------------------------------------------------- IDX


@needs_data
def test_fashion_mnist_test_split():
    ds = load_idx_image_classification(
        FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz", FASHION_MNIST_LABELS
    )
    assert ds.num_rows == 10_000
    assert ds.features["label"].names == list(FASHION_MNIST_LABELS)
    assert np.bincount(ds["label"], minlength=10).tolist() == [1_000] * 10
    image = ds[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    raw = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10_000, 28, 28) and raw.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(image), raw[0])  # PNG round trip is lossless


def test_read_idx_raw_and_gzip_agree(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = read_idx(_write_idx(tmp_path / "a-images-idx3-ubyte", images, 2051))
    gz = read_idx(_write_idx(tmp_path / "b-images-idx3-ubyte.gz", images, 2051), expected_magic=2051)
    np.testing.assert_array_equal(raw, images)
    np.testing.assert_array_equal(gz, images)


def test_read_idx_errors(tmp_path):
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    good = _write_idx(tmp_path / "x-images-idx3-ubyte", images, 2051).read_bytes()

    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(good[:-7])
    with pytest.raises(
        ValueError, match=r"truncated-idx3-ubyte: IDX data truncated: header says shape \(5, 4, 4\)"
    ):
        read_idx(truncated)

    trailing = tmp_path / "trailing"
    trailing.write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(trailing)

    bad_gzip = tmp_path / "cut.gz"
    bad_gzip.write_bytes(gzip.compress(good)[:30])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx(bad_gzip)

    not_idx = tmp_path / "notes.txt"
    not_idx.write_bytes(b"hello world, not an idx file")
    with pytest.raises(ValueError, match="notes.txt: not an IDX file"):
        read_idx(not_idx)

    with pytest.raises(ValueError, match="magic number is 2051, expected 2049"):
        read_idx(tmp_path / "x-images-idx3-ubyte", expected_magic=2049)

    with pytest.raises(FileNotFoundError, match="missing-file"):
        read_idx(tmp_path / "missing-file")


def test_idx_count_mismatch(tmp_path):
    images = _write_idx(tmp_path / "i-images-idx3-ubyte", np.zeros((3, 2, 2)), 2051)
    labels = _write_idx(tmp_path / "i-labels-idx1-ubyte", np.zeros(2), 2049)
    with pytest.raises(ValueError, match="3 images but .* has 2 labels"):
        load_idx_image_classification(images, labels)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_dataset_is_deterministic():
    first, second = load_digits_dataset(), load_digits_dataset()
    assert (first["train"].num_rows, first["test"].num_rows) == (1_437, 360)
    assert first["test"]["label"] == second["test"]["label"]
    image = np.asarray(first["train"][0]["image"])
    assert image.shape == (8, 8) and image.dtype == np.uint8
    assert first["train"].features["label"].names == [str(i) for i in range(10)]
    assert max(np.asarray(ex["image"]).max() for ex in first["test"]) == 255


# ---------------------------------------------------------------------------------------------- dispatch


@needs_data
def test_local_dataset_dispatch_on_real_files(tmp_path):
    ds = load_local_dataset(train_file=SQUAD_DEV, validation_file=SCITLDR_DEV, cache_dir=tmp_path)
    assert ds["train"].features == SQUAD_FEATURES and ds["train"].num_rows == 10_570
    assert ds["validation"].column_names == ["paper_id", "source", "target", "targets"]


def test_local_dataset_dispatch_on_small_files(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\nhello,1\nbye,0\n")
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 3, 3)), 2051)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1]), 2049)
    ds = load_local_dataset(
        train_file=csv,
        validation_file=jsonl,
        test_file=tmp_path / "t10k-images-idx3-ubyte.gz",
        cache_dir=tmp_path / "cache",
    )
    assert list(ds) == ["train", "validation", "test"]
    assert ds["train"]["text"] == ["hello", "bye"]
    assert ds["validation"]["label"] == [1, 0]
    assert ds["test"]["label"] == [0, 1, 2, 1]
    assert ds["test"][0]["image"].size == (3, 3)


def test_local_dataset_image_folders_share_labels(tmp_path):
    for split, classes in {"train": ["cat", "dog"], "val": ["dog"]}.items():
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((4, 4), 60 * i, np.uint8)).save(tmp_path / split / name / f"{i}.png")
    ds = load_local_dataset(
        train_file=tmp_path / "train", validation_file=tmp_path / "val", cache_dir=tmp_path / "cache"
    )
    assert ds["train"].num_rows == 4 and ds["validation"].num_rows == 2
    assert ds["validation"].features["label"].names == ["cat", "dog"]
    assert set(ds["validation"]["label"]) == {1}  # "dog" keeps id 1 though "cat" is absent there


def test_local_dataset_errors(tmp_path):
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hi")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported data file type '\.txt'; supported: .*csv"):
        load_local_dataset(train_file=unknown)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: could not be read as json"):
        load_local_dataset(train_file=broken, cache_dir=tmp_path / "cache")

    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_local_dataset(train_file=tmp_path / "absent.csv")

    lonely = _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 2, 2)), 2051)
    with pytest.raises(FileNotFoundError, match="no labels file beside it"):
        load_local_dataset(train_file=lonely)

    with pytest.raises(ValueError, match="at least one"):
        load_local_dataset()


def test_require_columns_names_column_source_and_available(tmp_path):
    ds = load_squad_json(_squad_file(tmp_path / "ok.json", answer_start=25))
    require_columns(ds, ["question", "context"], "ok.json")
    with pytest.raises(ValueError, match=r"ok\.json: missing column 'summary'; available columns: \['id'"):
        require_columns(ds, ["question", "summary"], "ok.json")
    with pytest.raises(ValueError, match=r"ok\.json \[train\]: missing columns 'a', 'b'"):
        require_columns(DatasetDict(train=ds), ["a", "b"], "ok.json")
