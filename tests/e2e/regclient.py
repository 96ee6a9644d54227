"""A tiny registry HTTP client doing the Bearer token dance, for raw-protocol assertions.

Deliberately minimal and explicit: one request at a time, no redirects followed, every
exchange kept in `history` so tests can look at what was sent and received (status,
headers such as Location or WWW-Authenticate, bodies).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Response:
    method: str
    url: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split `Bearer realm="...",service="...",scope="..."` into scheme and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'([A-Za-z_]+)="([^"]*)"', rest))
    return scheme.lower(), params


@dataclass
class RegistryHTTP:
    """Talks to `base_url` (a registry or the proxy).

    `creds` are sent to the token realm with Basic auth; without them tokens are
    requested anonymously.  `ssl_context` (e.g. `TestCA.client_context()`) is used for
    the registry and the token realm alike.
    """

    base_url: str
    creds: tuple[str, str] | None = None
    ssl_context: ssl.SSLContext | None = None
    timeout: float = 30.0
    history: list[Response] = field(default_factory=list)
    _tokens: dict[tuple[str, ...], str] = field(default_factory=dict)

    def raw(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One request to an absolute URL, exactly as given (no token dance)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port, context=self.ssl_context, timeout=self.timeout
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target or "/", body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            response = Response(method, url, resp.status, resp.getheaders(), data)
        finally:
            conn.close()
        self.history.append(response)
        return response

    def fetch_token(self, challenge: dict[str, str], scopes: Sequence[str]) -> str:
        query = [("service", challenge.get("service", ""))]
        query += [("scope", s) for s in scopes]
        url = challenge["realm"] + "?" + urllib.parse.urlencode(query)
        headers = {}
        if self.creds is not None:
            basic = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        response = self.raw("GET", url, headers, None)
        if response.status != 200:
            raise PermissionError(f"token request failed: {response.status} {response.body!r}")
        data = response.json()
        return data.get("token") or data["access_token"]

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        scopes: Sequence[str] | None = None,
    ) -> Response:
        """Send a request; on a Bearer challenge get a token and retry once.

        `scopes` overrides the scope(s) named in the challenge (e.g. to ask for
        pull+push at once).  Tokens are cached per scope set.
        """
        url = path if "://" in path else self.base_url.rstrip("/") + path
        headers = dict(headers or {})
        key = tuple(scopes) if scopes else None
        if key and key in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[key]}"
        response = self.raw(method, url, headers, body)
        if response.status != 401:
            return response
        challenge = response.header("WWW-Authenticate")
        if not challenge:
            return response
        scheme, params = parse_challenge(challenge)
        if scheme != "bearer" or "realm" not in params:
            return response
        wanted = list(scopes) if scopes else params.get("scope", "").split()
        token = self.fetch_token(params, wanted)
        self._tokens[tuple(wanted)] = token
        headers["Authorization"] = f"Bearer {token}"
        return self.raw(method, url, headers, body)
