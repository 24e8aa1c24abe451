"""A loopback HTTP file server for tests: Range support and switches for the ways servers fail.

Usage::

    with FileServer({"/files/a.tgz": b"..."}) as server:
        server.drop_after = 1000          # first request per path: send 1000 bytes, then hang up
        download_file(server.url("/files/a.tgz"), dest)
        assert server.requests[1].range == "bytes=1000-"

``files`` is a dict of URL path -> bytes, or a directory served as is (the URL path is relative
to it). Switches (plain attributes, change them any time): ``drop_after`` (bytes, first request of
each path only), ``ignore_range`` (always 200 with the full body), ``html`` (an HTML page with
Content-Type text/html instead of the file), ``not_found`` (404 for everything),
``refuse_after_drop`` (with ``drop_after``: the server stops listening before it hangs up, so the
client's reconnection is refused).
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in.</body></html>\n"


@dataclasses.dataclass(frozen=True)
class Request:
    path: str
    range: str | None


class FileServer:
    def __init__(self, files: dict[str, bytes] | Path | None = None):
        self.files = files if files is not None else {}
        self.drop_after: int | None = None
        self.ignore_range = False
        self.html = False
        self.not_found = False
        self.refuse_after_drop = False
        self.requests: list[Request] = []
        self._dropped: set[str] = set()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FileServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "use FileServer as a context manager"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str = "") -> str:
        return self.base_url + "/" + path.lstrip("/")

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    # ------------------------------------------------------------------ content

    def lookup(self, path: str) -> bytes | None:
        if isinstance(self.files, dict):
            return self.files.get(path)
        root = Path(self.files).resolve()
        target = (root / path.lstrip("/")).resolve()
        if root not in target.parents or not target.is_file():
            return None
        return target.read_bytes()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        owner: FileServer = self.server.owner  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        requested_range = self.headers.get("Range")
        owner.requests.append(Request(path, requested_range))
        body = None if owner.not_found else owner.lookup(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        if owner.html:
            self._send(200, HTML_PAGE, "text/html; charset=utf-8")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", requested_range or "")
        if match and not owner.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        payload = body[start:]
        status, headers = 200, {}
        if match and not owner.ignore_range:
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
        drop = owner.drop_after is not None and path not in owner._dropped
        if drop:
            owner._dropped.add(path)
        sent = payload[: owner.drop_after] if drop else payload
        if drop and owner.refuse_after_drop:
            # Stop listening first (this handler runs in its own thread), so no reconnection can race in.
            self.server.shutdown()
            self.server.server_close()
        self._send(status, sent, "application/octet-stream", length=len(payload), headers=headers)
        if drop:
            # Hang up mid-body: the client saw the full Content-Length but gets EOF early.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _send(self, status: int, payload: bytes, content_type: str, *, length: int | None = None, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        self.send_header("Accept-Ranges", "none" if self.server.owner.ignore_range else "bytes")  # type: ignore[attr-defined]
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)


def closed_port_url(path: str = "") -> str:
    """A loopback URL nobody listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/" + path.lstrip("/")
