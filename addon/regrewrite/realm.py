"""Talking to the upstream's token realm ourselves, so that its failures reach the
client as registry-style errors and its address is never taken from client input.
No mitmproxy imports here.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_TOKEN_RESPONSE = 1 << 20  # tokens are a few KiB; anything bigger is not a token

# Keep-alive connections to token services (and the blob cache's upstreams), reused so
# that a request costs one round trip rather than a TCP and TLS handshake each time.
IDLE_SECONDS = 15.0  # reuse an idle connection this long (servers drop them later)
MAX_IDLE = 16  # idle connections kept per service (the cache asks in parallel)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class RealmUnreachable(Exception):
    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


def fetch(
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    tls: ssl.SSLContext,
    timeout: float,
) -> Reply:
    """One HTTP/1.1 exchange, no redirects followed (blocking; run it in a thread).

    The connection is kept for the next exchange with the same service when the server
    allows; a kept one the server has meanwhile closed is replaced once, transparently.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RealmUnreachable(f"{url!r} is not an http(s) URL")
    key = (parts.scheme, parts.hostname, parts.port, tls if parts.scheme == "https" else None)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    where = parts.hostname + (f":{parts.port}" if parts.port else "")
    for attempt in range(2):
        conn = _take_idle(key) if attempt == 0 else None
        reused = conn is not None
        if conn is None:
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=timeout, context=tls
                )
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            resp = conn.getresponse()
            data = resp.read(MAX_TOKEN_RESPONSE + 1)
        except TimeoutError as e:
            conn.close()
            raise RealmUnreachable(f"{where}: timed out", True) from e
        except (ConnectionError, http.client.BadStatusLine) as e:
            conn.close()
            if reused:
                continue  # the server closed the kept connection: once more on a new one
            raise RealmUnreachable(f"{where}: {e}") from e
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RealmUnreachable(f"{where}: {e}") from e
        if len(data) > MAX_TOKEN_RESPONSE:
            conn.close()
            raise RealmUnreachable(f"{parts.hostname}: token response larger than 1 MiB")
        if resp.will_close or not resp.isclosed():
            conn.close()
        else:
            _keep_idle(key, conn)
        return Reply(resp.status, tuple(resp.getheaders()), data)
    raise AssertionError("unreachable")  # the second attempt always returns or raises


_idle: dict[tuple, list[tuple[float, http.client.HTTPConnection]]] = {}
_idle_lock = threading.Lock()


def _take_idle(key: tuple) -> http.client.HTTPConnection | None:
    now = time.monotonic()
    stale = []
    found = None
    with _idle_lock:
        conns = _idle.get(key, [])
        while conns:
            since, conn = conns.pop()
            if now - since < IDLE_SECONDS:
                found = conn
                break
            stale.append(conn)
    for conn in stale:
        conn.close()
    return found


def _keep_idle(key: tuple, conn: http.client.HTTPConnection) -> None:
    with _idle_lock:
        conns = _idle.setdefault(key, [])
        if len(conns) < MAX_IDLE:
            conns.append((time.monotonic(), conn))
            return
    conn.close()


def close_idle() -> None:
    """Close every kept connection (on shutdown, and in tests)."""
    with _idle_lock:
        conns = [conn for kept in _idle.values() for _, conn in kept]
        _idle.clear()
    for conn in conns:
        conn.close()


def tls_context(insecure: bool, ca_file: str | None, ca_dir: str | None) -> ssl.SSLContext:
    """Verify the realm the way mitmproxy verifies the upstream (same options)."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file or ca_dir:
        # Like mitmproxy, an explicit CA replaces the default trust store.
        return ssl.create_default_context(cafile=ca_file or None, capath=ca_dir or None)
    return ssl.create_default_context()
