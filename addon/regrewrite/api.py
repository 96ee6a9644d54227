"""Where the registry HTTP API (distribution spec, /v2/) carries repository names:
request paths and query parameters, ``Location`` and ``Link`` headers, the JSON of
tags/list, _catalog and errors. No mitmproxy imports here.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# Maps a repository name from one side to the other; None: it has no name there.
MapName = Callable[[str], str | None]

# The endpoints that follow a repository name. The name is the shortest prefix that
# leaves one of them, so a name may itself contain "blobs" or "manifests".
_REPOSITORY_PATH = re.compile(
    r"/v2/(?P<name>.+?)(?P<endpoint>/(?:manifests/[^/]+|blobs/uploads/[^/]*|blobs/[^/]+"
    r"|tags/list|referrers/[^/]+))"
)


@dataclass(frozen=True)
class RepositoryPath:
    name: str
    endpoint: str  # "/manifests/latest", "/blobs/uploads/", "/tags/list", ...

    @functools.cached_property
    def kind(self) -> str:
        """manifests, blobs/uploads, blobs, tags/list or referrers."""
        part = self.endpoint[1:]
        if part.startswith("blobs/uploads/"):
            return "blobs/uploads"
        return part.split("/", 1)[0] if part != "tags/list" else "tags/list"

    @property
    def reference(self) -> str:
        """The tag, digest or upload id after the endpoint, if any."""
        return "" if self.kind == "tags/list" else self.endpoint.rsplit("/", 1)[1]

    def path(self) -> str:
        return f"/v2/{self.name}{self.endpoint}"

    def reference_error(self) -> str | None:
        """The registry error code when the tag, digest or upload id is malformed."""
        kind, ref = self.kind, self.reference
        if kind == "manifests" and not (TAG.fullmatch(ref) or DIGEST.fullmatch(ref)):
            return "MANIFEST_INVALID" if ":" in ref else "TAG_INVALID"
        if kind in ("blobs", "referrers") and not DIGEST.fullmatch(ref):
            return "DIGEST_INVALID"
        if kind == "blobs/uploads" and ref and not UPLOAD_ID.fullmatch(ref):
            return "BLOB_UPLOAD_INVALID"
        return None


# distribution/reference and the OCI distribution spec.
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
UPLOAD_ID = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]*")


@functools.lru_cache(maxsize=4096)  # each flow's path is parsed in several hooks
def parse_repository_path(path: str) -> RepositoryPath | None:
    """Split a request path (without query) into repository name and endpoint.

    ``/v2/``, ``/v2/_catalog`` and anything that is not a repository endpoint give None.
    """
    m = _REPOSITORY_PATH.fullmatch(path)
    if m is None:
        return None
    return RepositoryPath(m.group("name"), m.group("endpoint"))


def is_catalog(path: str) -> bool:
    return path == "/v2/_catalog"


def split_target(target: str) -> tuple[str, str]:
    """Split a request target into path and query (without the '?')."""
    path, _, query = target.partition("?")
    return path, query


# --- query parameters -----------------------------------------------------------------


def query_value(query: str, key: str) -> str | None:
    for pair in query.split("&"):
        k, sep, v = pair.partition("=")
        if unquote(k) == key:
            return unquote(v.replace("+", " "))
    return None


def replace_query_value(query: str, key: str, value: str) -> str:
    """Replace ``key``'s value, keeping every other pair's exact bytes."""
    out = []
    for pair in query.split("&"):
        k, sep, _ = pair.partition("=")
        out.append(f"{k}={quote(value, safe='')}" if unquote(k) == key else pair)
    return "&".join(out)


def drop_query_values(query: str, keys: tuple[str, ...]) -> str:
    """The query without the given keys, every other pair's bytes kept."""
    return "&".join(
        pair for pair in query.split("&") if pair and unquote(pair.partition("=")[0]) not in keys
    )


# --- Location and Link ----------------------------------------------------------------


_HOST = re.compile(r"[a-z0-9_.-]+|[0-9a-f:.]+")  # a DNS name or IPv4, or an IPv6 literal


class Origin(NamedTuple):
    # A tuple, not a dataclass: flows keep it in their metadata, and mitmproxy's flow
    # files (mitmweb's Save, mitmdump -w) hold only plain values.
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        default = {"http": 80, "https": 443}.get(self.scheme)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname.lower()
        if not _HOST.fullmatch(host):
            # urlsplit takes any text as a host ("upstream.test<"): such a URL is not at
            # another host to pass on untouched, it is one nobody can place.
            raise ValueError(f"{url!r}: invalid host {host!r}")
        return cls(parts.scheme, host, port)


def rewrite_url(
    url: str,
    upstream: Origin,
    public: Origin,
    map_name: MapName,
    map_catalog_last: MapName | None = None,
) -> str:
    """Turn a URL the upstream sent (Location, Link) into the one the client must use.

    Relative URLs and absolute ones at the upstream get their repository name mapped
    (and point at the proxy); a URL at any other host (a redirect to blob storage)
    is left exactly as it is. Raises ValueError for a URL it cannot parse, and for one
    at the upstream naming a repository that maps back to no client name: passing either
    on could hand the client an upstream name.
    """
    parts = urlsplit(url)  # raises ValueError for a malformed netloc
    if parts.netloc:
        origin = Origin.parse(url)
        if origin != upstream and not _same_upstream(origin, upstream):
            return url
    path, query = parts.path, parts.query
    repo = parse_repository_path(path)
    if repo is not None:
        name = map_name(repo.name)
        if name is None:
            raise ValueError(f"{url!r} names {repo.name}, which maps back to no client name")
        path = RepositoryPath(name, repo.endpoint).path()
    elif is_catalog(path) and map_catalog_last is not None:
        last = query_value(query, "last")
        if last is not None:
            new_last = map_catalog_last(last)
            if new_last is not None:
                query = replace_query_value(query, "last", new_last)
    if not parts.netloc:
        return urlunsplit(("", "", path, query, parts.fragment))
    return urlunsplit((public.scheme, public.netloc, path, query, parts.fragment))


def _same_upstream(origin: Origin, upstream: Origin) -> bool:
    """The upstream under the other scheme: behind a TLS-terminating balancer a registry
    builds http:// URLs for itself (same port, or the scheme's default one). Passed on,
    such a Location sent the client around the proxy, under the upstream's names."""
    return (
        origin.host == upstream.host
        and origin.scheme != upstream.scheme
        and (
            origin.port == upstream.port or origin.port == (80 if origin.scheme == "http" else 443)
        )
    )


_LINK = re.compile(r"\s*<(?P<url>[^>]*)>(?P<params>[^,]*(?:\"[^\"]*\"[^,]*)*)")


def rewrite_link(header: str, rewrite: Callable[[str], str]) -> str:
    """Rewrite the URL of each ``<url>; rel=...`` entry of a Link header."""
    out = []
    pos = 0
    while pos < len(header):
        m = _LINK.match(header, pos)
        if m is None:
            raise ValueError(f"cannot parse Link header {header[:200]!r}")
        out.append(f"<{rewrite(m.group('url'))}>{m.group('params')}")
        pos = m.end()
        while pos < len(header) and header[pos] in ", ":
            pos += 1
    return ", ".join(out)


# --- JSON bodies ----------------------------------------------------------------------


# The rewriters below raise ValueError for a body they cannot rewrite with certainty
# (not JSON, not the expected shape); the addon then answers 502 instead of passing it.


def _json_object(body: bytes) -> dict:
    doc = json.loads(body)  # ValueError (JSONDecodeError, UnicodeDecodeError) if not JSON
    if not isinstance(doc, dict):
        raise ValueError("the body is not a JSON object")
    return doc


def rewrite_tags_list(body: bytes, client_name: str) -> bytes:
    """tags/list names the repository: the client must see the name it asked for."""
    doc = _json_object(body)
    if "name" in doc:
        doc["name"] = client_name
    return json.dumps(doc).encode()


def rewrite_catalog(body: bytes, map_name: MapName) -> bytes:
    """Map _catalog's repositories to client names, dropping those with none."""
    doc = _json_object(body)
    repositories = doc.get("repositories")
    if not isinstance(repositories, list):
        raise ValueError("_catalog body has no 'repositories' list")
    doc["repositories"] = [
        client
        for client in (map_name(n) if isinstance(n, str) else None for n in repositories)
        if client is not None
    ]
    return json.dumps(doc).encode()


def rewrite_errors(body: bytes, map_name: MapName) -> bytes:
    """Map repository names in the ``detail`` of a registry JSON error; a name that maps
    back to no client name is left out."""
    doc = _json_object(body)
    if not isinstance(doc.get("errors"), list):
        raise ValueError("the JSON error body has no 'errors' list")
    for error in doc["errors"]:
        if isinstance(error, dict) and "detail" in error:
            error["detail"] = _map_detail(error["detail"], map_name)
    return json.dumps(doc).encode()


def _map_detail(detail, map_name: MapName):
    # distribution puts names under "name" (NAME_UNKNOWN) and "Name" (access lists).
    if isinstance(detail, list):
        return [_map_detail(d, map_name) for d in detail]
    if isinstance(detail, dict):
        out = {}
        for key, value in detail.items():
            if key.lower() == "name" and isinstance(value, str):
                client = map_name(value)
                if client is not None:
                    out[key] = client
            else:
                out[key] = _map_detail(value, map_name)
        return out
    return detail


ERROR_MESSAGES = {
    "NAME_UNKNOWN": "repository name not known to registry",
    "NAME_INVALID": "invalid repository name",
    "DENIED": "requested access to the resource is denied",
    "UNAVAILABLE": "the upstream registry or token service cannot be reached",
    "UNKNOWN": "unknown error",
    "UNSUPPORTED": "the operation is unsupported",
    "TAG_INVALID": "manifest tag did not match URI",
    "MANIFEST_INVALID": "manifest invalid",
    "DIGEST_INVALID": "provided digest did not match uploaded content",
    "BLOB_UPLOAD_INVALID": "blob upload invalid",
    "SIZE_INVALID": "the body is larger than this proxy accepts",
}

# The headers of every JSON answer the proxy makes itself.
JSON_HEADERS = {
    "Content-Type": "application/json",
    "Docker-Distribution-API-Version": "registry/2.0",
}


def registry_error(code: str, detail=None, message: str | None = None) -> bytes:
    """A body in the shape every registry client parses (distribution spec, errors)."""
    error = {"code": code, "message": message or ERROR_MESSAGES.get(code, code.lower())}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()
