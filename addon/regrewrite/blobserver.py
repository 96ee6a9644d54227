"""The local blob server cache hits are redirected to: plain HTTP, ``sendfile``.

mitmproxy's own data path moves a few hundred MB/s at most; the kernel copies a file to
a socket several times faster.  So after the proxy has checked that a client may read a
blob, it answers ``307`` with a short-lived signed URL here (registries redirect blob
downloads to their storage the same way, and every client follows).

URL: ``/blobs/<upstream>/<algorithm>/<hex>?e=<unix expiry>&s=<hmac>``.  Only signed URLs
are served; nothing else of the directory is reachable.  Runs in its own threads,
never on mitmproxy's event loop.  No mitmproxy imports.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from regrewrite.blobcache import Signer, Store

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # beyond this a connection is closed at once
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may sit idle
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_SEND_TIMEOUT = struct.pack("ll", int(IDLE_TIMEOUT), 0)  # struct timeval


class BlobServer:
    def __init__(
        self,
        store: Store,
        signer: Signer,
        host: str,
        port: int,
        *,
        served: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.served = served
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # Files being sent right now (eviction leaves them alone).
        self.open_files: Counter[str] = Counter()
        self.lock = threading.Lock()
        # TLS, when the proxy's clients speak it: per server name, the certificate the
        # proxy itself presents for that name; the first one is the default (no SNI).
        self.tls_default: ssl.SSLContext | None = None
        self.tls_by_name: dict[str, ssl.SSLContext] = {}
        self.httpd = _Server((host, port), _Handler, self)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def local_host(self) -> str:
        """An address of this server the proxy itself can connect to."""
        host = self.httpd.server_address[0]
        return "127.0.0.1" if host in ("", "0.0.0.0") else host

    def start(self) -> BlobServer:
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.5},
            daemon=True,
            name="blobserver",
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def add_tls(self, name: str, context: ssl.SSLContext) -> None:
        """Serve TLS for `name` with `context` (one port: plain HTTP and TLS are told
        apart by the first byte a client sends)."""
        with self.lock:
            self.tls_by_name[name] = context
            if self.tls_default is None:
                context.sni_callback = self._pick_certificate
                self.tls_default = context

    def has_tls(self, name: str) -> bool:
        with self.lock:
            return name in self.tls_by_name

    def _pick_certificate(self, sslobj, name, default) -> None:
        chosen = self.tls_by_name.get(name) if name else None
        if chosen is not None and chosen is not default:
            sslobj.context = chosen

    def busy(self, path: str) -> bool:
        with self.lock:
            return self.open_files[path] > 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, owner: BlobServer) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.owner.slots.acquire(blocking=False):
            self.shutdown_request(request)  # bounded: never a thread per stray connection
            return
        super().process_request(request, client_address)

    def finish_request(self, request, client_address):
        tls = self.owner.tls_default
        if tls is not None:
            request.settimeout(IDLE_TIMEOUT)
            try:
                first = request.recv(1, socket.MSG_PEEK)
            except OSError:
                return
            if first == b"\x16":  # a TLS ClientHello
                try:
                    request = tls.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                try:
                    self.RequestHandlerClass(request, client_address, self)
                finally:
                    request.close()
                return
        self.RequestHandlerClass(request, client_address, self)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner.slots.release()

    def handle_error(self, request, client_address):
        # socketserver prints a traceback to stderr: a client (or a balancer's health
        # check, which resets once it has the status line) that went away is expected.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        logger.exception(f"registry cache: blob server error (client {client_address[0]})")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client pulls many layers
    server: _Server
    timeout = IDLE_TIMEOUT

    def log_message(self, format, *args):  # noqa: A002 - base class signature
        pass  # the URL carries a signature; the proxy logs the hit itself

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _error(self, status: int) -> None:
        body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'
        if status == 403:
            body = b'{"errors":[{"code":"DENIED","message":"link expired or invalid"}]}'
        elif status == 400:
            body = b'{"errors":[{"code":"UNSUPPORTED","message":"request body not allowed"}]}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 400:
            self.send_header("Connection", "close")  # (sets close_connection too)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        if "Transfer-Encoding" in self.headers or any(
            v.strip() != "0" for v in self.headers.get_all("Content-Length", ())
        ):
            # A GET or HEAD has no body, and this server reads none: left unread, it was
            # parsed as the next request on the connection, which a balancer reuses for
            # other clients (one client's body chose another's answer). Refused, closed.
            self._error(400)
            return
        parts = urlsplit(self.path)
        if not parts.path.startswith("/blobs/"):
            self._error(404)
            return
        relpath = parts.path[len("/blobs/") :]
        query = parse_qs(parts.query)
        expires = (query.get("e") or [""])[0]
        signature = (query.get("s") or [""])[0]
        if not owner.signer.check(relpath, expires, signature, time.time()):
            self._error(403)
            return
        path = owner.store.resolve(relpath)
        if path is None:
            self._error(404)
            return
        try:
            f = open(path, "rb")
        except OSError:
            self._error(404)
            return
        with owner.lock:
            owner.open_files[path] += 1
        started = time.monotonic()
        try:
            with f:
                self._send_file(f, relpath, body)
            logger.debug(
                f"registry cache: served {relpath} in {time.monotonic() - started:.3f}s"
                f" ({self.headers.get('Range') or 'whole'})"
            )
        finally:
            with owner.lock:
                owner.open_files[path] -= 1
                if not owner.open_files[path]:
                    del owner.open_files[path]

    def _send_file(self, f, relpath: str, body: bool) -> None:
        size = os.fstat(f.fileno()).st_size
        start, end = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            m = _RANGE.fullmatch(wanted.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # the last N bytes
                    start = max(size - int(m.group(2)), 0)
                if start > end or start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        algorithm, hexdigest = relpath.split("/")[1:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Docker-Content-Digest", f"{algorithm}:{hexdigest}")
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if not body:
            self.end_headers()
            return
        sock = self.connection
        # The copy runs on a blocking socket (the kernel's send timeout still frees a
        # thread a client stopped reading for): Python's timeout mode would select()
        # and take the GIL back for every socket buffer, which with mitmproxy's event
        # loop in the same process cut a warm ctr pull's blob speed about 3x (measured).
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_TIMEOUT)
        tls = isinstance(sock, ssl.SSLSocket)
        if not tls:
            # Headers and body leave in full segments (as nginx's tcp_nopush): without
            # the cork the small header segment waits for the client's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            self.end_headers()
            self.wfile.flush()
            if tls:
                sent = _send_tls(sock, f, start, end - start + 1)
            else:
                sent = _send_plain(sock, f, start, end - start + 1)
        finally:
            if not tls:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            sock.settimeout(IDLE_TIMEOUT)
        self.server.owner.served(sent)


def _send_plain(sock: socket.socket, f, offset: int, count: int) -> int:
    """sendfile() until done; a send timeout (the client stopped reading) ends it."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock.fileno(), f.fileno(), offset + sent, count - sent)
        except BlockingIOError:
            raise TimeoutError("client stopped reading") from None
        if n == 0:
            break  # the file shrank (removed and truncated by nobody we know)
        sent += n
    return sent


def _send_tls(sock: ssl.SSLSocket, f, offset: int, count: int) -> int:
    """sendfile cannot encrypt: large reads and writes instead (the GIL is released
    for both, and SSLSocket.sendfile would write 8 KiB at a time)."""
    f.seek(offset)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    sent = 0
    while sent < count:
        n = f.readinto(view[: min(len(buf), count - sent)])
        if not n:
            break
        sock.sendall(view[:n])
        sent += n
    return sent
