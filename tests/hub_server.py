"""A tiny local stand-in for the Hugging Face Hub, for tests that push and pull without internet.

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.4.0 uses for ``push_to_hub``,
``from_pretrained(repo_id)``, ``hf_hub_download``, ``snapshot_download`` and ``HfApi`` listings.
Every file is uploaded in "regular" mode (base64 inside the NDJSON commit), so no LFS/Xet server
is needed. Repos are git-like: each commit is an immutable ``{path: blob sha1}`` snapshot and
blobs are stored content-addressed in a temp dir.

In-process use (pytest), with the ``local_hub`` fixture defined below::

    from hub_server import local_hub  # noqa: F401  (``tests.hub_server`` if tests/ is a package)

    def test_push(local_hub):
        model.push_to_hub("user/tiny", token="hf_fake")
        assert "config.json" in local_hub.files("user/tiny")
        assert BertModel.from_pretrained("user/tiny")  # pulled from the local server

or by hand: ``with LocalHubServer() as hub: patch_hub_endpoint(monkeypatch, hub.endpoint, tmp_path)``.

Subprocess use: ``env = {**os.environ, **hub_client_env(hub.endpoint, hf_home=tmp_path)}``.

Why both: ``huggingface_hub.constants`` reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE``/``HF_HOME`` once at
import, and ``huggingface_hub.hf_api.api`` plus ``transformers.utils.hub._hf_api`` are ``HfApi``
instances that captured the endpoint when created. Setting the env var inside an already running
process therefore does nothing; ``patch_hub_endpoint`` patches those module attributes instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

logger = logging.getLogger(__name__)

DEFAULT_USER = "user"
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_REPO_ACTIONS = {"revision", "preupload", "commit", "tree", "paths-info", "branch", "refs", "commits"}


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what the Hub uses as ETag/oid for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    """An immutable repo snapshot."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path -> blob sha1


@dataclass
class Repo:
    """Branches, commits and metadata of one repo."""

    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # ref name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0


@dataclass
class RequestRecord:
    """One handled request, for assertions and debugging."""

    method: str
    path: str
    status: int
    token: str | None


class HubError(Exception):
    """An error answered as JSON, with the Hub's ``X-Error-Code`` header when given."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


class LocalHubServer:
    """Local Hub API server on 127.0.0.1 (free port), served from a background thread."""

    def __init__(self, root: str | os.PathLike | None = None, user: str = DEFAULT_USER) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="local_hub_") if root is None else root)
        self.blob_dir = self.root / "blobs"
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RequestRecord] = []
        self.unknown_routes: list[str] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (only valid once started)."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHubServer:
        """Bind a free port and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down and delete the temp dir if this object created it."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._httpd = self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- assertions helpers ----------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Contents of every file of ``repo_id`` at ``revision`` (branch name or commit oid)."""
        with self._lock:
            commit = self._commit(self._repo(repo_type, repo_id), revision)
            return {path: self._read_blob(sha) for path, sha in sorted(commit.files.items())}

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit oid ``revision`` points to."""
        with self._lock:
            return self._commit(self._repo(repo_type, repo_id), revision).oid

    def routes_called(self) -> list[str]:
        """``"METHOD /path -> status"`` for every request so far."""
        return [f"{r.method} {r.path} -> {r.status}" for r in self.requests]

    # -- storage ---------------------------------------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found for {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision)
        if oid is None:
            matches = [c for c in repo.commits if c.startswith(revision)] if len(revision) >= 7 else []
            if len(matches) != 1:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            oid = matches[0]
        return repo.commits[oid]

    def _write_blob(self, data: bytes) -> str:
        sha = git_blob_sha1(data)
        path = self.blob_dir / sha
        if not path.exists():
            path.write_bytes(data)
        return sha

    def _read_blob(self, sha: str) -> bytes:
        return (self.blob_dir / sha).read_bytes()

    def _new_commit(
        self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, str]
    ) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, title, sorted(files.items()), self._counter]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, title, message, _now(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the initial ``.gitattributes`` commit, like the Hub does."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_id, repo_type, private, _now())
            initial = self._new_commit(
                repo, None, "initial commit", "", {".gitattributes": self._write_blob(GITATTRIBUTES)}
            )
            repo.branches["main"] = initial.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIXES[repo_type]}{repo_id}"


def _file_entry(path: str, sha: str, size: int) -> dict[str, Any]:
    return {"type": "file", "oid": sha, "size": size, "path": path}


def _dir_entry(path: str, commit_oid: str) -> dict[str, Any]:
    return {
        "type": "directory",
        "oid": hashlib.sha1(f"{commit_oid}:{path}".encode()).hexdigest(),
        "size": 0,
        "path": path,
    }


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to ``self.hub``; see ``LocalHubServer``."""

    hub: LocalHubServer
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    # -- plumbing --------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("local hub: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._status = status

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        self._status = 0
        split = urlsplit(self.path)
        self._query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [unquote(s) for s in split.path.strip("/").split("/")] if split.path.strip("/") else []
        try:
            body = self._read_body()
            with self.hub._lock:
                self._route(method, segments, body)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json({"error": err.message}, err.status, headers)
        except Exception as err:  # a bug in the server: make it loud in the test output
            logger.exception("local hub: %s %s failed", method, self.path)
            self._json({"error": f"local hub server error: {err!r}"}, 500)
        self.hub.requests.append(RequestRecord(method, split.path, self._status, self._token()))

    def _unknown(self, method: str) -> None:
        route = f"{method} {self.path}"
        self.hub.unknown_routes.append(route)
        logger.warning("local hub: unknown route %s", route)
        print(f"[local hub] unknown route: {route}", file=sys.stderr)
        raise HubError(404, f"Unknown route in LocalHubServer: {route}")

    def _route(self, method: str, seg: list[str], body: bytes) -> None:
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:], body)
        # /{prefix}{repo_id}/resolve/{revision}/{path}
        repo_type = "model"
        if seg and seg[0] in _REPO_TYPES and seg[0] != "models":
            repo_type, seg = _REPO_TYPES[seg[0]], seg[1:]
        for idx in (2, 1):
            if method in ("GET", "HEAD") and len(seg) > idx + 2 and seg[idx] == "resolve":
                return self._resolve(repo_type, "/".join(seg[:idx]), seg[idx + 1], "/".join(seg[idx + 2 :]))
        self._unknown(method)

    def _route_api(self, method: str, seg: list[str], body: bytes) -> None:
        hub = self.hub
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if seg == ["repos", "delete"] and method == "DELETE":
            data = json.loads(body or b"{}")
            repo_id = f"{data.get('organization') or hub.user}/{data['name']}"
            hub._repo(data.get("type") or "model", repo_id)
            del hub.repos[(data.get("type") or "model", repo_id)]
            return self._json({})
        if not seg or seg[0] not in _REPO_TYPES:
            return self._unknown(method)
        repo_type, rest = _REPO_TYPES[seg[0]], seg[1:]
        if len(rest) >= 3 and rest[2] in _REPO_ACTIONS:
            repo_id, action, args = "/".join(rest[:2]), rest[2], rest[3:]
        elif len(rest) >= 2 and rest[1] in _REPO_ACTIONS:
            repo_id, action, args = rest[0], rest[1], rest[2:]
        elif 1 <= len(rest) <= 2:
            repo_id, action, args = "/".join(rest), "", []
        else:
            return self._unknown(method)
        repo = hub._repo(repo_type, repo_id)
        revision = args[0] if args else "main"
        handlers = {
            ("GET", ""): lambda: self._repo_info(repo, "main"),
            ("GET", "revision"): lambda: self._repo_info(repo, revision),
            ("POST", "preupload"): lambda: self._preupload(repo, revision, json.loads(body)),
            ("POST", "commit"): lambda: self._commit(repo, revision, body),
            ("GET", "tree"): lambda: self._tree(repo, revision, "/".join(args[1:])),
            ("POST", "paths-info"): lambda: self._paths_info(repo, revision, body),
            ("POST", "branch"): lambda: self._create_branch(repo, revision, json.loads(body or b"{}")),
            ("DELETE", "branch"): lambda: self._delete_branch(repo, revision),
            ("GET", "refs"): lambda: self._refs(repo),
            ("GET", "commits"): lambda: self._commits(repo, revision),
        }
        handler = handlers.get((method, action))
        if handler is None:
            return self._unknown(method)
        return handler()

    # -- API handlers ----------------------------------------------------------------------------
    def _whoami(self) -> None:
        if self._token() is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self.hub.user
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def _create_repo(self, data: dict[str, Any]) -> None:
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or self.hub.user}/{data['name']}"
        private = data.get("private") or data.get("visibility") == "private"
        try:
            self.hub.create_repo(repo_id, repo_type, bool(private))
        except HubError as err:
            self._json({"error": err.message, "url": self.hub.repo_url(repo_type, repo_id)}, 409)
            return
        self._json({"url": self.hub.repo_url(repo_type, repo_id), "name": repo_id, "id": repo_id})

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = self.hub._commit(repo, revision)
        siblings = [
            {"rfilename": p, "size": (self.hub.blob_dir / s).stat().st_size, "blobId": s}
            for p, s in sorted(commit.files.items())
        ]
        name = repo.repo_id
        self._json(
            {
                "_id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "id": name,
                "modelId": name,
                "author": name.split("/")[0] if "/" in name else None,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(s["size"] for s in siblings),
            }
        )

    def _preupload(self, repo: Repo, revision: str, data: dict[str, Any]) -> None:
        files = repo.commits[repo.branches[revision]].files if revision in repo.branches else {}
        self._json(
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": files.get(f["path"]),
                    }
                    for f in data.get("files", [])
                ],
                "commitOid": repo.branches.get(revision),
            }
        )

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        create_pr = self._query.get("create_pr") in ("1", "true", "True")
        head_oid = repo.branches.get(revision)
        if head_oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent_commit = header.get("parentCommit")
        if parent_commit and not create_pr and parent_commit != head_oid:
            raise HubError(412, f"A commit has happened since. Please refresh and try again ({head_oid}).")
        files = dict(repo.commits[head_oid].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                raw = value["content"]
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                files[value["path"]] = self.hub._write_blob(data)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: s for p, s in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"LocalHubServer only supports regular files, got a {key!r} line")
        commit = self.hub._new_commit(
            repo, head_oid, header.get("summary", ""), header.get("description", ""), files
        )
        base = self.hub.repo_url(repo.repo_type, repo.repo_id)
        result: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{base}/commit/{commit.oid}",
        }
        if create_pr:
            repo.pr_count += 1
            repo.branches[f"refs/pr/{repo.pr_count}"] = commit.oid
            result["pullRequestUrl"] = f"{base}/discussions/{repo.pr_count}"
        else:
            repo.branches[revision] = commit.oid
        self._json(result)

    def _entries(self, commit: Commit) -> dict[str, dict[str, Any]]:
        """Every file and directory of ``commit`` as tree entries, keyed by path."""
        entries: dict[str, dict[str, Any]] = {}
        for path, sha in commit.files.items():
            entries[path] = _file_entry(path, sha, (self.hub.blob_dir / sha).stat().st_size)
            parts = path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                entries.setdefault(folder, _dir_entry(folder, commit.oid))
        return entries

    def _tree(self, repo: Repo, revision: str, path: str) -> None:
        commit = self.hub._commit(repo, revision)
        entries = self._entries(commit)
        path = path.strip("/")
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        recursive = self._query.get("recursive", "false").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        selected = [
            e
            for p, e in sorted(entries.items())
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        ]
        self._json(selected)

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        commit = self.hub._commit(repo, revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        entries = self._entries(commit)
        self._json([entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    def _create_branch(self, repo: Repo, branch: str, data: dict[str, Any]) -> None:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: {branch}")
        repo.branches[branch] = self.hub._commit(repo, data.get("startingPoint") or "main").oid
        self._json({})

    def _delete_branch(self, repo: Repo, branch: str) -> None:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        del repo.branches[branch]
        self._json({})

    def _refs(self, repo: Repo) -> None:
        def ref(name: str, oid: str) -> dict[str, str]:
            return {
                "name": name,
                "ref": name if name.startswith("refs/") else f"refs/heads/{name}",
                "targetCommit": oid,
            }

        branches = [ref(n, o) for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
        prs = [ref(n, o) for n, o in repo.branches.items() if n.startswith("refs/pr/")]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _commits(self, repo: Repo, revision: str) -> None:
        commit: Commit | None = self.hub._commit(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": self.hub.user}],
                    "date": commit.date,
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(history)

    # -- file download ---------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self.hub._repo(repo_type, repo_id)
        commit = self.hub._commit(repo, revision)
        sha = commit.files.get(filename)
        if sha is None:
            raise HubError(
                404, f"Entry not found: {filename}", "EntryNotFound", {"X-Repo-Commit": commit.oid}
            )
        data = self.hub._read_blob(sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{sha}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        status = 200
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes=") and "," not in range_header:
            start_s, _, end_s = range_header[len("bytes=") :].partition("-")
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else len(data) - 1
            else:  # suffix range: last N bytes
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data):
                raise HubError(
                    416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)


# -- client configuration ------------------------------------------------------------------------
def hub_client_env(endpoint: str, hf_home: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment variables pointing a fresh ``huggingface_hub`` process at ``endpoint``.

    Use for subprocesses (``subprocess.run(..., env={**os.environ, **hub_client_env(...)})``):
    these variables are read at import time, so they do nothing in an already running process.
    Offline switches are set to "0" (not removed) so they override an inherited ``HF_HUB_OFFLINE=1``.
    """
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_ETAG_TIMEOUT": "10",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if hf_home is not None:
        home = Path(hf_home)
        env |= {
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
        }
    return env


def patch_hub_endpoint(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | os.PathLike | None = None
) -> None:
    """Point the in-process ``huggingface_hub``/``transformers`` clients at ``endpoint``.

    Patches the import-time constants (endpoint, URL template, offline/xet/telemetry flags, cache
    paths when ``hf_home`` is given), the module-level ``HfApi`` instances that captured the old
    endpoint, and installs a fresh HTTP client that refuses any host other than ``endpoint``'s, so a
    missed code path fails loudly instead of reaching the internet. All undone by ``monkeypatch``.
    ``HfApi`` objects created before this call keep their old endpoint; pass ``endpoint=`` to those.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    for key, value in hub_client_env(endpoint, hf_home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    if hf_home is not None:
        home = Path(hf_home)
        home.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(home / "assets"))
        monkeypatch.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # re-created lazily with the patched endpoint

    allowed = _http._url_origin(endpoint)

    def guard(request: Any) -> None:
        if _http._url_origin(str(request.url)) != allowed:
            raise RuntimeError(f"Request to {request.url} blocked: only the local hub {endpoint} is allowed")

    def client_factory() -> Any:
        client = _http.default_client_factory()
        client.event_hooks = {**client.event_hooks, "request": [guard, *client.event_hooks["request"]]}
        return client

    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", client_factory)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHubServer]:
    """A running ``LocalHubServer`` with the in-process client patched to use it and a fresh HF_HOME."""
    with LocalHubServer(root=tmp_path / "local_hub") as hub:
        patch_hub_endpoint(monkeypatch, hub.endpoint, hf_home=tmp_path / "hf_home")
        yield hub
