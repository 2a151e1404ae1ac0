"""A small Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1 only.

It implements just what huggingface_hub's client calls for an upload and a download:
`POST /api/repos/create`, `POST /api/validate-yaml`, `POST /api/models/{repo}/preupload/{rev}` (always "regular",
so no LFS or Xet), `POST /api/models/{repo}/commit/{rev}` (NDJSON with base64 file contents), the tree listing,
and `HEAD`/`GET /{repo}/resolve/{rev}/{path}`. Every request is recorded; a failure can be injected into the next
commit (a 500, or a connection dropped without an answer). The request count is capped so a client retry loop
cannot spin forever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

MAX_REQUESTS = 400
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class HubState:
    def __init__(self):
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.fail_next_commit: str | None = None  # "500" or "drop"
        self.commit_gate: threading.Event | None = None  # when set, commits wait for it (at most 60 s)
        self.validated_cards: list[str] = []


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def validate_card(content: str) -> str | None:
    """The checks the Hub makes on a model card's front matter that matter here; an error text or None."""
    match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
    if not match:
        return "no YAML front matter"
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return f"YAML does not parse: {exc}"
    if not isinstance(data, dict):
        return "front matter is not a mapping"
    if not isinstance(data.get("tags", []), list) or not all(isinstance(t, str) for t in data.get("tags", [])):
        return "tags must be a list of strings"
    for entry in data.get("widget", []) or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            return "widget entries need a text"
        if not isinstance(entry.get("output", {}).get("url"), str):
            return "widget entries need output.url"
    base = data.get("base_model")
    if base is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
        return f"base_model {base!r} is not a model id"
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled client cannot hold a server thread forever
    state: HubState
    base_url: str

    def log_message(self, *args):  # keep pytest output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _record(self) -> bool:
        with self.state.lock:
            self.state.requests.append(Request(self.command, self.path, self.headers.get("Authorization")))
            over = len(self.state.requests) > MAX_REQUESTS
        if over:
            self._error(400, "test hub: request budget exhausted")
        return not over

    def _route(self, routes) -> None:
        if not self._record():
            return
        path = urlparse(self.path).path
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                handler(**{k: unquote(v) for k, v in match.groupdict().items()})
                return
        self.state.unhandled.append(f"{self.command} {self.path}")
        self._error(404, f"test hub: no route for {self.command} {path}")

    def do_POST(self):
        self._route([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", self.validate_yaml),
            (rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            (rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
        ])

    def do_GET(self):
        self._route([
            (rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)", self.tree),
            (rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ])

    def do_HEAD(self):
        self._route([(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve)])

    # -- endpoints ------------------------------------------------------------------------------------------------

    def _repo(self, repo: str) -> Repo | None:
        found = self.state.repos.get(repo)
        if found is None:
            self._error(404, f"Repository {repo} not found", "RepoNotFound")
        return found

    def create_repo(self):
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                # The Hub answers 409 with the url, which `create_repo(exist_ok=True)` returns.
                self._json(409, {"error": "You already created this model repo", "url": f"{self.base_url}/{repo_id}"})
                return
            self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._json(200, {"url": f"{self.base_url}/{repo_id}", "name": repo_id})

    def validate_yaml(self):
        payload = json.loads(self._body())
        self.state.validated_cards.append(payload["content"])
        problem = validate_card(payload["content"])
        if problem:
            self._send(400, problem.encode(), content_type="text/plain")
        else:
            self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, rev: str):
        payload = json.loads(self._body())
        if self._repo(repo) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload["files"]]
        self._json(200, {"files": files, "commitOid": self.state.repos[repo].head})

    def commit(self, repo: str, rev: str):
        failure, self.state.fail_next_commit = self.state.fail_next_commit, None
        if failure == "drop":
            # Read half the body, then hang up without an answer: what a reset connection looks like.
            self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        body = self._body()
        if failure == "500":
            self._error(500, "Internal Error - We're working hard to fix this as soon as possible!")
            return
        if self.state.commit_gate is not None and not self.state.commit_gate.wait(60):
            self._error(503, "test hub: commit gate never opened")
            return
        target = self._repo(repo)
        if target is None:
            return
        staged: dict[str, bytes] = {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64"
                staged[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] != "header":
                self._error(400, f"test hub: unsupported commit operation {item['key']}")
                return
        with self.state.lock:
            target.files.update(staged)  # all or nothing, like a git commit
            sha = hashlib.sha1(body).hexdigest()
            target.commits.append(sha)
        self._json(200, {"commitUrl": f"{self.base_url}/{repo}/commit/{sha}", "commitOid": sha})

    def tree(self, repo: str, rev: str):
        target = self._repo(repo)
        if target is None:
            return
        entries = [{"type": "file", "path": p, "size": len(d), "oid": _git_sha1(d)}
                   for p, d in sorted(target.files.items()) if "/" not in p]
        self._json(200, entries)

    def resolve(self, repo: str, rev: str, file: str):
        target = self._repo(repo)
        if target is None:
            return
        data = target.files.get(file)
        headers = {"X-Repo-Commit": target.head}
        if data is None:
            self._json(404, {"error": "Entry not found"}, {**headers, "X-Error-Code": "EntryNotFound"})
            return
        self._send(200, data, {**headers, "ETag": f'"{_git_sha1(data)}"'}, "application/octet-stream")


class HubServer:
    """`with HubServer() as hub:` serves on a free 127.0.0.1 port; `hub.url` is the endpoint to pass the client."""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        handler.base_url = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    @property
    def repos(self) -> dict[str, Repo]:
        return self.state.repos
