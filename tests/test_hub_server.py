"""The local Hub server works with the real huggingface_hub/transformers clients (push and pull)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import HfApi, get_session, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from transformers import BertConfig, BertModel

try:
    from tests.hub_server import LocalHubServer, hub_client_env, local_hub  # noqa: F401
except ImportError:  # tests/ is on sys.path but is not a package
    from hub_server import LocalHubServer, hub_client_env, local_hub  # noqa: F401

REPO = "user/tiny-bert"
TOKEN = "hf_fake"


def _tiny_bert() -> BertModel:
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def _forward(model: BertModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).last_hidden_state


def test_push_to_hub_then_from_pretrained(local_hub: LocalHubServer, tmp_path: Path) -> None:
    model = _tiny_bert()
    input_ids = torch.randint(0, 100, (2, 7))

    commit = model.push_to_hub(REPO, token=TOKEN, commit_message="tiny bert")
    assert commit.oid == local_hub.head(REPO)
    stored = local_hub.files(REPO)
    assert {"config.json", "model.safetensors", "README.md", ".gitattributes"} <= stored.keys()
    assert json.loads(stored["config.json"])["hidden_size"] == 32
    assert all(r.token == TOKEN for r in local_hub.requests if r.method == "POST")

    loaded = BertModel.from_pretrained(REPO).eval()
    torch.testing.assert_close(_forward(loaded, input_ids), _forward(model, input_ids), rtol=0, atol=0)
    assert (tmp_path / "hf_home" / "hub" / "models--user--tiny-bert").is_dir()

    api = HfApi(endpoint=local_hub.endpoint)
    assert sorted(api.list_repo_files(REPO)) == sorted(stored)
    assert api.model_info(REPO).sha == commit.oid
    assert local_hub.unknown_routes == []


def test_revisions_snapshot_and_errors(local_hub: LocalHubServer, tmp_path: Path) -> None:
    first = _tiny_bert()
    first_commit = first.push_to_hub(REPO, token=TOKEN)
    second = _tiny_bert()
    second_commit = second.push_to_hub(REPO, token=TOKEN)
    assert first_commit.oid != second_commit.oid

    input_ids = torch.randint(0, 100, (1, 5))
    old = BertModel.from_pretrained(REPO, revision=first_commit.oid).eval()
    new = BertModel.from_pretrained(REPO).eval()
    torch.testing.assert_close(_forward(old, input_ids), _forward(first, input_ids), rtol=0, atol=0)
    torch.testing.assert_close(_forward(new, input_ids), _forward(second, input_ids), rtol=0, atol=0)

    folder = Path(snapshot_download(REPO, local_dir=tmp_path / "snap"))
    assert (folder / "config.json").read_bytes() == local_hub.files(REPO)["config.json"]

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "config.json")

    response = httpx2.get(f"{local_hub.endpoint}/api/not-a-route")
    assert response.status_code == 404 and "Unknown route" in response.json()["error"]
    assert local_hub.unknown_routes == ["GET /api/not-a-route"]
    with pytest.raises(RuntimeError, match="blocked"):  # nothing but the local hub is reachable
        get_session().get("https://huggingface.co/api/whoami-v2")


def test_client_env_in_subprocess(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json
        from huggingface_hub import HfApi, get_session, hf_hub_download, snapshot_download
        api = HfApi()
        api.create_repo("user/data", token="hf_x")
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id="user/data", token="hf_x")
        path = hf_hub_download("user/data", "a/b.txt")
        snap = snapshot_download("user/data")
        files = api.list_repo_files("user/data")
        print(json.dumps({"text": open(path).read(), "files": files, "snap": snap}))
        """
    )
    with LocalHubServer() as hub:
        env = {**os.environ, **hub_client_env(hub.endpoint, hf_home=tmp_path / "hf_home")}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["text"] == "hello"
        assert sorted(out["files"]) == [".gitattributes", "a/b.txt"]
        assert out["snap"].startswith(str(tmp_path / "hf_home" / "hub"))
        assert hub.files("user/data")["a/b.txt"] == b"hello"
        assert hub.unknown_routes == []
