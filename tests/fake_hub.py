"""A stand-in for the Hugging Face hub on 127.0.0.1, so download tests never touch the network.

It answers what huggingface_hub 2.4 asks while listing and downloading a model, as the hub does:

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model_info: commit sha and file list (with
                                                            blobs=true: sizes, git blob ids, LFS sha256)
    HEAD /{repo}/resolve/{rev}/{path}    plain file: 200 with X-Repo-Commit, ETag (the git blob id) and
                                         Content-Length; LFS file: 302 to the "CDN" with X-Linked-Etag
                                         (the sha256) and X-Linked-Size
    GET  /{repo}/resolve/{rev}/{path}    the bytes of a plain file (Range honoured); LFS files redirect
    GET  /cdn/{sha256}                   LFS bytes (Range honoured), on http://localhost:PORT: another
                                         origin, as the real CDN is, so the client drops the token there

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), so
huggingface_hub raises its own exception types. Faults make a file's transfers (or the API) fail
in chosen ways a chosen number of times. Every request is logged. The server stops when the test
is done, or by itself after `lifetime` seconds; a stalled transfer waits at most `stall_timeout`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors",)  # stored in LFS, as the hub stores weights


class Seen(NamedTuple):
    method: str
    target: str  # the repo file whose bytes were sent (HEAD: whose headers), or "api"
    range: str | None
    authorization: str | None
    url: str


@dataclass
class Fault:
    """What the next `times` GETs of `target` (a repo file, or "api") do instead of succeeding."""

    target: str
    status: int | None = None  # answer with this HTTP status
    drop_after: int | None = None  # send this many bytes, then close the connection
    stall_after: int | None = None  # send this many bytes, then hang (until released or stall_timeout)
    corrupt: bool = False  # send the right number of bytes, one of them flipped
    times: int = 1


@dataclass
class _File:
    data: bytes
    blob_id: str  # git blob sha1: of the content, or for LFS files of the pointer file git stores
    sha256: str | None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _stored(path: str, data: bytes) -> _File:
    if not path.endswith(LFS_SUFFIXES):
        return _File(data, _git_blob_id(data), None)
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    return _File(data, _git_blob_id(pointer), sha256)


class FakeHub:
    def __init__(self, lifetime: float = 300.0, stall_timeout: float = 30.0):
        self.repos: dict[str, dict[str, _File]] = {}
        self.commits: dict[str, str] = {}
        self.faults: list[Fault] = []
        self.log: list[Seen] = []
        self.stalled = threading.Event()  # set when a stall fault starts hanging
        self.release = threading.Event()  # set to end every stall
        self.stall_timeout = stall_timeout
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}/cdn"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._deadline = threading.Timer(lifetime, self.stop)
        self._deadline.daemon = True
        self._deadline.start()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve these files as the default branch of repo_id; returns the commit sha."""
        self.repos[repo_id] = {path: _stored(path, data) for path, data in files.items()}
        self.commits[repo_id] = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        return self.commits[repo_id]

    def add_folder(self, repo_id: str, folder: Path) -> str:
        return self.add_repo(repo_id, {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()})

    def fault(self, target: str, **kwargs) -> Fault:
        fault = Fault(target, **kwargs)
        self.faults.append(fault)
        return fault

    def gets(self, target: str) -> list[Seen]:
        """The GETs that carried (part of) a file's bytes, or reached the API."""
        return [s for s in self.log if s.method == "GET" and s.target == target]

    def _take_fault(self, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.target == target and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def stop(self) -> None:
        self.release.set()
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # a silent client cannot hold a thread forever

        def log_message(self, *args) -> None:  # the test log is hub.log
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            if parts[:2] == ["api", "models"]:
                self._seen("api")
                self._api(parts[2:], parse_qs(url.query))
            elif parts[0] == "cdn" and len(parts) == 2:
                self._cdn(parts[1], body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "NotFound")

        def _seen(self, target: str) -> None:
            hub.log.append(Seen(self.command, target, self.headers.get("Range"), self.headers.get("Authorization"),
                                self.path))

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _commit(self, repo_id: str, revision: str) -> str | None:
            commit = hub.commits[repo_id]
            return commit if revision in ("main", commit) else None

        def _api(self, parts: list[str], query: dict) -> None:
            repo_id = "/".join(parts[:2])
            fault = hub._take_fault("api") if self.command == "GET" else None
            if fault and fault.status:
                return self._error(fault.status, "ServerError")
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound")
            revision = parts[3] if len(parts) == 4 and parts[2] == "revision" else "main"
            commit = self._commit(repo_id, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound")
            blobs = query.get("blobs") == ["true"]
            siblings = []
            for path, f in hub.repos[repo_id].items():
                sibling = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(f.data), blobId=f.blob_id)
                    if f.sha256:
                        sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
                siblings.append(sibling)
            info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": False, "disabled": False, "tags": [], "siblings": siblings}
            payload = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound")
            commit = self._commit(repo_id, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound")
            f = hub.repos[repo_id].get(path)
            if f is None:
                return self._error(404, "EntryNotFound", commit)
            if f.sha256:  # LFS: the hub redirects to the CDN, telling the real size and hash on the way
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn}/{f.sha256}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{f.blob_id}"')
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(len(f.data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_file(path, f, body, {"X-Repo-Commit": commit, "ETag": f'"{f.blob_id}"'})

        def _cdn(self, sha256: str, body: bool) -> None:
            for files in hub.repos.values():
                for path, f in files.items():
                    if f.sha256 == sha256:
                        return self._send_file(path, f, body, {"ETag": f'"{sha256}"'})
            self._error(404, "NotFound")

        def _send_file(self, path: str, f: _File, body: bool, headers: dict[str, str]) -> None:
            self._seen(path)
            start, stop = 0, len(f.data)
            requested = self.headers.get("Range")
            if requested and requested.startswith("bytes="):
                first, _, last = requested[len("bytes="):].partition("-")
                start, stop = int(first), min(stop, int(last) + 1) if last else stop
            fault = hub._take_fault(path) if body else None
            if fault and fault.status:
                return self._error(fault.status, "ServerError")
            data = f.data[start:stop]
            if fault and fault.corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.send_response(206 if requested else 200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data)))
            if requested:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(f.data)}")
            self.end_headers()
            if not body:
                return
            cut = None if fault is None else fault.drop_after if fault.drop_after is not None else fault.stall_after
            if cut is None:
                self.wfile.write(data)
                return
            self.wfile.write(data[:cut])
            self.wfile.flush()
            if fault.stall_after is not None:
                hub.stalled.set()
                hub.release.wait(hub.stall_timeout)
            self.close_connection = True  # the rest never comes: the client sees a body cut short

    return Handler
