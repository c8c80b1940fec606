"""Offline, quiet, reproducible test environment (see ../shared/DESIGN.md, "Offline")."""

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="hf_attention_tests_"))
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HOME": str(_TMP / "hf_home"),
    "HF_DATASETS_CACHE": str(_TMP / "hf_datasets"),
    "WANDB_DIR": str(_TMP / "wandb"),
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Tiny models: one thread each is fastest, and pytest-xdist runs one worker per core (subprocesses inherit).
    "OMP_NUM_THREADS": "1",
    # The additive kernel compiles only for large inputs; compiling costs 10-40 s, so tests use the eager path.
    "HF_ATTENTION_DISABLE_COMPILE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


from hub_server import local_hub  # noqa: E402, F401  (the local Hub fixture, for every test)
