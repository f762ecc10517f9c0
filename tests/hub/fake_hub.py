"""A loopback Hugging Face Hub for tests: a real HTTP server on 127.0.0.1 speaking the endpoints, headers and
error codes that the real ``huggingface_hub`` client uses (formats-and-hub.md §9.7), backed by an in-memory
store of repos, commits and branches.

Served (model repos only):
  GET  /api/models                                   search (filter=tag… ANDed, author, search, limit, Link pages)
  GET  /api/models/{ns}/{name}[/revision/{rev}]      model info (sha, siblings, tags, cardData, gated, private)
  GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]   recursive listing with lfs sha256, paginated by Link
  HEAD/GET /{ns}/{name}/resolve/{rev}/{path}         X-Repo-Commit, ETag, X-Linked-Etag/Size, Range → 206
  POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/branch/{branch}, /api/models/{repo}/preupload/{rev}, /api/models/{repo}/commit/{rev}

Fault injection for tests: ``drop_once[(repo, path)] = n`` closes the connection after ``n`` body bytes of the
next GET of that file; ``corrupt[(repo, path)] = bytes`` serves other bytes than the listing's sha256 says.
Every request is logged in ``requests`` as ``(method, path_with_query, headers)``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    private: bool = False
    gated: bool = False
    tags: list[str] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2026-01-01T00:00:00.000Z"
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha → {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag → sha


class FakeHub:
    """The store and the server. Use :meth:`add_repo`/:meth:`commit` to arrange, ``url`` as the endpoint."""

    def __init__(self, *, page_size: int = 2, token: str = "hf_valid_token") -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.page_size = page_size
        self.token = token
        self.granted_tokens: set[str] = {token}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.drop_once: dict[tuple[str, str], int] = {}
        self.corrupt: dict[tuple[str, str], bytes] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- arranging -------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, **attrs: Any) -> str:
        """Create ``repo_id`` with one commit holding ``files`` on ``main``; returns the commit sha."""
        with self._lock:
            self.repos[repo_id] = FakeRepo(repo_id, **attrs)
        return self.commit(repo_id, files or {})

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
               deleted: tuple[str, ...] = ()) -> str:
        """A new commit on ``branch`` (created from ``main`` if missing) adding/replacing ``files``."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.refs.get(branch) or repo.refs.get("main")
            tree = dict(repo.commits[parent]) if parent else {}
            tree.update(files)
            for d in deleted:
                tree.pop(d, None)
            sha = hashlib.sha1(f"{repo_id}:{next(self._counter)}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and fragment in p)


def _entry(path: str, data: bytes) -> dict[str, Any]:
    e: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
    if path.endswith(LFS_SUFFIXES):
        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return e


def _sibling(path: str, data: bytes) -> dict[str, Any]:
    """A ``siblings`` item as the Hub sends it with ``blobs=true`` (size, blob id, LFS sha256 under ``sha256``)."""
    e = _entry(path, data)
    s: dict[str, Any] = {"rfilename": path, "size": e["size"], "blobId": e["oid"]}
    if "lfs" in e:
        s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
    return s


def _tree_entries(tree: dict[str, bytes]) -> list[dict[str, Any]]:
    dirs = sorted({"/".join(p.split("/")[:i]) for p in tree for i in range(1, p.count("/") + 1)})
    out = [{"type": "directory", "path": d, "oid": git_sha1(d.encode()), "size": 0} for d in dirs]
    return out + [_entry(p, tree[p]) for p in sorted(tree)]


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        # -- plumbing ----------------------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _token(self) -> str | None:
            auth = self.headers.get("authorization") or ""
            return auth[7:] if auth.lower().startswith("bearer ") else None

        def _repo(self, repo_id: str, *, files: bool = False) -> FakeRepo | None:
            """The repo if this request may see it; otherwise answer with the Hub's error and return None."""
            repo = hub.repos.get(repo_id)
            token = self._token()
            if repo is None or (repo.private and token != hub.token):
                self._error(401 if token is None else 404, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
                return None
            if files and repo.gated and token not in hub.granted_tokens:
                status = 401 if token is None else 403
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return None
            return repo

        def _commit(self, repo: FakeRepo, rev: str) -> str | None:
            sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return sha

        # -- verbs -------------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def _route(self) -> None:
            hub.requests.append((self.command, self.path, dict(self.headers)))
            split = urlsplit(self.path)
            raw = [p for p in split.path.split("/") if p != ""]
            query = parse_qs(split.query)
            try:
                if raw[:2] == ["api", "models"] and len(raw) == 2:
                    return self._search(query)
                if raw[:2] == ["api", "repos"] and raw[2:] == ["create"]:
                    return self._create(json.loads(self._body() or b"{}"))
                if raw[:2] == ["api", "validate-yaml"]:
                    self._body()
                    return self._json(200, {"errors": [], "warnings": []})
                if raw[:2] == ["api", "models"] and len(raw) >= 4:
                    repo_id = f"{unquote(raw[2])}/{unquote(raw[3])}"
                    rest = raw[4:]
                    if not rest:
                        return self._info(repo_id, "main")
                    if rest[0] == "revision" and len(rest) == 2:
                        return self._info(repo_id, unquote(rest[1]))
                    if rest[0] == "tree" and len(rest) >= 2:
                        return self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), query)
                    if rest[0] == "preupload" and len(rest) == 2:
                        return self._preupload(repo_id, json.loads(self._body() or b"{}"))
                    if rest[0] == "branch" and len(rest) == 2:
                        return self._branch(repo_id, unquote(rest[1]))
                    if rest[0] == "commit" and len(rest) == 2:
                        return self._commit_post(repo_id, unquote(rest[1]), self._body())
                if len(raw) >= 5 and raw[2] == "resolve":
                    repo_id = f"{unquote(raw[0])}/{unquote(raw[1])}"
                    return self._resolve(repo_id, unquote(raw[3]), unquote("/".join(raw[4:])))
                self._error(404, None, f"no route for {self.command} {split.path}")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _info(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id)
            if repo is None or (sha := self._commit(repo, rev)) is None:
                return
            self._json(200, self._model_dict(repo, sha))

        def _model_dict(self, repo: FakeRepo, sha: str) -> dict[str, Any]:
            tree = repo.commits[sha]
            return {
                "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                "gated": "auto" if repo.gated else False, "tags": repo.tags, "downloads": repo.downloads,
                "likes": repo.likes, "lastModified": repo.last_modified,
                "library_name": next((t for t in repo.tags if t in ("peft", "diffusers")), None),
                "siblings": [_sibling(p, tree[p]) for p in sorted(tree)],
            }

        def _tree(self, repo_id: str, rev: str, prefix: str, query: dict[str, list[str]]) -> None:
            repo = self._repo(repo_id)
            if repo is None or (sha := self._commit(repo, rev)) is None:
                return
            entries = _tree_entries(repo.commits[sha])
            if prefix:
                entries = [e for e in entries if e["path"].startswith(prefix.rstrip("/") + "/")]
            if query.get("recursive", ["false"])[0].lower() != "true":
                depth = prefix.count("/") + (1 if prefix else 0)
                entries = [e for e in entries if e["path"].count("/") == depth]
            start = int(query.get("cursor", ["0"])[0])
            page = entries[start:start + hub.page_size]
            headers = {}
            if start + hub.page_size < len(entries):
                q = f"recursive={query.get('recursive', ['false'])[0]}&expand=false&cursor={start + hub.page_size}"
                path = f"/api/models/{repo_id}/tree/{quote(rev, safe='')}" + (f"/{quote(prefix)}" if prefix else "")
                headers["Link"] = f'<{hub.url}{path}?{q}>; rel="next"'
            self._json(200, page, headers)

        def _resolve(self, repo_id: str, rev: str, path: str) -> None:
            repo = self._repo(repo_id, files=True)
            if repo is None or (sha := self._commit(repo, rev)) is None:
                return
            tree = repo.commits[sha]
            if path not in tree:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
            data = tree[path]
            etag = _entry(path, data).get("lfs", {}).get("oid") or git_sha1(data)
            served = hub.corrupt.get((repo_id, path), data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if path.endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            rng = self.headers.get("Range")
            if self.command == "GET" and rng and (m := re.match(r"bytes=(\d+)-(\d*)$", rng)):
                start = int(m[1])
                end = int(m[2]) if m[2] else len(served) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(served)}"
                return self._send(206, served[start:end + 1], headers, "application/octet-stream")
            drop = hub.drop_once.pop((repo_id, path), None) if self.command == "GET" else None
            if drop is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(served)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(served[:drop])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(200, served, headers, "application/octet-stream")

        def _search(self, query: dict[str, list[str]]) -> None:
            tags = query.get("filter", [])
            author = (query.get("author") or [None])[0]
            text = ((query.get("search") or [""])[0]).lower()
            found = [r for r in hub.repos.values() if not r.private
                     and all(t in r.tags for t in tags)
                     and (author is None or r.repo_id.split("/")[0] == author)
                     and text in r.repo_id.lower()]
            if (query.get("sort") or [""])[0] in ("downloads", "likes"):
                key = query["sort"][0]
                found.sort(key=lambda r: -getattr(r, key))
            limit = int((query.get("limit") or ["1000"])[0])
            self._json(200, [self._model_dict(r, r.refs["main"]) for r in found[:limit]])

        def _create(self, body: dict[str, Any]) -> None:
            if self._token() != hub.token:
                return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = bool(body.get("private")) or body.get("visibility") == "private"
            hub.add_repo(repo_id, {}, private=private)
            self._json(200, {"url": url, "name": repo_id})

        def _preupload(self, repo_id: str, body: dict[str, Any]) -> None:
            if self._repo(repo_id) is None:
                return
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in body.get("files", [])]
            self._json(200, {"files": files, "commitOid": hub.repos[repo_id].refs.get("main")})

        def _branch(self, repo_id: str, branch: str) -> None:
            self._body()
            if self._token() != hub.token:
                return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            if (repo := self._repo(repo_id)) is None:
                return
            if branch in repo.refs:
                return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
            repo.refs[branch] = repo.refs["main"]
            self._json(200, {})

        def _commit_post(self, repo_id: str, branch: str, body: bytes) -> None:
            if self._token() != hub.token:
                return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            if self._repo(repo_id) is None:
                return
            files: dict[str, bytes] = {}
            deleted: list[str] = []
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    deleted.append(item["value"]["path"])
                elif item["key"] == "lfsFile":
                    return self._error(400, None, "this fake hub only accepts regular uploads")
            sha = hub.commit(repo_id, files, branch=branch, deleted=tuple(deleted))
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None})

    return Handler
