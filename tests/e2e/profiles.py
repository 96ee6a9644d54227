"""Hosted registries' quirks, reproduced by a small front before the real registry.

`Front(profile, ca, registry, token_server)` listens on 127.0.0.1 (TLS from the test CA)
and passes every request to the real `docker-registry` of the e2e session, then bends the
exchange the way one hosted registry does: its token realm (on the front itself or on a
listener of its own, "another host"), its `service`, its challenge scopes, blob redirects
to a storage listener with a signed query, rate-limit headers, relative `Location`s, big
headers, or no Bearer flow at all (ECR). The front's own token endpoint records what it
got (`token_requests`) and asks the session's TokenServer for the real token (with the
registry's service, so distribution accepts it). Nothing here imports pytest.

Each profile's docstring-style `sources` name the public threads and docs its behaviour
comes from; README "Upstream recipes" repeats them.

Listeners are threaded, bounded (bodies are streamed, never held), loopback only, and
stopped by `stop()`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.e2e.upstream import (
    LOOPBACK,
    Registry,
    TestCA,
    TokenServer,
    serve_in_thread,
    stop_serving,
)

CHUNK = 64 << 10
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}
_BLOB_GET = re.compile(r"^/v2/(?P<name>.+?)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/")
# Whose manifest GET/HEAD a rate-limited profile refuses with 429 (see Profile.rate_limit).
RATE_LIMITED_MARK = "ratelimited"


@dataclass(frozen=True)
class Profile:
    key: str
    title: str
    sources: tuple[str, ...]
    service: str | None  # the service its challenges name
    realm_path: str  # where its token service listens
    realm_on_other_host: bool = False  # the realm is on a listener of its own
    ping_service: bool = True  # False: the /v2/ challenge has no service (Artifact Registry)
    ping_scope: str | None = None  # a placeholder scope in the /v2/ challenge (ghcr.io)
    basic_only: bool = False  # ECR: Basic challenge, text/plain body, no token service
    basic_realm: str = ""
    redirect_status: int | None = None  # blob GETs answered with this redirect
    redirect_scheme: str = "https"  # of the storage host
    redirect_style: str = ""  # "cloudflare", "sas", "cloudfront", "oss"
    redirect_headers: tuple[tuple[str, str], ...] = ()
    rate_limit: bool = False  # Docker Hub's RateLimit-* headers, 429 for RATE_LIMITED_MARK
    relative_location: bool = False  # Location headers without scheme and host
    big_headers: int = 0  # bytes of extra response headers on every answer
    deny_anonymous_write: bool = False  # anonymous push/delete/* scopes: 403 DENIED
    azure_actions: bool = False  # metadata_read for tags/list, delete for DELETE
    oauth: bool = True  # the token service takes OAuth2 POSTs


ACR_SERVICE = "registry.aliyuncs.com:cn-shenzhen:26842"

PROFILES: dict[str, Profile] = {
    p.key: p
    for p in (
        Profile(
            key="acr",
            title="Alibaba Cloud ACR",
            sources=(
                # Registry, auth service and time-limited OSS URLs as three parties:
                "https://www.alibabacloud.com/blog/reverse-proxy-to-access-alibaba-cloud-container-registry_597957",
                # The OSS redirect's query: Expires, OSSAccessKeyId, Signature:
                "https://github.com/distribution/distribution/issues/1300",
                # Aliyun mirrors send image layers over plain http:
                "https://github.com/dragonflyoss/dragonfly-archived/pull/523",
                # BuildKit (containerd's logic) POSTs OAuth2 first, falls back to GET:
                "https://github.com/moby/buildkit/pull/2553",
            ),
            service=ACR_SERVICE,
            realm_path="/auth",  # https://dockerauth.cn-hangzhou.aliyuncs.com/auth
            realm_on_other_host=True,
            redirect_status=307,
            redirect_scheme="http",
            redirect_style="oss",
        ),
        Profile(
            key="hub",
            title="Docker Hub",
            sources=(
                # realm auth.docker.io/token, service registry.docker.io, RateLimit headers:
                "https://gist.github.com/jeversol/369009aaad4cd2cd8e2610fa68d4c4be",
                "https://github.com/docker/hub-feedback/issues/2464",
                # 429 toomanyrequests (registry-1.docker.io, manifests):
                "https://github.com/docker/docs/issues/21908",
                "https://github.com/docker/docs/pull/22916",
                # blobs come from production.cloudflare.docker.com (a CDN, signed URLs):
                "https://github.com/docker/hub-feedback/issues/2218",
                "https://github.com/huangzheng2016/TheOnlyMirror/pull/5",
            ),
            service="registry.docker.io",
            realm_path="/token",
            realm_on_other_host=True,
            redirect_status=307,
            redirect_style="cloudflare",
            rate_limit=True,
        ),
        Profile(
            key="ghcr",
            title="GitHub ghcr.io",
            sources=(
                # /v2/ challenge with the placeholder scope repository:user/image:pull;
                # anonymous tokens for it are denied:
                "https://toddysm.com/2024/02/12/authenticating-with-oci-registries-github-container-registry-ghcr-implementation",
                "https://iz6.ru/kak-poluchit-token-api-dlja-github-container-registry",
                # 403 DENIED on the token request (skopeo: "Requesting bearer token: 403"):
                "https://github.com/mccutchen/go-httpbin/issues/223",
                # blobs redirected to pkg-containers.githubusercontent.com:
                "https://github.com/scarf-sh/gateway/pull/35",
            ),
            service="ghcr.io",
            realm_path="/token",
            ping_scope="repository:user/image:pull",
            redirect_status=307,
            redirect_style="sas",
            deny_anonymous_write=True,
        ),
        Profile(
            key="quay",
            title="Red Hat quay.io",
            sources=(
                # realm /v2/auth on quay.io itself:
                "https://github.com/rpardini/docker-registry-proxy/issues/5",
                # 302 FOUND to a signed CloudFront URL, Cache-Control: max-age=31536000:
                "https://github.com/rpardini/docker-registry-proxy/issues/26",
                "https://github.com/rpardini/docker-registry-proxy/pull/33",
            ),
            service="quay.io",
            realm_path="/v2/auth",
            redirect_status=302,
            redirect_style="cloudfront",
            redirect_headers=(("Cache-Control", "max-age=31536000"),),
        ),
        Profile(
            key="gar",
            title="Google Artifact Registry / gcr.io",
            sources=(
                # /v2/ challenge: realm only, no service; repository challenges name one:
                "https://github.com/apple/container/issues/2274",
                "https://github.com/apple/containerization/pull/901",
                "https://github.com/oras-project/oras/issues/157",
            ),
            service="us-docker.pkg.dev",
            realm_path="/v2/token",
            ping_service=False,
            relative_location=True,
            big_headers=24 << 10,
        ),
        Profile(
            key="azure",
            title="Azure Container Registry",
            sources=(
                # realm https://<name>.azurecr.io/oauth2/token, service <name>.azurecr.io:
                "https://azure.github.io/acr/Token-BasicAuth.html",
                "https://learn.microsoft.com/en-us/rest/api/containerregistry/access-tokens/get-from-login",
                # metadata_read in the challenge's access detail:
                "https://github.com/Azure/acr/issues/676",
            ),
            service="contoso.azurecr.io",
            realm_path="/oauth2/token",
            azure_actions=True,
        ),
        Profile(
            key="ecr",
            title="AWS ECR",
            sources=(
                # 401 Www-Authenticate: Basic realm="https://<id>.dkr.ecr.<region>.amazonaws.com/",
                # service="ecr.amazonaws.com", body "Not Authorized":
                "https://wom.icu/today-i-learned/2023-09-11",
                # docker login --username AWS, the password is Basic auth for the registry:
                "https://docs.aws.amazon.com/AmazonECR/latest/userguide/registry_auth.html",
            ),
            service=None,
            realm_path="",
            basic_only=True,
        ),
    )
}


@dataclass(frozen=True)
class FrontRequest:
    """A request the front's registry listener got (as the hosted registry would see it)."""

    method: str
    path: str
    query: str
    auth: str  # scheme of the Authorization header ("Bearer", "Basic") or ""
    status: int


@dataclass(frozen=True)
class FrontTokenRequest:
    method: str
    path: str
    raw: str  # the query (GET) or form (POST) exactly as received, secrets blanked
    service: str | None
    scopes: tuple[str, ...]
    account: str | None
    grant_type: str | None
    client_id: str | None
    user: str | None  # Basic username or the form's username; never a password
    status: int


@dataclass(frozen=True)
class StorageRequest:
    method: str
    path: str
    query: str
    authorization: bool  # the request carried an Authorization header
    status: int


@dataclass
class _Ticket:
    registry_path: str
    authorization: str | None
    expires: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, front: Front, role: str, tls: ssl.SSLContext | None):
        self.front = front
        self.role = role
        self.tls = tls
        super().__init__((LOOPBACK, 0), _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is None:
            return sock, addr
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - base class signature
        pass

    def _any(self):
        front, role = self.server.front, self.server.role
        try:
            if role == "storage":
                front._storage(self)
            elif role == "auth" or (
                not front.profile.basic_only
                and urllib.parse.urlsplit(self.path).path == front.profile.realm_path
            ):
                front._token(self)
            else:
                front._registry(self)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any


class Front:
    """One hosted registry's behaviour before the session's real registry."""

    def __init__(
        self, profile: Profile, ca: TestCA, registry: Registry, token_server: TokenServer
    ) -> None:
        self.profile = profile
        self.ca = ca
        self.registry = registry
        self.token_server = token_server
        self.secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self.requests: list[FrontRequest] = []
        self.token_requests: list[FrontTokenRequest] = []
        self.storage_requests: list[StorageRequest] = []
        self.redirects: list[str] = []  # every Location the registry host redirected to
        self._tickets: dict[str, _Ticket] = {}
        self._servers: list[tuple[_Server, threading.Thread]] = []
        self.port = self.auth_port = self.storage_port = 0

    # -- addresses --------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def realm(self) -> str:
        port = self.auth_port if self.profile.realm_on_other_host else self.port
        return f"https://{LOOPBACK}:{port}{self.profile.realm_path}"

    @property
    def storage_url(self) -> str:
        return f"{self.profile.redirect_scheme}://{LOOPBACK}:{self.storage_port}"

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Front:
        tls = self.ca.server_context()
        self.port = self._listen("registry", tls)
        if self.profile.realm_on_other_host:
            self.auth_port = self._listen("auth", tls)
        if self.profile.redirect_status:
            storage_tls = tls if self.profile.redirect_scheme == "https" else None
            self.storage_port = self._listen("storage", storage_tls)
        return self

    def _listen(self, role: str, tls: ssl.SSLContext | None) -> int:
        server = _Server(self, role, tls)
        self._servers.append((server, serve_in_thread(server)))
        return server.server_address[1]

    def stop(self) -> None:
        for server, thread in self._servers:
            stop_serving(server, thread, timeout=5)
        self._servers.clear()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.token_requests.clear()
            self.storage_requests.clear()
            self.redirects.clear()

    # -- what was seen ----------------------------------------------------------------

    def names_seen(self) -> set[str]:
        """Repository names in the paths of requests that reached the front."""
        names = set()
        with self._lock:
            for r in self.requests:
                m = _REPO_PATH.match(r.path)
                if m:
                    names.add(m.group("name"))
                for value in urllib.parse.parse_qs(r.query).get("from", []):
                    names.add(value)
        return names

    def token_scopes(self) -> list[str]:
        with self._lock:
            return [s for r in self.token_requests for s in r.scopes]

    # -- the registry host ------------------------------------------------------------

    def _record(self, h: _Handler, status: int) -> None:
        parts = urllib.parse.urlsplit(h.path)
        auth = (h.headers.get("Authorization") or "").split(" ", 1)[0]
        with self._lock:
            self.requests.append(FrontRequest(h.command, parts.path, parts.query, auth, status))

    def _registry(self, h: _Handler) -> None:
        p = self.profile
        path = urllib.parse.urlsplit(h.path).path
        headers = [(k, v) for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP]
        if p.basic_only:
            authorization = self._basic_to_bearer(h, path)
            if authorization is None:
                _drain(h)
                self._record(h, 401)
                return self._answer(
                    h,
                    401,
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Docker-Distribution-Api-Version", "registry/2.0"),
                        (
                            "Www-Authenticate",
                            f'Basic realm="{self.url}/",service="ecr.amazonaws.com"',
                        ),
                    ],
                    b"Not Authorized\n",
                )
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
            headers.append(("Authorization", authorization))
        repo = _REPO_PATH.match(path)
        if (
            p.rate_limit
            and repo is not None
            and repo.group("kind") == "manifests"
            and RATE_LIMITED_MARK in repo.group("name")
            and (h.headers.get("Authorization") or "").lower().startswith("bearer ")
        ):
            _drain(h)
            self._record(h, 429)
            body = json.dumps(
                {
                    "errors": [
                        {
                            "code": "TOOMANYREQUESTS",
                            "message": "You have reached your pull rate limit. You may "
                            "increase the limit by authenticating and upgrading: "
                            "https://www.docker.com/increase-rate-limit",
                        }
                    ]
                }
            ).encode()
            return self._answer(
                h,
                429,
                [
                    ("Content-Type", "application/json"),
                    ("Retry-After", "3600"),
                    *self._rate_limit_headers(0),
                ],
                b"" if h.command == "HEAD" else body,
            )
        conn, resp = self._upstream(h, headers)
        try:
            status = resp.status
            blob = _BLOB_GET.match(path)
            if p.redirect_status and h.command == "GET" and status == 200 and blob:
                self._record(h, p.redirect_status)
                location = self._sign(h.path, blob.group("digest"), h.headers.get("Authorization"))
                body = b"<a href='redirect'>Temporary Redirect</a>.\n"
                return self._answer(
                    h,
                    p.redirect_status,
                    [
                        ("Content-Type", "text/html; charset=utf-8"),
                        ("Location", location),
                        ("Docker-Distribution-Api-Version", "registry/2.0"),
                        *p.redirect_headers,
                    ],
                    body,
                )
            out = []
            for k, v in resp.getheaders():
                lk = k.lower()
                if lk in _HOP_BY_HOP or lk == "content-length":
                    continue
                if lk == "www-authenticate" and not p.basic_only:
                    v = self._challenge(h, path, v)
                elif lk == "location" and p.relative_location:
                    v = _relative(v)
                out.append((k, v))
            if p.rate_limit and repo is not None and repo.group("kind") == "manifests":
                out += self._rate_limit_headers(99)
            self._record(h, status)
            self._answer_stream(h, status, out, resp)
        finally:
            conn.close()

    def _upstream(self, h: _Handler, headers: list[tuple[str, str]]):
        """Send the request on to the real registry (same Host, so its Location URLs
        point at the front); the body is streamed."""
        conn = http.client.HTTPSConnection(
            LOOPBACK, self.registry.port, context=self.ca.client_context(), timeout=120
        )
        conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
        chunked = "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()
        for k, v in headers:
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        if chunked:
            for piece in _read_chunked(h):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            for piece in _read_length(h):
                conn.send(piece)
        return conn, conn.getresponse()

    def _challenge(self, h: _Handler, path: str, header: str) -> str:
        """distribution's challenge as this registry phrases it."""
        p = self.profile
        scope = dict(re.findall(r'(\w+)="([^"]*)"', header)).get("scope")
        is_ping = path in ("/v2/", "/v2")
        if is_ping and p.ping_scope:
            scope = p.ping_scope
        if scope and p.azure_actions:
            name = scope.split(":", 1)[1].rsplit(":", 1)[0]
            if path.endswith("/tags/list"):
                scope = f"repository:{name}:metadata_read"
            elif h.command == "DELETE":
                scope = f"repository:{name}:delete"
        params = [("realm", self.realm)]
        if p.service and (p.ping_service or not is_ping):
            params.append(("service", p.service))
        if scope:
            params.append(("scope", scope))
        return "Bearer " + ",".join(f'{k}="{v}"' for k, v in params)

    def _rate_limit_headers(self, remaining: int) -> list[tuple[str, str]]:
        return [
            ("RateLimit-Limit", "100;w=21600"),
            ("RateLimit-Remaining", f"{remaining};w=21600"),
            ("Docker-RateLimit-Source", LOOPBACK),
        ]

    def _basic_to_bearer(self, h: _Handler, path: str) -> str | None:
        """ECR: check the client's Basic credentials by getting a token for them from the
        session's token server (the real registry only takes Bearer tokens)."""
        header = h.headers.get("Authorization") or ""
        if not header.lower().startswith("basic "):
            return None
        repo = _REPO_PATH.match(path)
        scopes = []
        if repo is not None:
            write = h.command in ("POST", "PUT", "PATCH", "DELETE")
            scopes.append(f"repository:{repo.group('name')}:{'pull,push' if write else 'pull'}")
            for mount in urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query).get("from", []):
                scopes.append(f"repository:{mount}:pull")
        elif path == "/v2/_catalog":
            scopes.append("registry:catalog:*")
        query = urllib.parse.urlencode(
            [("service", self.registry.service)] + [("scope", s) for s in scopes]
        )
        status, _, body = self._token_server("GET", query, None, header, None)
        if status != 200:
            return None
        return "Bearer " + json.loads(body)["token"]

    # -- the token service ------------------------------------------------------------

    def _token(self, h: _Handler) -> None:
        p = self.profile
        parts = urllib.parse.urlsplit(h.path)
        body = b""
        if h.command == "POST":
            body = b"".join(_read_length(h))
        raw = body.decode(errors="replace") if h.command == "POST" else parts.query
        fields = urllib.parse.parse_qs(raw, keep_blank_values=True)

        def one(name: str) -> str | None:
            values = fields.get(name)
            return values[0] if values else None

        scopes = tuple(s for value in fields.get("scope", []) for s in value.split())
        authorization = h.headers.get("Authorization")
        user = one("username")
        if authorization and authorization.lower().startswith("basic "):
            try:
                user = base64.b64decode(authorization[6:]).decode().partition(":")[0]
            except ValueError:
                user = "?"
        anonymous = user is None and one("grant_type") != "refresh_token"
        status, content_type, reply = 404, "application/json", b'{"errors":[]}'
        if parts.path != p.realm_path or h.command not in ("GET", "POST"):
            pass
        elif h.command == "POST" and not p.oauth:
            status, reply = 405, b'{"errors":[{"code":"UNSUPPORTED"}]}'
        elif (
            p.deny_anonymous_write
            and anonymous
            and any({"push", "delete", "*"} & set(s.rsplit(":", 1)[-1].split(",")) for s in scopes)
        ):
            status = 403
            reply = json.dumps(
                {
                    "errors": [
                        {"code": "DENIED", "message": "requested access to the resource is denied"}
                    ]
                }
            ).encode()
        else:
            forwarded = _set_field(raw, "service", self.registry.service)
            if p.azure_actions:
                forwarded = _replace_field(forwarded, "scope", _azure_to_distribution)
            status, content_type, reply = self._token_server(
                h.command,
                forwarded if h.command == "GET" else "",
                forwarded.encode() if h.command == "POST" else None,
                authorization,
                h.headers.get("Content-Type"),
            )
        with self._lock:
            self.token_requests.append(
                FrontTokenRequest(
                    h.command,
                    parts.path,
                    _redact(raw),
                    one("service"),
                    scopes,
                    one("account"),
                    one("grant_type"),
                    one("client_id"),
                    user,
                    status,
                )
            )
        self._answer(h, status, [("Content-Type", content_type)], reply)

    def _token_server(self, method, query, body, authorization, content_type):
        conn = http.client.HTTPSConnection(
            LOOPBACK, self.token_server.port, context=self.ca.client_context(), timeout=30
        )
        headers = {}
        if authorization:
            headers["Authorization"] = authorization
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, "/auth" + (f"?{query}" if query else ""), body, headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", "application/json"), resp.read()
        finally:
            conn.close()

    # -- blob storage -----------------------------------------------------------------

    def _sign(self, registry_target: str, digest: str, authorization: str | None) -> str:
        """A time-limited URL on the storage host, in this registry's CDN's style."""
        expires = int(time.time()) + 600
        algo, hexdigest = digest.split(":", 1)
        signature = hmac.new(
            self.secret, f"{registry_target}\n{expires}".encode(), hashlib.sha256
        ).hexdigest()
        with self._lock:
            self._tickets[signature] = _Ticket(registry_target, authorization, expires)
        style = self.profile.redirect_style
        if style == "cloudflare":
            path = f"/registry-v2/docker/registry/v2/blobs/{algo}/{hexdigest[:2]}/{hexdigest}/data"
            query = f"verify={expires}-{signature}"
        elif style == "sas":
            path = f"/ghcr1/blobs/{digest}"
            query = urllib.parse.urlencode(
                [("se", str(expires)), ("sig", signature), ("sp", "r"), ("sr", "b")]
            )
        elif style == "cloudfront":
            path = f"/{algo}/{hexdigest[:2]}/{hexdigest}"
            query = f"Expires={expires}&Signature={signature}&Key-Pair-Id=APKAEXAMPLE"
        else:  # oss
            path = f"/docker/registry/v2/blobs/{algo}/{hexdigest[:2]}/{hexdigest}/data"
            query = urllib.parse.urlencode(
                [
                    ("Expires", str(expires)),
                    ("OSSAccessKeyId", "LTAIexample"),
                    ("Signature", signature),
                ]
            )
        url = f"{self.storage_url}{path}?{query}"
        with self._lock:
            self.redirects.append(url)
        return url

    def _storage(self, h: _Handler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        fields = urllib.parse.parse_qs(parts.query)
        signature = (
            (fields.get("verify", [""])[0].partition("-")[2])
            or fields.get("sig", [""])[0]
            or fields.get("Signature", [""])[0]
        )
        with self._lock:
            ticket = self._tickets.get(signature)
        status = 403
        if ticket is not None and ticket.expires >= time.time() and h.command in ("GET", "HEAD"):
            headers = (
                [] if ticket.authorization is None else [("Authorization", ticket.authorization)]
            )
            conn, resp = self._fetch(h.command, ticket.registry_path, headers)
            try:
                status = resp.status
                out = [
                    (k, v)
                    for k, v in resp.getheaders()
                    if k.lower() in ("content-type", "etag", "accept-ranges")
                ]
                self._record_storage(h, parts, status)
                return self._answer_stream(h, status, out, resp)
            finally:
                conn.close()
        _drain(h)
        self._record_storage(h, parts, status)
        self._answer(
            h,
            403,
            [("Content-Type", "application/xml")],
            b"<Error><Code>AccessDenied</Code></Error>",
        )

    def _record_storage(self, h, parts, status) -> None:
        with self._lock:
            self.storage_requests.append(
                StorageRequest(
                    h.command, parts.path, parts.query, "Authorization" in h.headers, status
                )
            )

    def _fetch(self, method: str, target: str, headers: list[tuple[str, str]]):
        conn = http.client.HTTPSConnection(
            LOOPBACK, self.registry.port, context=self.ca.client_context(), timeout=120
        )
        conn.request(method, target, headers=dict(headers))
        return conn, conn.getresponse()

    # -- answering --------------------------------------------------------------------

    def _extra_headers(self) -> list[tuple[str, str]]:
        n = self.profile.big_headers
        if not n:
            return []
        # Several long headers, as Google's front ends add (each under 8 KiB).
        out, i = [], 0
        while n > 0:
            size = min(n, 6000)
            out.append((f"X-Goog-Debug-{i}", "x" * size))
            n -= size
            i += 1
        return out

    def _answer(self, h: _Handler, status: int, headers, body: bytes) -> None:
        h.send_response_only(status)
        for k, v in [*headers, *self._extra_headers()]:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        if h.command != "HEAD" and body:
            h.wfile.write(body)

    def _answer_stream(self, h: _Handler, status: int, headers, resp) -> None:
        h.send_response_only(status)
        for k, v in [*headers, *self._extra_headers()]:
            h.send_header(k, v)
        length = resp.getheader("Content-Length")
        no_body = h.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        if length is not None:
            h.send_header("Content-Length", length)
        elif not no_body:
            h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        if no_body:
            return
        while True:
            piece = resp.read(CHUNK)
            if not piece:
                break
            h.wfile.write(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
        if length is None:
            h.wfile.write(b"0\r\n\r\n")


# --------------------------------------------------------------------------------------


def _read_length(h: BaseHTTPRequestHandler):
    remaining = int(h.headers.get("Content-Length") or 0)
    while remaining > 0:
        piece = h.rfile.read(min(CHUNK, remaining))
        if not piece:
            raise ConnectionError("client closed mid-body")
        remaining -= len(piece)
        yield piece


def _read_chunked(h: BaseHTTPRequestHandler):
    while True:
        line = h.rfile.readline(1024)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        remaining = size
        while remaining:
            piece = h.rfile.read(min(CHUNK, remaining))
            if not piece:
                raise ConnectionError("client closed mid-chunk")
            remaining -= len(piece)
            yield piece
        h.rfile.readline(16)  # CRLF after the chunk


def _drain(h: BaseHTTPRequestHandler) -> None:
    reader = (
        _read_chunked(h)
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()
        else _read_length(h)
    )
    for _ in reader:
        pass


def _relative(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))


def _set_field(raw: str, name: str, value: str) -> str:
    pairs = [
        p for p in raw.split("&") if p and urllib.parse.unquote_plus(p.partition("=")[0]) != name
    ]
    return "&".join([*pairs, f"{name}={urllib.parse.quote(value, safe='')}"])


def _replace_field(raw: str, name: str, change) -> str:
    out = []
    for pair in raw.split("&"):
        key, _, value = pair.partition("=")
        if urllib.parse.unquote_plus(key) == name:
            pair = f"{key}={urllib.parse.quote(change(urllib.parse.unquote_plus(value)), safe='')}"
        out.append(pair)
    return "&".join(out)


_AZURE_ACTIONS = {"metadata_read": "pull", "content_read": "pull", "metadata_write": "push"}


def _azure_to_distribution(value: str) -> str:
    """ACR's actions as distribution knows them (only inside the front: what the client
    asked for is recorded untranslated)."""
    out = []
    for scope in value.split():
        head, _, actions = scope.rpartition(":")
        mapped = []
        for a in actions.split(","):
            a = _AZURE_ACTIONS.get(a, a)
            if a not in mapped:
                mapped.append(a)
        out.append(f"{head}:{','.join(mapped)}")
    return " ".join(out)


def _redact(raw: str) -> str:
    return re.sub(r"((?:^|&)(?:password|refresh_token)=)[^&]*", r"\1<redacted>", raw)
