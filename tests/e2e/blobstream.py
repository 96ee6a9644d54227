"""Move big blobs through a registry (or the proxy) without holding them in memory.

Used by the streaming-memory end-to-end test and by the benchmark in bench/: blob data is
generated into a file, uploaded from it (POST + monolithic PUT, the body read from the
file in 1 MiB blocks) and downloaded into a sha256 (nothing kept), and the peak RSS of a
process is read from /proc.  Nothing here imports pytest.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

BLOCK = 1 << 20  # read/write/hash block
MiB = 1 << 20


def make_blob_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` in 1 MiB blocks; return the blob's digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            block = os.urandom(min(BLOCK, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    return "sha256:" + h.hexdigest()


def peak_rss(pid: int) -> int:
    """The peak resident set size (VmHWM) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def current_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Transfer:
    bytes: int
    seconds: float
    digest: str

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


class RegistryError(RuntimeError):
    pass


class BlobClient:
    """One keep-alive connection to `base_url` (http or https), Bearer `token` attached.

    Request targets that come back in `Location` are sent to this same base URL (path
    and query only), so an upload session opened through a proxy stays on the proxy.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
        timeout: float = 120.0,
    ):
        parts = urllib.parse.urlsplit(base_url)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.ssl_context = ssl_context
        self.token = token
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.scheme == "https":
                self.conn = http.client.HTTPSConnection(
                    self.host,
                    self.port,
                    context=self.ssl_context,
                    timeout=self.timeout,
                    blocksize=BLOCK,
                )
            else:
                self.conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout, blocksize=BLOCK
                )
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, target: str, *, headers=None, body=None):
        """One request on the keep-alive connection; returns (response, body bytes).

        For small responses only; blobs go through `download`/`upload`.
        """
        reused = self.conn is not None
        conn = self._connection()
        try:
            conn.request(method, target, body=body, headers=self._headers(headers))
            resp = conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            self.close()
            if not reused or (body is not None and not isinstance(body, bytes)):
                raise
            # The server closed an idle keep-alive connection just as we reused it.
            return self.request(method, target, headers=headers, body=body)
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp, data

    def download(self, name: str, digest: str, size: int | None = None) -> Transfer:
        """GET a blob, hashing it block by block; raises unless the digest matches."""
        conn = self._connection()
        start = time.perf_counter()
        conn.request("GET", f"/v2/{name}/blobs/{digest}", headers=self._headers())
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read(64 * 1024)
            self.close()
            raise RegistryError(f"GET blob {name}@{digest}: {resp.status} {body[:500]!r}")
        h = hashlib.sha256()
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        total = 0
        while True:
            n = resp.readinto(view)
            if not n:
                break
            h.update(view[:n])
            total += n
        seconds = time.perf_counter() - start
        if resp.will_close:
            self.close()
        got = "sha256:" + h.hexdigest()
        if got != digest or (size is not None and total != size):
            raise RegistryError(f"downloaded {total} bytes with digest {got}, wanted {digest}")
        return Transfer(total, seconds, got)

    def upload(self, name: str, path: Path, digest: str) -> Transfer:
        """POST an upload session, then PUT the whole file as one monolithic body."""
        size = path.stat().st_size
        start = time.perf_counter()
        resp, body = self.request(
            "POST", f"/v2/{name}/blobs/uploads/", headers={"Content-Length": "0"}
        )
        if resp.status != 202:
            raise RegistryError(f"POST upload {name}: {resp.status} {body[:500]!r}")
        location = resp.getheader("Location") or ""
        loc = urllib.parse.urlsplit(location)
        query = loc.query + ("&" if loc.query else "") + urllib.parse.urlencode({"digest": digest})
        target = f"{loc.path}?{query}"
        conn = self._connection()
        headers = self._headers(
            {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        )
        with open(path, "rb") as f:
            conn.request("PUT", target, body=f, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        seconds = time.perf_counter() - start
        if resp.will_close:
            self.close()
        if resp.status != 201:
            raise RegistryError(f"PUT upload {name}: {resp.status} {body[:500]!r}")
        got = resp.getheader("Docker-Content-Digest")
        if got != digest:
            raise RegistryError(f"registry stored {got}, wanted {digest}")
        return Transfer(size, seconds, digest)


def fetch_token(
    token_url: str,
    scopes: list[str],
    *,
    service: str,
    creds: tuple[str, str] | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float = 30.0,
) -> str:
    """A Bearer token from a token endpoint (the real realm or the proxy's)."""
    parts = urllib.parse.urlsplit(token_url)
    query = urllib.parse.urlencode([("service", service)] + [("scope", s) for s in scopes])
    headers = {}
    if creds is not None:
        basic = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, context=ssl_context, timeout=timeout
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", f"{parts.path}?{query}", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RegistryError(f"token {token_url}: {resp.status} {body[:500]!r}")
    data = json.loads(body)
    return data.get("token") or data["access_token"]
