"""Talking to the upstream's token realm ourselves, so that its failures reach the
client as registry-style errors and its address is never taken from client input.
No mitmproxy imports here.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_TOKEN_RESPONSE = 1 << 20  # tokens are a few KiB; anything bigger is not a token

# Request headers a token request carries on; Host, cookies and forwarding headers don't.
FORWARDED_HEADERS = ("authorization", "content-type", "user-agent", "accept", "accept-language")


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
    """One HTTP/1.1 exchange, no redirects followed (blocking; run it in a thread)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RealmUnreachable(f"{url!r} is not an http(s) URL")
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=tls
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        conn.request(method, target, body=body, headers=dict(headers))
        resp = conn.getresponse()
        data = resp.read(MAX_TOKEN_RESPONSE + 1)
        if len(data) > MAX_TOKEN_RESPONSE:
            raise RealmUnreachable(f"{parts.hostname}: token response larger than 1 MiB")
        return Reply(resp.status, tuple(resp.getheaders()), data)
    except TimeoutError as e:
        raise RealmUnreachable(f"{parts.hostname}:{parts.port or ''}: timed out", True) from e
    except (OSError, http.client.HTTPException) as e:
        raise RealmUnreachable(f"{parts.hostname}:{parts.port or ''}: {e}") from e
    finally:
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
