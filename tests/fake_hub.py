"""A small Hugging Face Hub stand-in on 127.0.0.1 for tests (``HF_ENDPOINT``): the real huggingface_hub client
downloads from it, so downloads, revisions and failures are tried without network.

It serves model repos from local folders (each file under one commit per revision) with what the client asks for:
``/api/models/{repo}[/revision/{rev}]`` (info with the file list), ``/api/models/{repo}/tree/{rev}`` (listing) and
``/{repo}/resolve/{rev}/{path}`` (HEAD and GET, with ``Range``), and ``/api/models?search=&filter=`` (search). Faults on request: ``cut_after`` drops the
connection after that many bytes of a file (``cuts`` times per file, only files whose path ends with ``cut_only``;
a GET that starts past the cut gets nothing), and ``gated`` repos answer 401/403 as the Hub does.
Pushes: ``POST /api/repos/create`` (a token is required, as on the Hub), ``/api/models/{repo}/preupload/{rev}``
(every file goes as a regular blob, inline in the commit) and ``/api/models/{repo}/commit/{rev}`` (the NDJSON
commit): the pushed files land in a new folder, served like any other repo; ``created`` keeps each new repo's
visibility and ``tokens`` every bearer token the server was sent.
Every request is recorded in ``requests`` (method, path, Range header).
"""
from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class Repo:
    folder: Path
    revisions: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    gated: bool = False
    tags: tuple[str, ...] = ("diffusers", "text-to-image")  # what /api/models?filter= matches
    downloads: int = 0
    likes: int = 0

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def commit(self, rev: str) -> str | None:
        if rev in self.revisions:
            return self.revisions[rev]
        return rev if rev in self.revisions.values() else None


class FakeHub:
    """``with FakeHub() as hub: hub.add("me/tiny", folder); os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after = 0  # bytes of a file body sent before the connection is dropped
        self.cuts = 0  # how many GETs of each file are cut (0: none)
        self.cut_only = ""  # only files whose path ends with this
        self.cut_count: dict[str, int] = {}
        self.created: dict[str, str] = {}  # pushed repo id -> its visibility ("private" / "public")
        self.tokens: set[str] = set()
        self._push_root = Path(tempfile.mkdtemp(prefix="fake_hub_"))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, folder: Path, *, gated: bool = False, revisions: tuple[str, ...] = ("main",),
            **listing) -> Repo:
        """Serve ``folder`` as ``repo_id``; ``listing``: tags, downloads, likes (what a search sees)."""
        repo = Repo(Path(folder), {r: _sha(f"{repo_id}@{r}") for r in revisions}, gated, **listing)
        self.repos[repo_id] = repo
        return repo

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of files whose path ends with ``name``."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + name)]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: requests are recorded instead
            pass

        def _json(self, body, status: int = 200, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

        def _repo(self, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
                self._error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated")
                return None
            if repo.gated:
                self._error(403, "GatedRepo", "Access to this model is restricted: accept its conditions")
                return None
            commit = repo.commit(rev or "main")
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, commit

        def do_HEAD(self):
            self.do_GET()

        def do_POST(self):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, None))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                hub.tokens.add(auth[7:])
            else:
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            parts = path.strip("/").split("/")
            if parts == ["api", "validate-yaml"]:  # the client checks a README's front matter before a commit
                return self._json({"errors": [], "warnings": []})
            if parts == ["api", "repos", "create"]:
                req = json.loads(body)
                repo_id = f"{req.get('organization') or 'me'}/{req['name']}"
                if repo_id not in hub.repos:
                    folder = hub._push_root / repo_id.replace("/", "--")
                    folder.mkdir(parents=True)
                    hub.add(repo_id, folder)
                    hub.created[repo_id] = req.get("visibility") or ("private" if req.get("private") else "public")
                return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": _sha(repo_id)})
            if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] in ("preupload", "commit"):
                repo = hub.repos.get("/".join(parts[2:4]))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if parts[4] == "preupload":
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in json.loads(body)["files"]]})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item.get("key") == "file":
                        dest = repo.folder / item["value"]["path"]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(base64.b64decode(item["value"]["content"]))
                oid = _sha(f"{parts[2:4]}{len(repo.files())}")
                return self._json({"commitUrl": f"{hub.url}/{'/'.join(parts[2:4])}/commit/{oid}", "commitOid": oid})
            self._error(404, "EntryNotFound", f"no route {path}")

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if self.headers.get("Authorization", "").startswith("Bearer "):
                hub.tokens.add(self.headers["Authorization"][7:])
            parts = path.strip("/").split("/")
            if parts == ["api", "models"]:
                return self._search(parse_qs(urlsplit(self.path).query))
            if parts[:2] == ["api", "models"]:
                return self._api(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._error(404, "EntryNotFound", f"no route {path}")

        def _search(self, query: dict[str, list[str]]) -> None:
            """``/api/models?search=&filter=&sort=&limit=``: the repos whose id holds the text and that carry
            every filter tag, most first by the sort key."""
            text = (query.get("search") or [""])[0].lower()
            wanted = set(query.get("filter", []))
            found = [(rid, r) for rid, r in hub.repos.items() if text in rid.lower() and wanted <= set(r.tags)]
            key = (query.get("sort") or ["downloads"])[0]
            found.sort(key=lambda item: -getattr(item[1], key, 0))
            limit = int((query.get("limit") or [1000])[0])
            self._json([{"id": rid, "modelId": rid, "downloads": r.downloads, "likes": r.likes, "tags": list(r.tags),
                         "private": False, "gated": r.gated} for rid, r in found[:limit]])

        def _api(self, parts: list[str]) -> None:
            repo_id, rest = "/".join(parts[:2]), parts[2:]
            rev = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else None
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            if rest[:1] == ["tree"]:
                return self._json([{"type": "file", "path": f, "size": (repo.folder / f).stat().st_size,
                                    "oid": _sha(f)} for f in repo.files()])
            self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "gated": repo.gated,
                        "private": hub.created.get(repo_id, "public") == "private",
                        "siblings": [{"rfilename": f, "size": (repo.folder / f).stat().st_size}
                                     for f in repo.files()], "tags": ["diffusers"]})

        def _file(self, repo_id: str, rev: str, name: str) -> None:
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            file = repo.folder / name
            if not file.is_file():
                return self._error(404, "EntryNotFound", f"{name} does not exist")
            data = file.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", commit)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if self.command == "HEAD":
                return
            key = f"{repo_id}/{name}"
            if name.endswith(hub.cut_only) and hub.cut_count.get(key, 0) < hub.cuts and len(data) > hub.cut_after:
                hub.cut_count[key] = hub.cut_count.get(key, 0) + 1
                self.wfile.write(data[start:max(start, hub.cut_after)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the peer sees the connection drop mid-body
                return
            self.wfile.write(body)

    return Handler
