"""Loaders for the local data the recipes train on, as `datasets` objects with clear errors.

Nothing here downloads: the real files live in shared/data (SQuAD v1.1 dev, SciTLDR, Fashion-MNIST)
or ship with a dependency (scikit-learn's digits). Every error names the file and, where it can,
the row/question/column at fault, because a bad line in a 10k-row file is otherwise a long hunt.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    IterableDataset,
    IterableDatasetDict,
    List,
    Value,
    load_dataset,
)

__all__ = [
    "FASHION_MNIST_LABELS",
    "SQUAD_FEATURES",
    "SUPPORTED_KINDS",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_idx_image_classification",
    "load_local_dataset",
    "load_scitldr_jsonl",
    "load_squad_json",
    "read_idx",
    "require_columns",
    "split_squad_by_article",
]

PathLike = str | os.PathLike

# Class names in label order, from the Fashion-MNIST README (shared/data/README.md, section 3a).
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_LABELS = tuple(str(i) for i in range(10))

# The Hub `squad` dataset's schema, so recipes written against load_dataset("squad") work unchanged.
SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)

SUPPORTED_KINDS = (
    ".json (SQuAD v1.1 format or JSON records), .jsonl, .csv, .tsv, .parquet, "
    "an image folder (one subfolder per class), "
    "an IDX images file named *-images-idx3-ubyte[.gz] with its *-labels-idx1-ubyte[.gz] beside it"
)


# --------------------------------------------------------------------------------------------------
# SQuAD v1.1
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _is_squad(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("data"), list)
        and bool(obj["data"])
        and isinstance(obj["data"][0], dict)
        and "paragraphs" in obj["data"][0]
    )


def _squad_rows(obj: Any, path: Path) -> dict[str, list]:
    """Flatten article -> paragraph -> question to one row per question, checking every span."""
    if not _is_squad(obj):
        raise ValueError(
            f"{path}: not SQuAD v1.1 format (expected {{'data': [{{'title', 'paragraphs': [...]}}]}})"
        )
    rows: dict[str, list] = {name: [] for name in SQUAD_FEATURES}
    seen: set[str] = set()
    for a, article in enumerate(obj["data"]):
        where = f"{path}: data[{a}]"
        try:
            title = article.get("title", "")
            paragraphs = article["paragraphs"]
        except (AttributeError, KeyError) as err:
            raise ValueError(f"{where}: article without 'paragraphs' ({err!r})") from err
        for p, paragraph in enumerate(paragraphs):
            try:
                context, qas = paragraph["context"], paragraph["qas"]
            except (TypeError, KeyError) as err:
                raise ValueError(f"{where}.paragraphs[{p}]: missing field {err}") from err
            for qa in qas:
                try:
                    qid, question, answers = qa["id"], qa["question"], qa.get("answers", [])
                    texts = [answer["text"] for answer in answers]
                    starts = [answer["answer_start"] for answer in answers]
                except (TypeError, KeyError) as err:
                    raise ValueError(
                        f"{where}.paragraphs[{p}] question {qa.get('id', '?')!r}: missing field {err}"
                    ) from err
                if qid in seen:
                    raise ValueError(f"{path}: question id {qid!r} occurs more than once")
                seen.add(qid)
                for text, start in zip(texts, starts, strict=True):
                    end = start + len(text) if isinstance(start, int) else None
                    if end is None or start < 0 or end > len(context) or context[start:end] != text:
                        found = context[start:end] if end is not None else None
                        raise ValueError(
                            f"{path}: question {qid!r}: answer {text!r} at answer_start={start!r} "
                            f"does not match its context (context has {len(context)} characters; "
                            f"the span there reads {found!r})"
                        )
                rows["id"].append(qid)
                rows["title"].append(title)
                rows["context"].append(context)
                rows["question"].append(question)
                rows["answers"].append({"text": texts, "answer_start": starts})
    return rows


def load_squad_json(path: PathLike) -> Dataset:
    """Load a SQuAD v1.1-format JSON file as one row per question in the Hub `squad` schema.

    Every answer span is checked against its context, because a shifted `answer_start` turns into
    silently wrong start/end labels after tokenization.
    """
    path = Path(path)
    return Dataset.from_dict(_squad_rows(_read_json(path), path), features=SQUAD_FEATURES)


def split_squad_by_article(
    source: PathLike | Dataset, validation_fraction: float = 0.2, seed: int = 0
) -> DatasetDict:
    """Split SQuAD questions into train/validation with no article title in both.

    Questions of one article share paragraphs and phrasing, so a per-question split leaks. Titles
    are shuffled with `random.Random(seed)` in first-appearance order: the same file and seed
    always give the same split.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    dataset = source if isinstance(source, Dataset) else load_squad_json(source)
    require_columns(dataset, ["title"], str(source) if not isinstance(source, Dataset) else "dataset")
    titles_per_row = dataset["title"]
    titles = list(dict.fromkeys(titles_per_row))
    if len(titles) < 2:
        raise ValueError(f"{source}: need at least 2 article titles to split by article, found {len(titles)}")
    random.Random(seed).shuffle(titles)
    n_validation = min(max(1, round(validation_fraction * len(titles))), len(titles) - 1)
    validation_titles = set(titles[:n_validation])
    train_idx = [i for i, t in enumerate(titles_per_row) if t not in validation_titles]
    validation_idx = [i for i, t in enumerate(titles_per_row) if t in validation_titles]
    return DatasetDict(train=dataset.select(train_idx), validation=dataset.select(validation_idx))


# --------------------------------------------------------------------------------------------------
# SciTLDR
# --------------------------------------------------------------------------------------------------


def load_scitldr_jsonl(path: PathLike) -> Dataset:
    """Load a SciTLDR JSON Lines file: `source` (abstract as one string), `target` (author TLDR),
    `targets` (all gold TLDRs, for the multi-target ROUGE protocol) and `paper_id`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows: dict[str, list] = {"paper_id": [], "source": [], "target": [], "targets": []}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                got = type(record).__name__
                raise ValueError(f"{where}: expected a JSON object, got {got}")  # noqa: TRY004 (bad file)
            for key in ("source", "target", "paper_id"):
                if key not in record:
                    raise ValueError(f"{where}: missing key {key!r}; present: {sorted(record)}")
            source, targets = record["source"], record["target"]
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(source, list) or not all(isinstance(s, str) for s in source):
                raise ValueError(f"{where}: 'source' must be a list of sentences")
            if not targets or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"{where}: 'target' must be a non-empty list of TLDR strings")
            rows["paper_id"].append(str(record["paper_id"]))
            rows["source"].append(" ".join(source))
            rows["target"].append(targets[0])
            rows["targets"].append(targets)
    if not rows["paper_id"]:
        raise ValueError(f"{path}: no records")
    features = Features(
        {
            "paper_id": Value("string"),
            "source": Value("string"),
            "target": Value("string"),
            "targets": List(Value("string")),
        }
    )
    return Dataset.from_dict(rows, features=features)


# --------------------------------------------------------------------------------------------------
# IDX (MNIST family) and other image data
# --------------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension (count)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # gzip magic; decide by content, not by suffix
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err


def read_idx(path: PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a numpy array shaped as its header says.

    Validates the magic number (two zero bytes, a known type code, the dimension count) and that
    the data length equals the product of the dimensions, so a truncated download fails here and
    not as a confusing reshape error. `expected_magic` pins the kind (2051 images, 2049 labels).
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number {magic} = 0x{magic:08x}; "
            f"expected e.g. {IDX_IMAGES_MAGIC} for images or {IDX_LABELS_MAGIC} for labels)"
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number is {magic}, expected {expected_magic}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header_len} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(dims, dtype=np.int64))
    expected, found = count * dtype.itemsize, len(raw) - header_len
    if found != expected:
        problem = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX data {problem}: header says shape {tuple(dims)} = {expected} bytes, "
            f"file has {found} bytes after the header"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _png_images(arrays: Iterable[np.ndarray]) -> list[dict]:
    """Encode uint8 greyscale arrays as PNG bytes ourselves: about twice as fast as letting the
    datasets `Image` feature encode PIL objects, and the stored column is the same."""
    from PIL import Image as PILImage

    encoded = []
    for array in arrays:
        buffer = io.BytesIO()
        PILImage.fromarray(array).save(buffer, format="PNG", compress_level=1)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    return encoded


def _image_classification_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict(
        {"image": _png_images(images), "label": labels.astype(np.int64).tolist()}, features=features
    )


def load_idx_image_classification(
    images_path: PathLike, labels_path: PathLike, label_names: Sequence[str] | None = None
) -> Dataset:
    """Pair an IDX images file with its labels file as `image` (PIL, greyscale) + `label` (ClassLabel).

    Without `label_names` the classes are named "0".."max label" (right for MNIST digits; pass
    `FASHION_MNIST_LABELS` for Fashion-MNIST).
    """
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if label_names is None:
        label_names = [str(i) for i in range(int(labels.max(initial=0)) + 1)]
    if len(labels) and int(labels.max()) >= len(label_names):
        raise ValueError(
            f"{labels_path}: label {int(labels.max())} out of range for {len(label_names)} class names"
        )
    return _image_classification_dataset(images, labels, label_names)


def load_fashion_mnist(data_dir: PathLike, splits: Sequence[str] = ("train", "test")) -> DatasetDict:
    """Fashion-MNIST from its upstream file names (`train-*` and `t10k-*` for test) in `data_dir`."""
    data_dir = Path(data_dir)
    prefixes = {"train": "train", "test": "t10k"}
    out = DatasetDict()
    for split in splits:
        if split not in prefixes:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; have {sorted(prefixes)}")
        prefix = prefixes[split]
        out[split] = load_idx_image_classification(
            data_dir / f"{prefix}-images-idx3-ubyte.gz",
            data_dir / f"{prefix}-labels-idx1-ubyte.gz",
            FASHION_MNIST_LABELS,
        )
    return out


def load_digits_dataset(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 8x8 digits as a train/test image DatasetDict.

    It ships inside a dependency, so the quick ablation run needs no data files. Images stay 8x8
    (the image processor resizes); pixel values 0..16 are scaled to 0..255 uint8. The split is
    stratified and fixed by `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    return DatasetDict(
        train=_image_classification_dataset(images[train_idx], labels[train_idx], DIGIT_LABELS),
        test=_image_classification_dataset(images[test_idx], labels[test_idx], DIGIT_LABELS),
    )


# --------------------------------------------------------------------------------------------------
# Generic local files
# --------------------------------------------------------------------------------------------------

_IDX_IMAGES_NAME = re.compile(r"images([-.])idx3-ubyte(\.gz)?$")


def _idx_labels_path(images_path: Path) -> Path:
    """`train-images-idx3-ubyte.gz` -> the first existing of `train-labels-idx1-ubyte[.gz]`."""
    stem = _IDX_IMAGES_NAME.sub(lambda m: f"labels{m.group(1)}idx1-ubyte", images_path.name)
    candidates = [images_path.with_name(stem + ".gz"), images_path.with_name(stem)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{images_path}: no labels file beside it (looked for {', '.join(c.name for c in candidates)})"
    )


def _kind(path: Path) -> str:
    if path.is_dir():
        return "imagefolder"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if _IDX_IMAGES_NAME.search(path.name):
        return "idx"
    suffix = path.suffix.lower()
    kinds = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
    if suffix not in kinds:
        kind = repr(suffix) if suffix else "(no extension)"
        raise ValueError(f"{path}: unsupported data file type {kind}; supported: {SUPPORTED_KINDS}")
    return kinds[suffix]


def _is_scitldr(path: Path) -> bool:
    """SciTLDR records: `source` and `target` are lists of sentences and there is a `paper_id`."""
    with path.open(encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False  # the json builder will report the parse error with more detail
    return (
        isinstance(record, dict)
        and "paper_id" in record
        and isinstance(record.get("source"), list)
        and isinstance(record.get("target"), list)
    )


def _load_file(path: Path, kind: str, cache_dir: str | None) -> Dataset:
    if kind == "json":
        try:
            obj = _read_json(path)
        except ValueError:
            obj = None  # maybe JSON Lines under a .json name: let the json builder try
        if obj is not None and _is_squad(obj):
            return Dataset.from_dict(_squad_rows(obj, path), features=SQUAD_FEATURES)
        field = "data" if isinstance(obj, dict) and isinstance(obj.get("data"), list) else None
        return _builder(path, "json", cache_dir, field=field)
    if kind == "jsonl":
        if _is_scitldr(path):
            return load_scitldr_jsonl(path)
        return _builder(path, "json", cache_dir)
    if kind == "tsv":
        return _builder(path, "csv", cache_dir, sep="\t")
    return _builder(path, kind, cache_dir)


def _describe(err: BaseException) -> str:
    """The error and its root cause: `datasets` wraps parse errors in a generic DatasetGenerationError."""
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = f"{type(err).__name__}: {err}"
    return text if root is err else f"{text}; caused by {type(root).__name__}: {root}"


def _builder(path: Path, builder: str, cache_dir: str | None, **kwargs: Any) -> Dataset:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        dataset = load_dataset(
            builder, data_files={"train": str(path)}, split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as err:  # the builders raise many types; all mean "does not parse"
        raise ValueError(f"{path}: could not be read as {builder} ({_describe(err)})") from err
    if len(dataset) == 0:
        raise ValueError(f"{path}: no rows")
    return dataset


def load_local_dataset(
    train_file: PathLike | None = None,
    validation_file: PathLike | None = None,
    test_file: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> DatasetDict:
    """Load the given local files as a DatasetDict, choosing the loader by extension.

    SQuAD-format JSON (a top-level "data" list of articles with "paragraphs") goes through
    `load_squad_json` (Hub `squad` schema, spans checked), SciTLDR JSON Lines (list-valued `source`
    and `target` plus `paper_id`) through `load_scitldr_jsonl`; other JSON/JSONL/CSV/TSV/Parquet through
    the `datasets` builders; a directory through "imagefolder"; `*-images-idx3-ubyte[.gz]` through
    the IDX reader with its labels file found by name (classes are `FASHION_MNIST_LABELS` when the
    path mentions "fashion", else "0".."max label"). Image folders, and IDX files, are loaded
    together so all splits share one class-name-to-id mapping.
    """
    given = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: Path(p) for split, p in given.items() if p is not None}
    if not files:
        raise ValueError("load_local_dataset: give at least one of train_file, validation_file, test_file")
    cache = str(cache_dir) if cache_dir is not None else None
    kinds = {split: _kind(path) for split, path in files.items()}
    out = DatasetDict()

    folders = {split: path for split, path in files.items() if kinds[split] == "imagefolder"}
    if folders:
        try:
            loaded = load_dataset(
                "imagefolder",
                data_files={split: str(path / "**") for split, path in folders.items()},
                cache_dir=cache,
            )
        except Exception as err:  # any builder failure means the folder does not parse
            raise ValueError(
                f"{', '.join(map(str, folders.values()))}: could not be read as image folders "
                f"({_describe(err)})"
            ) from err
        for split in folders:
            out[split] = loaded[split]

    idx_splits = [split for split in files if kinds[split] == "idx"]
    if idx_splits:
        # Name classes from all splits together so a split missing a class keeps the same ids.
        arrays = {}
        for split in idx_splits:
            images_path = files[split]
            labels_path = _idx_labels_path(images_path)
            images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
            labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
            if len(images) != len(labels):
                raise ValueError(
                    f"{images_path} has {len(images)} images but {labels_path} has {len(labels)}"
                )
            arrays[split] = (images, labels)
        fashion = [s for s in idx_splits if "fashion" in str(files[s]).lower()]
        if fashion and len(fashion) < len(idx_splits):
            # One split would silently be labelled with the other's class names (digits called "Trouser").
            other = next(s for s in idx_splits if s not in fashion)
            raise ValueError(
                f"{files[fashion[0]]} ({fashion[0]}) is Fashion-MNIST by its path (classes T-shirt/top, Trouser, "
                f"...) but {files[other]} ({other}) is not (classes 0, 1, ...): give the splits of one data set"
            )
        if fashion:
            names: Sequence[str] = FASHION_MNIST_LABELS
        else:
            names = [str(i) for i in range(max(int(lab.max(initial=0)) for _, lab in arrays.values()) + 1)]
        for split, (images, labels) in arrays.items():
            if len(labels) and int(labels.max()) >= len(names):
                raise ValueError(
                    f"{files[split]}: label {int(labels.max())} out of range for {len(names)} classes"
                )
            out[split] = _image_classification_dataset(images, labels, names)

    for split, path in files.items():
        if kinds[split] not in ("imagefolder", "idx"):
            out[split] = _load_file(path, kinds[split], cache)
    return DatasetDict({split: out[split] for split in files})


def require_columns(
    dataset: Dataset | DatasetDict | IterableDataset | IterableDatasetDict,
    columns: Iterable[str],
    source: str,
) -> None:
    """Raise ValueError naming the missing column(s), `source` (a file name or description) and the
    columns that are there, instead of a KeyError deep inside preprocessing."""
    columns = list(columns)
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        for split, part in dataset.items():
            require_columns(part, columns, f"{source} [{split}]")
        return
    available = dataset.column_names
    if available is None:  # an IterableDataset with unknown features: nothing to check against
        return
    missing = [column for column in columns if column not in available]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        raise ValueError(
            f"{source}: missing {noun} {', '.join(map(repr, missing))}; available columns: {available}"
        )


class TensorDictDataset(torch.utils.data.Dataset):
    """Rows of a dict of equally long tensors (data prepared once, in memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}
