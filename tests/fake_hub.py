"""A local HTTP server that answers like the Hugging Face hub's file endpoints, for real downloads in tests.

``HEAD/GET /{repo_id}/resolve/{revision}/{filename}`` with the headers huggingface_hub reads
(``X-Repo-Commit``, ``ETag`` = the file's sha256 as for LFS files, ``Content-Length``) and byte ranges
(``Range: bytes=N-`` -> 206), which is how an interrupted download resumes. Every request is logged.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Logged:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)  # "org/name/filename" -> content
    etags: dict[str, str] = field(default_factory=dict)  # override the advertised sha256 (a corrupt mirror)
    throttle: float = 0.0  # seconds between 64 KiB chunks of a GET, to catch a download mid-way
    drop_after: int | None = None  # the next full GET sends this many bytes, then the connection dies
    log: list[Logged] = field(default_factory=list)
    # "org/name/filename" -> (status, headers): answer every request for it so (a private, gated or
    # missing repository, as the real hub answers them)
    refuse: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)

    @property
    def file_requests(self) -> list[Logged]:
        """Requests for files (huggingface_hub also asks the endpoint for its own registry, once a day)."""
        return [r for r in self.log if "/resolve/" in r.path]

    def add(self, repo_id: str, filename: str, content: bytes) -> None:
        self.files[f"{repo_id}/{filename}"] = content

    def etag(self, key: str) -> str:
        return self.etags.get(key) or hashlib.sha256(self.files[key]).hexdigest()

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _refused(self) -> bool:
                parts = self.path.split("?")[0].strip("/").split("/")
                key = "/".join([*parts[:2], *parts[4:]]) if len(parts) >= 5 else ""
                if key not in hub.refuse:
                    return False
                status, headers = hub.refuse[key]
                self.send_response(status)
                for name, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()
                return True

            def _key(self) -> str | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    key = "/".join([parts[0], parts[1], *parts[4:]])
                    return key if key in hub.files else None
                return None

            def _headers(self, key: str, status: int, length: int, extra: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.etag(key)}"')
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()

            def do_HEAD(self) -> None:
                hub.log.append(Logged("HEAD", self.path, None))
                if self._refused():
                    return
                key = self._key()
                if key is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self._headers(key, 200, len(hub.files[key]), {})

            def do_GET(self) -> None:
                requested = self.headers.get("Range")
                hub.log.append(Logged("GET", self.path, requested))
                if self._refused():
                    return
                key = self._key()
                if key is None:
                    self.send_error(404)
                    return
                data = hub.files[key]
                start = int(requested.split("=")[1].split("-")[0]) if requested else 0
                body = data[start:]
                extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if requested else {}
                self._headers(key, 206 if requested else 200, len(body), extra)
                if hub.drop_after is not None and not requested:
                    cut, hub.drop_after = hub.drop_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees a broken transfer
                    self.close_connection = True
                    return
                try:
                    for i in range(0, len(body), 65536):
                        self.wfile.write(body[i : i + 65536])
                        if hub.throttle:
                            time.sleep(hub.throttle)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (killed): that is the point of some tests

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
