"""What the proxy does with each flow, decided before anything is changed.

The addon asks these functions for a whole decision (where a request goes, with which
path, query and credentials, or the registry error to answer with; which response
headers to rewrite and whether its body must be rewritten) and applies the answer in one
step. Every function here is pure: no mitmproxy imports, no I/O, no clocks, so a failure
can only happen before anything was applied, and the addon turns it into a refusal.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlencode

from . import api, auth
from .api import Origin
from .rules import Route, Rules, Unrouted

# How much of a request body the proxy reads when it answers the request itself (token
# forms, refusals), and how much of an upstream body it buffers to rewrite (tags/list,
# _catalog, errors; manifests kept for the content view). Past these the flow is failed
# with a registry error naming the cap; see addons/bodycap.py.
REQUEST_BODY_CAP = 64 << 10
RESPONSE_BODY_CAP = 4 << 20  # distribution's own manifest limit

WRITE_ACTIONS = frozenset({"push", "delete", "*"})
# What a request method does to a repository: only these read; DELETE deletes; any
# other method (PUT, POST, PATCH, and methods no registry knows) counts as a push.
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Refusal:
    """Answer the client with a registry-style JSON error; nothing goes upstream."""

    status: int
    code: str
    reason: str  # for the flow's comment and the log (never a secret)
    detail: Any = None
    client_name: str | None = None  # the repository the client asked for, if any

    @property
    def body(self) -> bytes:
        return api.registry_error(self.code, self.detail)


@dataclass(frozen=True)
class Forward:
    """Send the request upstream, fully mapped."""

    target: str  # path and query, as sent upstream
    registry: int  # index into Rules.upstreams
    stream: bool  # stream the request body (not when a manifest is kept for the view)
    drop_basic: bool  # the client's Basic credentials are not for this upstream
    comment: str
    client_name: str | None = None
    upstream_name: str | None = None
    mirror: str | None = None  # containerd's ?ns=, when the client is a mirror client


@dataclass(frozen=True)
class Ping:
    """``/v2/`` with several upstreams: the proxy answers it (one challenge for all)."""


@dataclass(frozen=True)
class TokenEndpoint:
    """The proxy's token endpoint: answered in the request hook, once the form is read."""


Decision = Refusal | Forward | Ping | TokenEndpoint


def endpoint_of(kind: str) -> str:
    """The metrics/access-log endpoint label for a RepositoryPath kind."""
    return {"blobs/uploads": "uploads", "tags/list": "tags"}.get(kind, kind)


def decide_request(
    rules: Rules,
    method: str,
    target: str,
    cursors: dict[str, str],
    keep_manifests: bool,
    content_length: str | None,
) -> tuple[str, Decision]:
    """(endpoint label, decision) for a client request whose target is ``target``."""
    path, query = api.split_target(target)
    if not target.isascii():
        # Raw bytes outside ASCII are not a valid request target (RFC 3986); mapping
        # part of one and forwarding the rest would be the half-rewrite we never do.
        return "other", Refusal(400, "UNSUPPORTED", "request target is not ASCII")
    if path == rules.token_path:
        if method not in ("GET", "POST"):
            return "token", Refusal(405, "UNSUPPORTED", "token endpoint takes GET or POST")
        if content_length is not None and content_length.isdigit():
            if int(content_length) > REQUEST_BODY_CAP:
                # Refused before the body is read (and before any 100 Continue).
                detail = {"limit": REQUEST_BODY_CAP}
                reason = f"token request body larger than {REQUEST_BODY_CAP} bytes"
                return "token", Refusal(413, "SIZE_INVALID", reason, detail)
        return "token", TokenEndpoint()
    if path in ("/v2/", "/v2"):
        if len(rules.upstreams) > 1:
            return "ping", Ping()
        return "ping", Forward(target, 0, True, False, "")
    if not path.startswith("/v2/"):
        # Not the registry API: under deny, nothing else of the upstream is exposed.
        if rules.unmatched == "deny":
            return "other", Refusal(404, "UNSUPPORTED", f"not a registry endpoint: {path}")
        return "other", Forward(target, 0, True, False, "")
    if api.is_catalog(path):
        return "catalog", _catalog(rules, path, query, cursors)
    repo = api.parse_repository_path(path)
    if repo is None:
        if rules.unmatched == "deny":
            return "other", Refusal(404, "UNSUPPORTED", f"unknown registry endpoint {path}")
        return "other", Forward(target, 0, True, False, "")
    endpoint = endpoint_of(repo.kind)
    # containerd as a mirror adds ?ns=<registry host>: names are that upstream's own.
    ns = api.query_value(query, "ns")
    mirror = rules.mirror(ns) if ns else None
    route = resolve(rules, repo.name, mirror)
    if isinstance(route, Refusal):
        return endpoint, replace(route, client_name=repo.name)
    code = repo.reference_error()
    if code is not None:
        detail = {"reference": repo.reference}
        return endpoint, Refusal(400, code, f"malformed {repo.kind} path", detail, repo.name)
    action = "pull" if method in _READ_METHODS else "delete" if method == "DELETE" else "push"
    if action not in route.actions:
        return endpoint, Refusal(
            403,
            "DENIED",
            f"{repo.name} is read-only here ({action} not allowed)",
            {"name": repo.name, "action": action},
            repo.name,
        )
    note = ""
    if repo.kind == "blobs/uploads" and api.query_value(query, "from") is not None:
        source = resolve(rules, api.query_value(query, "from") or "", mirror)
        if isinstance(source, Route) and source.registry == route.registry:
            query = api.replace_query_value(query, "from", source.name)
        else:
            # No mount from a source no rule maps, nor across upstreams: ask for a plain
            # upload, as a registry that cannot mount answers 202 (refusing the POST
            # fails containerd's push). The client's `from` never goes upstream.
            query = api.drop_query_values(query, ("mount", "from"))
            where = "another upstream" if isinstance(source, Route) else "outside the rules"
            note = f" · mount from {where} dropped"
    new_path = api.RepositoryPath(route.name, repo.endpoint).path()
    keep = (
        keep_manifests
        and repo.kind == "manifests"
        and content_length is not None
        and content_length.isdigit()
        and int(content_length) <= RESPONSE_BODY_CAP
    )
    upstream = rules.upstreams[route.registry]
    via = "" if route.registry == 0 else f" @{upstream.key}"
    comment = (
        f"{repo.name} → {route.name}{via} · {repo.kind} {method} {repo.reference}"
    ).rstrip() + note
    return endpoint, Forward(
        target=new_path + ("?" + query if query else ""),
        registry=route.registry,
        stream=not keep,
        drop_basic=credentials_mode(rules, route.registry) != "client",
        comment=comment,
        client_name=repo.name,
        upstream_name=route.name,
        mirror=ns if mirror is not None else None,
    )


def _catalog(rules: Rules, path: str, query: str, cursors: dict[str, str]) -> Decision:
    last = api.query_value(query, "last")
    if last:
        upstream_last = cursors.get(last) or rules.upstream_name(last)
        if upstream_last is None:
            return Refusal(400, "NAME_INVALID", f"unknown cursor {last!r}", {"last": last})
        query = api.replace_query_value(query, "last", upstream_last)
    return Forward(path + ("?" + query if query else ""), 0, True, False, "catalog")


# --- routing ------------------------------------------------------------------------


def resolve(rules: Rules, name: str, mirror: int | None = None) -> Route | Refusal:
    """Where a client name goes (``Rules.resolve``, the one routing function), or the
    registry error that refuses it."""
    found = rules.resolve(name, mirror)
    if isinstance(found, Unrouted):
        status = 400 if found.code == "NAME_INVALID" else 404
        return Refusal(status, found.code, found.reason, {"name": name})
    return found


def credentials_mode(rules: Rules, registry: int) -> str:
    """Whose credentials go to upstream ``registry``: the client's ("client"), none
    ("anonymous"), or the proxy's own account ("account")."""
    return rules.upstreams[registry].credentials.mode


# --- token requests -------------------------------------------------------------------


def token_upstream(rules: Rules, query: str, form: str) -> tuple[int, api.MapName]:
    """Which upstream a token request is for, and how its scope names map there.

    A client's scopes for one request name one upstream (a mount across upstreams is
    turned into an upload); scopes of other upstreams are dropped. The first scope asking
    to push decides, else the first scope; with none (``docker login``), the default
    upstream.
    """
    ns = api.query_value(query, "ns")
    mirror = rules.mirror(ns) if ns else None
    scopes = [
        (scope, route)
        for value in auth.form_values(query, "scope") + auth.form_values(form, "scope")
        for scope in auth.parse_scopes(value)
        if isinstance(route := resolve(rules, scope.name, mirror), Route)
    ]
    # A push names its target with push and a mount source with pull only.
    writes = [r for s, r in scopes if WRITE_ACTIONS & set(s.actions.split(","))]
    chosen = (writes or [r for _, r in scopes] or [None])[0]
    registry = chosen.registry if chosen is not None else (mirror or 0)

    def map_name(name: str) -> str | None:
        found = resolve(rules, name, mirror)
        return found.name if isinstance(found, Route) and found.registry == registry else None

    return registry, map_name


def allowed_actions(rules: Rules, mirror: int | None) -> auth.AllowActions:
    """The actions each client name may ask a token for (read-only rules drop writes)."""

    def allow(name: str) -> frozenset[str] | None:
        found = resolve(rules, name, mirror)
        return found.actions if isinstance(found, Route) else None

    return allow


@dataclass(frozen=True)
class TokenPlan:
    """One request to an upstream's token service, and how the flow will show it."""

    registry: int
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]  # holds credentials: never logged or shown
    body: bytes | None
    mapped: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    comment: str


# Request headers a token request carries on; Host, cookies and forwarding headers don't.
TOKEN_HEADERS = ("authorization", "content-type", "user-agent", "accept", "accept-language")


def plan_token(
    rules: Rules,
    method: str,
    query: str,
    form: str,
    client_headers: list[tuple[str, str]],
    upstream_realm: str,
    service: str | None,
    registry: int,
    map_name: api.MapName,
    account: str | None,
) -> TokenPlan:
    """The token request for the upstream realm: scopes mapped (and narrowed to what the
    rules allow), ``service`` set when there are several upstreams, credentials as the
    upstream's ``credentials`` mode says. ``account`` is the proxy's own Basic
    credentials for this upstream, when its mode is ``account``."""
    ns = api.query_value(query, "ns")
    mirror = rules.mirror(ns) if ns else None
    allow = allowed_actions(rules, mirror)
    mapped: list[tuple[str, str]] = []
    dropped: list[str] = []

    def map_scope(value: str) -> str | None:
        result = auth.map_scopes(value, map_name, allow)
        mapped.extend(result.mapped)
        dropped.extend(result.dropped)
        return result.value or None

    query = api.drop_query_values(auth.replace_form_values(query, "scope", map_scope), ("ns",))
    body = auth.replace_form_values(form, "scope", map_scope) if method == "POST" else None
    several = len(rules.upstreams) > 1
    mode = credentials_mode(rules, registry)
    headers = [(k, v) for k, v in client_headers if k.lower() in TOKEN_HEADERS]
    if mode != "client" and body is not None:
        # The client's grant (its password or refresh token) is not for this upstream:
        # ask with a plain GET, with the proxy's account or anonymously.
        scopes = auth.form_values(body, "scope")
        pairs = [("service", service)] if service else []
        pairs += [("scope", x) for x in scopes]
        query, body, method = urlencode(pairs, quote_via=quote), None, "GET"
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
    elif several and service:
        if body is not None:
            body = auth.set_form_value(body, "service", service)
        else:
            query = auth.set_form_value(query, "service", service)
    if mode != "client":
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        if account is not None:
            headers.append(("Authorization", account))
    url = upstream_realm + (("&" if "?" in upstream_realm else "?") + query if query else "")
    comment = [f"token: {len(mapped)} scope{'s' if len(mapped) != 1 else ''} mapped"]
    comment += [f"{a} → {b}" for a, b in mapped]
    if dropped:
        comment.append(f"dropped {' '.join(dropped)}")
    if registry != 0:
        comment.append(f"@{rules.upstreams[registry].key}")
    if mode != "client":
        comment.append("proxy's account" if account is not None else "anonymous")
    return TokenPlan(
        registry=registry,
        method=method,
        url=url,
        headers=tuple(headers),
        body=body.encode() if body is not None else None,
        mapped=tuple(mapped),
        dropped=tuple(dropped),
        comment=" · ".join(comment),
    )


# --- responses ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponsePlan:
    """How an upstream response reaches the client."""

    headers: tuple[tuple[str, tuple[str, ...]], ...]  # (name, new values) to set
    rewrite: str | None  # "catalog", "tags", "errors", "error-page", "redirect" (dropped)
    keep: bool  # buffer the body unchanged (a manifest kept for the content view)
    learned: tuple[tuple[str, str | None], ...]  # (realm, service) from challenges


def body_rewrite(method: str, status: int, path: str, content_type: str) -> str | None:
    """Which body rewrite a response needs, if any."""
    if method == "HEAD" or status in (204, 304) or status < 200:
        return None
    if status >= 400:
        # Not JSON (an HTML page, Go's "404 page not found", a gateway's text): nothing
        # parses it for names, so it is replaced, not passed on.
        return "errors" if "json" in content_type.lower() else "error-page"
    if 300 <= status < 400:
        # The courtesy link in a redirect's body is the Location before its rewrite.
        return "redirect"
    if not 200 <= status < 300:
        return None  # (any 2xx: a 201 or 203 tags/list or _catalog is no less a listing)
    if api.is_catalog(path):
        return "catalog"
    repo = api.parse_repository_path(path)
    return "tags" if repo is not None and repo.kind == "tags/list" else None


def plan_response(
    *,
    method: str,
    path: str,
    status: int,
    content_type: str,
    challenges: list[str],
    location: str | None,
    link: str | None,
    upstream: Origin,
    public: Origin,
    token_url: str,
    service: str | None,
    client_name: api.MapName,
    catalog_cursor: api.MapName,
    keep_manifest: bool,
    allow: auth.AllowActions | None = None,
) -> ResponsePlan:
    """Rewrite what names a repository or points back at the upstream.

    Raises ValueError for anything that cannot be rewritten with certainty (a challenge,
    Location or Link it cannot parse, a Location at the upstream that names a repository
    no rule maps back): the addon then fails the flow rather than pass it on as it is.
    """
    headers: list[tuple[str, tuple[str, ...]]] = []
    learned: list[tuple[str, str | None]] = []
    if challenges:
        out = []
        for value in challenges:
            rewritten = auth.rewrite_challenge(value, token_url, client_name, service, allow)
            if rewritten.realm:
                learned.append((rewritten.realm, rewritten.service))
            out.append(rewritten.header)
        headers.append(("WWW-Authenticate", tuple(out)))

    def rewrite(url: str) -> str:
        return api.rewrite_url(url, upstream, public, client_name, catalog_cursor)

    if location is not None:
        headers.append(("Location", (rewrite(location),)))
    if link is not None:
        headers.append(("Link", (api.rewrite_link(link, rewrite),)))
    rewrite_kind = body_rewrite(method, status, path, content_type)
    return ResponsePlan(
        headers=tuple(headers),
        rewrite=rewrite_kind,
        keep=keep_manifest and rewrite_kind is None,
        learned=tuple(learned),
    )


def decode_body(body: bytes, encoding: str, limit: int = RESPONSE_BODY_CAP) -> bytes:
    """A body's bytes without its Content-Encoding, never more than ``limit`` of them
    (a small gzip body can expand without bound). Raises ValueError past the limit or
    for an encoding it does not decode."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise ValueError(f"cannot rewrite a body with Content-Encoding {encoding!r}")
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ValueError(f"bad {encoding} body: {e}") from e
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"{encoding} body expands past the {limit}-byte cap")
    return out


# The registry error code for an upstream error whose own body is not passed on.
_CODE_BY_STATUS = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    429: "TOOMANYREQUESTS",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


def _replaced_error(status: int, why: str) -> bytes:
    return api.registry_error(
        _CODE_BY_STATUS.get(status, "UNKNOWN"),
        message=f"the upstream answered {status} with a body that {why} "
        "(not passed on: it could name upstream repositories)",
    )


def rewrite_body(
    kind: str, body: bytes, path: str, client_name: api.MapName, status: int = 0
) -> bytes:
    """The rewritten body; raises ValueError when it cannot be rewritten."""
    if kind == "error-page":
        if not body.strip():
            return body
        return _replaced_error(status, "is not JSON")
    if kind == "errors":
        # An empty error body names nothing (some registries send one with a JSON
        # Content-Type): nothing to rewrite, nothing to fail.
        if not body.strip():
            return body
        try:
            return api.rewrite_errors(body, client_name)
        except ValueError:
            # A gateway's JSON (problem+json, {"message": ...}) or a body mislabelled
            # JSON: no "errors" list to map, so replaced as a text one is. (Failing the
            # flow made a 404 or 429 a 502, which clients retry.)
            return _replaced_error(status, "is no registry error")
    if kind == "catalog":
        return api.rewrite_catalog(body, client_name)
    repo = api.parse_repository_path(path)
    if repo is None:
        raise ValueError(f"not a tags/list path: {path}")
    client = client_name(repo.name)
    if client is None:
        raise ValueError(f"{repo.name} maps back to no client name")
    return api.rewrite_tags_list(body, client)
