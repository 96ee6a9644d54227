"""Misbehaving peers and measuring tools for the fault, load and no-open-proxy tests.

Everything listens on 127.0.0.1 only, picks its port from the OS, runs its threads as
daemons and is bounded (connections, bytes, seconds).  Nothing here imports pytest.

- Recorder: a TCP listener that records every connection it gets (the "third host" the
  proxy must never reach).
- Silent: accepts connections, reads, never answers.
- Scripted: answers each connection with fixed bytes, then closes or resets it.
- FakeUpstream: a tiny plain-HTTP registry stand-in whose answers a test scripts.
- CuttingRelay: a TCP relay that can drop a connection after N bytes sent upstream.
- RestartableRegistry: a `Registry` that can be started again on the same port and
  with the same storage and HTTP secret (so upload URLs survive a restart).
- push_image / pull_image: the registry protocol with `regclient.RegistryHTTP`.
- rss: VmRSS/VmHWM of a process from /proc.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.e2e.images import ACCEPT_MANIFESTS, OCI_MANIFEST, OciImage, digest_of
from tests.e2e.regclient import RegistryHTTP, Response
from tests.e2e.upstream import LOOPBACK, Registry, serve_in_thread, stop_serving

MAX_CONNECTIONS = 1000  # per listener; beyond that connections are closed unrecorded
MAX_READ = 1 << 20  # bytes read per connection by the test listeners


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Listener:
    """Accept loop on 127.0.0.1; `handle(conn)` runs in a thread per connection."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.port = 0
        self.accepted = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                if self.accepted > MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._open.append(conn)
            threading.Thread(target=self._run, args=(conn, peer), daemon=True).start()

    def _run(self, conn: socket.socket, peer) -> None:
        try:
            self.handle(conn, peer)
        except OSError:
            pass

    def handle(self, conn: socket.socket, peer) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for conn in self._open:
                try:
                    conn.close()
                except OSError:
                    pass
            self._open.clear()


def _read_head(conn: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the end of an HTTP request head (or EOF/timeout), bounded."""
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_READ:
        try:
            chunk = conn.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


@dataclass(frozen=True)
class Recorded:
    peer: tuple[str, int]
    first_bytes: bytes


class Recorder(_Listener):
    """Records every connection (peer and first bytes, up to 2 s of waiting) and closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: list[Recorded] = []

    def handle(self, conn, peer) -> None:
        data = _read_head(conn, timeout=2.0)
        with self._lock:
            self.connections.append(Recorded(peer, data[:4096]))
        conn.close()


class Silent(_Listener):
    """Accepts connections and reads from them, but never answers (until stopped)."""

    def handle(self, conn, peer) -> None:
        conn.settimeout(0.5)
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                continue


class Scripted(_Listener):
    """Reads a request head, sends `reply`, then resets (`reset=True`) or closes."""

    def __init__(self, reply: bytes, *, reset: bool = True, linger: float = 0.2) -> None:
        super().__init__()
        self.reply = reply
        self.reset = reset
        self.linger = linger
        self.requests: list[bytes] = []

    def handle(self, conn, peer) -> None:
        head = _read_head(conn)
        with self._lock:
            self.requests.append(head[:4096])
        conn.sendall(self.reply)
        time.sleep(self.linger)  # let the bytes leave before the RST overtakes them
        if self.reset:
            _reset(conn)
        else:
            conn.close()


# --------------------------------------------------------------------------------------


Route = Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes]]


class FakeUpstream:
    """A plain-HTTP server on 127.0.0.1 answering `route(method, target, headers)`.

    Records (method, target, headers) of every request in `requests`.
    """

    def __init__(self, route: Route) -> None:
        self.route = route
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FakeUpstream:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, format, *args):  # noqa: A002
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(min(length, MAX_READ))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with owner._lock:
                    owner.requests.append((self.command, self.path, headers))
                status, out_headers, body = owner.route(self.command, self.path, headers)
                self.send_response(status)
                for k, v in out_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server((LOOPBACK, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        stop_serving(self._server, self._thread, timeout=5)


# --------------------------------------------------------------------------------------


class CuttingRelay(_Listener):
    """Relays TCP (TLS passes through untouched) from 127.0.0.1:port to `target_port`.

    `cut_after(n)` arms it: once `n` more bytes have gone towards the target (over all
    connections), the connection that crossed the line is reset on both sides and the
    relay disarms.  `sent_up` counts all bytes relayed towards the target.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.sent_up = 0
        self.cuts = 0
        self._cut_at: int | None = None

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._cut_at = self.sent_up + nbytes

    def handle(self, conn, peer) -> None:
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=10)
        except OSError:
            _reset(conn)
            return
        conn.setblocking(True)
        upstream.settimeout(None)
        conn.settimeout(None)
        pair = {conn: upstream, upstream: conn}
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is conn:
                        with self._lock:
                            self.sent_up += len(data)
                            cut = self._cut_at is not None and self.sent_up >= self._cut_at
                            if cut:
                                self._cut_at = None
                                self.cuts += 1
                        if cut:
                            return
                    pair[sock].sendall(data)
        except OSError:
            return
        finally:
            _reset(conn)
            _reset(upstream)


# --------------------------------------------------------------------------------------


class RestartableRegistry(Registry):
    """A private registry that `restart()`s on the same port, config and storage.

    The config file (port and HTTP secret included) is reused as written by `start()`,
    so upload session URLs handed out before a restart stay valid after it.
    """

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, timeout: float = 30.0) -> RestartableRegistry:
        assert self.port and self.config_path.exists(), "start() it first"
        self.stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger for a moment after the kill
            try:
                self._launch(["docker-registry", "serve", str(self.config_path)], env, 5)
                return self
            except Exception:
                self.stop()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


# --------------------------------------------------------------------------------------


def _blob_path(image: OciImage, digest: str):
    return image.layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def push_image(client: RegistryHTTP, repo: str, image: OciImage, tag: str | None = None) -> None:
    """Push `image` as `repo:tag` with monolithic uploads (POST, then PUT with the digest)."""
    scopes = [f"repository:{repo}:pull,push"]
    for digest in image.blob_digests:
        r = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", scopes=scopes)
        if r.status == 200:
            continue
        r = client.request("POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes)
        _expect(r, 202)
        location = r.header("Location") or ""
        if location.startswith("/"):
            location = client.base_url.rstrip("/") + location
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}digest={urllib.parse.quote(digest)}"
        data = _blob_path(image, digest).read_bytes()
        r = client.request(
            "PUT",
            url,
            headers={"Content-Type": "application/octet-stream"},
            body=data,
            scopes=scopes,
        )
        _expect(r, 201)
    r = client.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag or image.tag}",
        headers={"Content-Type": OCI_MANIFEST},
        body=image.manifest_bytes,
        scopes=scopes,
    )
    _expect(r, 201)
    if r.header("Docker-Content-Digest") not in (None, image.digest):
        raise AssertionError(
            f"pushed {image.digest}, registry says {r.header('Docker-Content-Digest')}"
        )


def pull_image(client: RegistryHTTP, repo: str, reference: str) -> tuple[str, int]:
    """GET the manifest and every blob it names, verifying each digest over the bytes.

    Returns (manifest digest, number of requests made including token fetches).
    """
    before = len(client.history)
    scopes = [f"repository:{repo}:pull"]
    r = client.request(
        "GET",
        f"/v2/{repo}/manifests/{reference}",
        headers={"Accept": ACCEPT_MANIFESTS},
        scopes=scopes,
    )
    _expect(r, 200)
    digest = digest_of(r.body)
    if reference.startswith("sha256:") and digest != reference:
        raise AssertionError(f"manifest {repo}@{reference} has digest {digest}")
    manifest = r.json()
    for desc in [manifest["config"], *manifest["layers"]]:
        b = client.request("GET", f"/v2/{repo}/blobs/{desc['digest']}", scopes=scopes)
        _expect(b, 200)
        if digest_of(b.body) != desc["digest"] or len(b.body) != desc["size"]:
            raise AssertionError(f"blob {desc['digest']} of {repo} arrived corrupted")
    return digest, len(client.history) - before


def _expect(r: Response, status: int) -> None:
    if r.status != status:
        raise AssertionError(
            f"{r.method} {r.url} -> {r.status} (wanted {status}): {r.body[:300]!r}"
        )


# --------------------------------------------------------------------------------------


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            m = re.match(r"(VmRSS|VmHWM):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_http(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything read until EOF/timeout."""
    out = b""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while len(out) < MAX_READ and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    return out


def parse_raw_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of the first response in `data`."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        return 0, {}, data
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body
