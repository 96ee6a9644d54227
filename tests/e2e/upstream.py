"""Launchers for the real services the end-to-end tests run against.

Everything here listens on 127.0.0.1 only, uses free ports picked at start, keeps its
files in a private temporary directory and is stopped explicitly (the pytest fixtures in
conftest.py do that).  Nothing here imports pytest, so the launchers can also be driven
from a Python shell or a benchmark script.

- TestCA: a throwaway CA plus a leaf certificate for 127.0.0.1/localhost.
- TokenServer: a Docker token server (GET and OAuth2 POST flows) issuing RS256 JWTs
  that CNCF distribution 2.8 accepts.
- Registry: `docker-registry serve` (distribution 2.8) with TLS and token auth.
- Mitmdump: the proxy under test, `mitmdump -s addon/registry_rewrite.py` in reverse mode.
- Skopeo: runs skopeo with its own auth file, home and blob-info cache.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
ADDON_SCRIPT = REPO_ROOT / "addon" / "registry_rewrite.py"
LOOPBACK = "127.0.0.1"

# The account the default ACL knows; tests refer to these instead of repeating literals.
ALICE = ("alice", "alice-secret")
BOB = ("bob", "bob-secret")


class LaunchError(RuntimeError):
    """A service did not come up; the message carries its output."""


def free_port() -> int:
    """A currently free TCP port on loopback (the OS picks it; tiny race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int,
    *,
    timeout: float = 30.0,
    proc: subprocess.Popen | None = None,
    describe=lambda: "",
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port.

    Fails early (with `describe()` in the message, typically the process' log) when
    `proc` exits, and after `timeout` seconds at the latest.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(
                f"process exited with {proc.returncode} before listening\n{describe()}"
            )
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise LaunchError(
                f"nothing listening on {LOOPBACK}:{port} after {timeout}s\n{describe()}"
            )
        time.sleep(0.05)


def _stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate our own child process, escalating to SIGKILL if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def serve_in_thread(server: socketserver.BaseServer, poll: float = 0.2) -> threading.Thread:
    """Run a socketserver in a daemon thread; `stop_serving` ends it."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll}, daemon=True
    )
    thread.start()
    return thread


def stop_serving(
    server: socketserver.BaseServer | None,
    thread: threading.Thread | None,
    timeout: float = 10.0,
) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(timeout=timeout)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    # Backdate a little so clock differences between processes never matter.
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=7)
    )


def self_signed_cert(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    """A plain self-signed certificate, used to hand the token signing key to the registry."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
    )
    return _validity(builder).sign(key, hashes.SHA256())


class TestCA:
    """A throwaway certificate authority and one server certificate for 127.0.0.1/localhost.

    Files (all in `directory`): `ca_pem` (CA certificate), `cert_pem` + `key_pem` (leaf),
    `combined_pem` (leaf key + cert, the format of mitmproxy's `--certs`), and
    `cert_dir` (a directory holding `ca.crt`, the layout skopeo/containers expect).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: Path | None = None):
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="e2e-ca-"))
        self.ca_pem = self.dir / "ca.pem"
        self.cert_pem = self.dir / "cert.pem"
        self.key_pem = self.dir / "key.pem"
        self.combined_pem = self.dir / "combined.pem"
        self.cert_dir = self.dir / "certs.d"

    def start(self) -> TestCA:
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key = _new_key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry-rewrite test CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_builder = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ca_ski, critical=False)
        )
        ca_cert = _validity(ca_builder).sign(ca_key, hashes.SHA256())

        leaf_key = _new_key()
        leaf_builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
            )
            # Python 3.13's default verification (VERIFY_X509_STRICT) insists on an AKI.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        leaf_cert = _validity(leaf_builder).sign(ca_key, hashes.SHA256())

        self.ca_pem.write_bytes(_pem_cert(ca_cert))
        self.cert_pem.write_bytes(_pem_cert(leaf_cert))
        self.key_pem.write_bytes(_pem_key(leaf_key))
        self.key_pem.chmod(0o600)
        self.combined_pem.write_bytes(_pem_key(leaf_key) + _pem_cert(leaf_cert))
        self.combined_pem.chmod(0o600)
        self.cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(self.ca_pem, self.cert_dir / "ca.crt")
        return self

    def stop(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def client_context(self) -> ssl.SSLContext:
        """An SSL context for Python clients that trusts exactly this CA."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_pem), str(self.key_pem))
        return ctx


# --------------------------------------------------------------------------------------
# Token server
# --------------------------------------------------------------------------------------


def libtrust_key_id(public_key) -> str:
    """The key ID docker/libtrust derives for a public key (distribution 2.8 matches `kid`).

    Base32 (no padding) of the first 240 bits of SHA-256 over the DER SubjectPublicKeyInfo,
    as 12 groups of 4 characters joined by ':'.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode_jwt_claims(token: str) -> dict:
    """The claims of a JWT, unverified (for assertions in tests)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass(frozen=True)
class UserAcl:
    """What one account may do; patterns are fnmatch-style (`*` also matches `/`)."""

    password: str
    push: tuple[str, ...] = ()  # pull, push and delete
    pull: tuple[str, ...] = ()  # pull only
    catalog: bool = False  # registry:catalog:*


@dataclass
class Acl:
    users: dict[str, UserAcl] = field(default_factory=dict)
    anonymous_pull: tuple[str, ...] = ()

    def allowed(self, user: str | None, rtype: str, name: str) -> set[str]:
        """The actions `user` (None = anonymous) may hold on one resource."""

        def matches(patterns: Iterable[str]) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        if rtype == "registry":
            acl = self.users.get(user) if user else None
            return {"*"} if acl and acl.catalog and name == "catalog" else set()
        if rtype != "repository":
            return set()
        actions = set()
        if matches(self.anonymous_pull):
            actions.add("pull")
        acl = self.users.get(user) if user else None
        if acl is not None:
            if matches(acl.push):
                actions |= {"pull", "push", "delete", "*"}
            elif matches(acl.pull):
                actions.add("pull")
        return actions


def default_acl() -> Acl:
    """The ACL of the shared test registry.

    alice may push/pull `acme_team/*` (any depth) and `library/*` and list the catalog;
    bob may only pull `acme_team/*`; anyone may pull `acme_team/public*`.
    """
    return Acl(
        users={
            ALICE[0]: UserAcl(password=ALICE[1], push=("acme_team/*", "library/*"), catalog=True),
            BOB[0]: UserAcl(password=BOB[1], pull=("acme_team/*",)),
        },
        anonymous_pull=("acme_team/public*",),
    )


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]
    resource_class: str = ""

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        # "repository:acme_team/app:pull,push"; the name may itself contain ':'
        # (host:port prefixes), so type is up to the first ':' and actions after the last.
        parts = text.split(":")
        if len(parts) < 3:
            return None
        rtype, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
        rclass = ""
        m = re.fullmatch(r"([a-z0-9]+)\(([a-z0-9]+)\)", rtype)
        if m:
            rtype, rclass = m.groups()
        return cls(rtype, name, tuple(a for a in actions.split(",") if a), rclass)


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received (never holds secrets)."""

    method: str
    path: str
    status: int
    grant_type: str | None  # None for GET
    scopes: tuple[str, ...]  # individual scopes after splitting on whitespace
    basic_auth: bool
    service: str | None
    account: str | None
    client_id: str | None
    offline: bool  # offline_token=true (GET) or access_type=offline (POST)
    subject: str | None  # the authenticated user, None when anonymous or refused
    granted: tuple[dict, ...]  # the `access` entries of the issued token


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, ssl_context: ssl.SSLContext, owner: TokenServer):
        self.ssl_context = ssl_context
        self.owner = owner
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = super().get_request()
        # Handshake lazily in the handler thread so one slow client cannot block accept().
        return self.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stuck client must not pin a thread forever
    server: _TLSServer

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        # Quiet: requests are recorded structurally instead, and URLs must not hit logs.
        pass

    def do_GET(self):
        self.server.owner._handle(self, "GET")

    def do_POST(self):
        self.server.owner._handle(self, "POST")

    def send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class TokenServer:
    """A Docker registry token server over HTTPS on 127.0.0.1 (realm `url + "/auth"`).

    GET /auth: optional Basic auth, `service`, `account`, repeated `scope` (each may hold
    several space-separated scopes), `offline_token=true` -> also a refresh_token.
    POST /auth (OAuth2 form): grant_type=password|refresh_token, `scope` space-separated,
    `service`, `client_id`, `access_type=offline`.  With `oauth=False` POST answers 404,
    like servers without OAuth support (clients then fall back to GET).

    Only actions both requested and allowed by the ACL are granted; denied scopes simply
    yield fewer `access` entries.  Wrong credentials give 401 with a JSON body.
    """

    def __init__(
        self,
        ca: TestCA,
        acl: Acl | None = None,
        *,
        issuer: str = "test-token-issuer",
        expires_in: int = 300,
        oauth: bool = True,
    ):
        self.ca = ca
        self.acl = acl or default_acl()
        self.issuer = issuer
        self.expires_in = expires_in
        self.oauth = oauth
        self.dir = Path(tempfile.mkdtemp(prefix="e2e-token-"))
        self.signing_key = _new_key()
        self.signing_cert_pem = self.dir / "signing-cert.pem"
        self.key_id = libtrust_key_id(self.signing_key.public_key())
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self._server: _TLSServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def realm(self) -> str:
        return self.url + "/auth"

    def start(self) -> TokenServer:
        cert = self_signed_cert(self.signing_key, "registry-rewrite token signer")
        self.signing_cert_pem.write_bytes(_pem_cert(cert))
        self._server = _TLSServer(
            (LOOPBACK, 0), _TokenHandler, self.ca.server_context(), owner=self
        )
        self.port = self._server.server_address[1]
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        stop_serving(self._server, self._thread)
        self._server = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- recorded requests ------------------------------------------------------------

    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def requested_scopes(self) -> list[str]:
        return [s for r in self.requests() for s in r.scopes]

    # -- token issuing ----------------------------------------------------------------

    def issue(self, subject: str | None, service: str | None, scopes: Sequence[str]):
        """Sign a token for `subject`; returns (token, granted access entries)."""
        merged: dict[tuple[str, str, str], list[str]] = {}
        for text in scopes:
            scope = Scope.parse(text)
            if scope is None:
                continue
            allowed = self.acl.allowed(subject, scope.type, scope.name)
            key = (scope.type, scope.name, scope.resource_class)
            acts = merged.setdefault(key, [])
            for action in scope.actions:
                if action in allowed and action not in acts:
                    acts.append(action)
        access = []
        for (rtype, name, rclass), actions in merged.items():
            if not actions:
                continue
            entry = {"type": rtype, "name": name, "actions": actions}
            if rclass:
                entry["class"] = rclass
            access.append(entry)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": service or "",
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": self.key_id}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self.signing_key.sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}", access

    def _check_password(self, user: str, password: str) -> bool:
        acl = self.acl.users.get(user)
        return acl is not None and secrets.compare_digest(acl.password, password)

    def _handle(self, h: _TokenHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        form: dict[str, list[str]] = {}
        if method == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            body = h.rfile.read(min(length, 1 << 20)).decode(errors="replace")
            form = urllib.parse.parse_qs(body, keep_blank_values=True)
        params = form if method == "POST" else query

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[0] if values else None

        scopes = tuple(s for value in params.get("scope", []) for s in value.split())
        basic = _parse_basic(h.headers.get("Authorization"))
        grant_type = one("grant_type") if method == "POST" else None
        offline = one("offline_token") == "true" or one("access_type") == "offline"

        status, subject, granted = 200, None, ()
        try:
            if url.path != "/auth" or (method == "POST" and not self.oauth):
                status = 404
                h.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "not found"}]})
                return
            refresh_token = None
            if method == "GET":
                if basic is not None:
                    if not self._check_password(*basic):
                        status = 401
                        h.send_json(401, _unauthorized("incorrect username or password"))
                        return
                    subject = basic[0]
            elif grant_type == "password":
                user, password = one("username") or "", one("password") or ""
                if not self._check_password(user, password):
                    status = 401
                    h.send_json(401, _unauthorized("incorrect username or password"))
                    return
                subject = user
            elif grant_type == "refresh_token":
                with self._lock:
                    subject = self._refresh_tokens.get(one("refresh_token") or "")
                if subject is None:
                    status = 401
                    h.send_json(401, _unauthorized("invalid refresh token"))
                    return
                refresh_token = one("refresh_token")
            else:
                status = 400
                h.send_json(400, {"error": "unsupported_grant_type"})
                return

            token, access = self.issue(subject, one("service"), scopes)
            granted = tuple(access)
            issued_at = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
            body = {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": issued_at,
            }
            if subject is not None and (method == "POST" or offline):
                if refresh_token is None:
                    refresh_token = secrets.token_urlsafe(24)
                    with self._lock:
                        self._refresh_tokens[refresh_token] = subject
                body["refresh_token"] = refresh_token
            h.send_json(200, body)
        finally:
            record = TokenRequest(
                method=method,
                path=url.path,
                status=status,
                grant_type=grant_type,
                scopes=scopes,
                basic_auth=basic is not None,
                service=one("service"),
                account=one("account"),
                client_id=one("client_id"),
                offline=offline,
                subject=subject if status == 200 else None,
                granted=granted,
            )
            with self._lock:
                self._requests.append(record)


def _unauthorized(detail: str) -> dict:
    return {
        "errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": detail}]
    }


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except ValueError:
        return None
    return user, password


# --------------------------------------------------------------------------------------
# Registry (CNCF distribution 2.8)
# --------------------------------------------------------------------------------------

# The access log distribution writes to stdout (gorilla's Apache combined format):
#   127.0.0.1 - - [28/Nov/2024:04:15:00 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "skopeo/1.9.3"
_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^\]]+\] "(\S+) (\S+) HTTP/[\d.]+" (\d{3}) ')
_SYNC_PATH = "/v2/?e2e-log-sync="


@dataclass(frozen=True)
class AccessEntry:
    method: str
    uri: str
    status: int

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.uri).path

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.uri).query)


class _Service:
    """A subprocess with its own temp dir (`dir`) and log file (`log_path`), listening on
    `port` once started."""

    dir: Path
    log_path: Path
    port: int
    proc: subprocess.Popen | None

    def _launch(
        self, argv: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None
    ) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
            )
        try:
            wait_for_port(self.port, timeout=timeout, proc=self.proc, describe=self.log_text)
        except LaunchError:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_process(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return _read_text(self.log_path)


class Registry(_Service):
    """`docker-registry serve` (distribution 2.8) on 127.0.0.1 with TLS and token auth.

    `url`/`host` locate it; `access_log()` / `requests()` tell which requests it served
    (to assert which repository names reached the upstream); `log_text()` is everything
    it printed.  `token_server=None` runs it without auth, `tls=False` over plain HTTP.
    """

    def __init__(
        self,
        ca: TestCA,
        token_server: TokenServer | None,
        *,
        service: str = "test-registry",
        tls: bool = True,
        log_level: str = "info",
        relative_urls: bool = False,
    ):
        self.ca = ca
        self.token_server = token_server
        self.service = service
        self.tls = tls
        self.log_level = log_level
        self.relative_urls = relative_urls
        self.dir = Path(tempfile.mkdtemp(prefix="e2e-registry-"))
        self.storage_dir = self.dir / "storage"
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log_consumed = 0

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def config(self) -> dict:
        http: dict = {
            "addr": self.host,
            "secret": secrets.token_hex(16),
            "relativeurls": self.relative_urls,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls:
            http["tls"] = {"certificate": str(self.ca.cert_pem), "key": str(self.ca.key_pem)}
        config: dict = {
            "version": 0.1,
            "log": {
                "level": self.log_level,
                "formatter": "text",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # No background upload purging while tests run.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.token_server is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.signing_cert_pem),
                }
            }
        return config

    def start(self, timeout: float = 30.0) -> Registry:
        self.port = free_port()
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        # JSON is valid YAML, which spares a YAML dependency here.
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        # REGISTRY_* variables override config keys; keep the run hermetic.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._launch(["docker-registry", "serve", str(self.config_path)], env, timeout)
        return self

    def _sync_log(self, timeout: float = 10.0) -> None:
        """Make sure every request answered so far is in the log file.

        distribution writes an access-log line after the handler returns, i.e. possibly
        after the client already has its answer.  A marker request answered after them
        shows up after them too.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        marker = uuid.uuid4().hex
        ctx = self.ca.client_context() if self.tls else None
        conn = (
            http.client.HTTPSConnection(LOOPBACK, self.port, context=ctx, timeout=timeout)
            if self.tls
            else http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        )
        try:
            conn.request("GET", _SYNC_PATH + marker)
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            if time.monotonic() > deadline:
                raise TimeoutError("registry access log did not show the sync request")
            time.sleep(0.02)

    def access_log(self, *, since_mark: bool = False) -> list[AccessEntry]:
        """Every request the registry answered, in order (our own sync probes left out).

        With `since_mark=True` only those after the last `mark()`.
        """
        self._sync_log()
        text = self.log_text()
        if since_mark:
            text = text[self._log_consumed :]
        entries = []
        for line in text.splitlines():
            m = _ACCESS_LINE.match(line)
            if m and not m.group(2).startswith(_SYNC_PATH):
                entries.append(AccessEntry(m.group(1), m.group(2), int(m.group(3))))
        return entries

    def mark(self) -> None:
        """Remember the current end of the log, for `access_log(since_mark=True)`."""
        self._sync_log()
        self._log_consumed = len(self.log_text())

    def requests(self, *, since_mark: bool = False) -> list[tuple[str, str]]:
        """(method, request URI) of every request served, e.g. ("GET", "/v2/acme_team/a/...")."""
        return [(e.method, e.uri) for e in self.access_log(since_mark=since_mark)]

    def repositories_seen(self, *, since_mark: bool = False) -> set[str]:
        """Repository names that appeared in request paths (best effort, for assertions)."""
        names = set()
        for e in self.access_log(since_mark=since_mark):
            m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags)/", e.path)
            if m:
                names.add(m.group(1))
        return names


# --------------------------------------------------------------------------------------
# mitmdump with the addon under test
# --------------------------------------------------------------------------------------


class Mitmdump(_Service):
    """`mitmdump` in reverse mode in front of `upstream_url`, loading the addon.

    `rules_text` is written to a file passed as `--set registry_rules=FILE` (or pass an
    existing `rules_file`).  `tls=True` serves the test CA's leaf certificate to clients
    (`--certs *=combined.pem`); without it `url` is http://.  Note that mitmproxy's
    reverse mode accepts a TLS ClientHello on the same port either way (then with a
    certificate from its own CA in `confdir`).
    `addon=None` runs without any script (and without the `registry_rules` option).
    """

    def __init__(
        self,
        upstream_url: str,
        ca: TestCA,
        rules_text: str | None = None,
        *,
        rules_file: Path | None = None,
        tls: bool = False,
        addon: Path | None = ADDON_SCRIPT,
        extra_args: Sequence[str] = (),
    ):
        self.upstream_url = upstream_url
        self.ca = ca
        self.tls = tls
        self.addon = addon
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="e2e-mitmdump-"))
        if rules_file is None and rules_text is not None:
            rules_file = self.dir / "rules.yaml"
            rules_file.write_text(rules_text)
        self.rules_file = rules_file
        self.log_path = self.dir / "mitmdump.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def command(self) -> list[str]:
        mitmdump = Path(sys.executable).parent / "mitmdump"
        cmd = [
            str(mitmdump),
            "--mode",
            f"reverse:{self.upstream_url}",
            "--listen-host",
            LOOPBACK,
            "--listen-port",
            str(self.port),
            # A private confdir: no sharing of ~/.mitmproxy between runs or instances.
            "--set",
            f"confdir={self.dir / 'confdir'}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.ca.ca_pem}",
        ]
        if self.addon is not None:
            cmd += ["-s", str(self.addon)]
            if self.rules_file is not None:
                cmd += ["--set", f"registry_rules={self.rules_file}"]
        if self.tls:
            cmd += ["--certs", f"*={self.ca.combined_pem}"]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0) -> Mitmdump:
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # so log_text() is current
        self._launch(self.command(), env, timeout, cwd=REPO_ROOT)
        return self


# --------------------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------------------

# Where containers/image keeps its blob-info cache when running as root; not configurable
# through skopeo 1.9's flags or environment, hence the private mount namespace below.
SYSTEM_BLOB_INFO_CACHE = Path("/var/lib/containers/cache")

_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class SkopeoError(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        super().__init__(f"skopeo exited {returncode}: {' '.join(cmd)}\n{stderr.strip()}")


Creds = tuple[str, str]


class Skopeo:
    """Runs skopeo isolated from the machine's state.

    - Blob-info cache: containers/image remembers which repositories of a registry hold
      which blobs and uses that to attempt cross-repository mounts.  As root its cache is
      always /var/lib/containers/cache (shared machine-wide), so each Skopeo gets its own
      `cache_dir`, bind-mounted over that path inside a private mount namespace
      (`unshare --mount`).  As non-root, XDG_DATA_HOME points into `dir` instead.
    - Credentials: a private `--authfile` plus HOME/XDG_*/DOCKER_CONFIG inside `dir`, so
      ~/.docker/config.json and friends of the machine are never consulted.
    - Trust: a private accept-anything `--policy`, and an empty registries.conf.
    - TLS: `tls_verify=True` verifies against the test CA (`--cert-dir`).  False allows
      plain HTTP, but skopeo tries HTTPS first (unverified) and only falls back to HTTP
      when that fails; a plain `Mitmdump` accepts TLS too, so skopeo ends up speaking
      unverified HTTPS to it.  Real plain-HTTP clients: see containerd/docker in clients.py.
    """

    def __init__(self, ca: TestCA | None, *, directory: Path | None = None, timeout: float = 180):
        self.ca = ca
        self.timeout = timeout
        self.dir = Path(directory or tempfile.mkdtemp(prefix="e2e-skopeo-"))
        self.cache_dir = self.dir / "blob-info-cache"
        self.authfile = self.dir / "auth.json"
        self.home = self.dir / "home"
        self.tmp = self.dir / "tmp"
        self.policy = self.dir / "policy.json"
        self.registries_conf = self.dir / "registries.conf"
        for d in (self.cache_dir, self.home, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.policy.write_text(json.dumps(_POLICY))
        self.registries_conf.write_text("")
        self.authfile.write_text('{"auths": {}}')
        self.authfile.chmod(0o600)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("REGISTRY_AUTH_FILE", "DOCKER_", "CONTAINERS_", "XDG_"))
        }
        env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_RUNTIME_DIR=str(self.home / "run"),
            XDG_DATA_HOME=str(self.home / "data"),
            DOCKER_CONFIG=str(self.home / ".docker"),
            REGISTRY_AUTH_FILE=str(self.authfile),
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            TMPDIR=str(self.tmp),
        )
        return env

    def _wrap(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            # containers/image uses $XDG_DATA_HOME/containers/cache for non-root users.
            cache = self.home / "data" / "containers" / "cache"
            cache.parent.mkdir(parents=True, exist_ok=True)
            if not cache.exists():
                cache.symlink_to(self.cache_dir)
            return argv
        # The mount point must exist on the host; it is an empty directory there.
        SYSTEM_BLOB_INFO_CACHE.mkdir(parents=True, exist_ok=True)
        script = 'mount --bind "$0" "$1" && shift && exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.cache_dir),
            str(SYSTEM_BLOB_INFO_CACHE),
            *argv,
        ]

    def run(self, *args: str, timeout: float | None = None, check: bool = True):
        """Run `skopeo ARGS` and return its stdout; raise SkopeoError on failure.

        With `check=False` return the CompletedProcess instead.
        """
        argv = ["skopeo", "--policy", str(self.policy), "--tmpdir", str(self.tmp), *args]
        proc = subprocess.run(
            self._wrap(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=timeout or self.timeout,
        )
        if not check:
            return proc
        if proc.returncode != 0:
            raise SkopeoError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    # -- option helpers ---------------------------------------------------------------

    def _tls_args(self, prefix: str, tls_verify: bool) -> list[str]:
        args = [f"--{prefix}tls-verify={'true' if tls_verify else 'false'}"]
        if tls_verify and self.ca is not None:
            args.append(f"--{prefix}cert-dir={self.ca.cert_dir}")
        return args

    @staticmethod
    def _creds_args(prefix: str, creds: Creds | None, anonymous: bool) -> list[str]:
        if anonymous:
            return [f"--{prefix}no-creds"]
        if creds is not None:
            return [f"--{prefix}creds={creds[0]}:{creds[1]}"]
        return []  # whatever `login` stored in the private authfile, if anything

    # -- commands ---------------------------------------------------------------------

    def copy(
        self,
        src: str,
        dest: str,
        *,
        src_creds: Creds | None = None,
        dest_creds: Creds | None = None,
        src_anonymous: bool = False,
        dest_anonymous: bool = False,
        tls_verify: bool = True,
        all_images: bool = False,
        extra: Sequence[str] = (),
        timeout: float | None = None,
    ) -> str:
        args = ["copy", "--retry-times=0", f"--authfile={self.authfile}"]
        if src.startswith("docker://"):
            args += self._tls_args("src-", tls_verify)
            args += self._creds_args("src-", src_creds, src_anonymous)
        if dest.startswith("docker://"):
            args += self._tls_args("dest-", tls_verify)
            args += self._creds_args("dest-", dest_creds, dest_anonymous)
        if all_images:
            args.append("--all")
        return self.run(*args, *extra, src, dest, timeout=timeout)

    def _query_args(self, creds: Creds | None, anonymous: bool, tls_verify: bool) -> list[str]:
        return [
            f"--authfile={self.authfile}",
            *self._tls_args("", tls_verify),
            *self._creds_args("", creds, anonymous),
        ]

    def inspect(
        self,
        ref: str,
        *,
        creds: Creds | None = None,
        anonymous: bool = False,
        tls_verify: bool = True,
        raw: bool = False,
        config: bool = False,
    ):
        """`skopeo inspect`: parsed JSON; with raw=True the manifest bytes as skopeo got them."""
        args = ["inspect", *self._query_args(creds, anonymous, tls_verify)]
        if raw:
            args.append("--raw")
        if config:
            args.append("--config")
        out = self.run(*args, ref)
        return out.encode() if raw else json.loads(out)

    def list_tags(
        self,
        ref: str,
        *,
        creds: Creds | None = None,
        anonymous: bool = False,
        tls_verify: bool = True,
    ) -> list[str]:
        out = self.run("list-tags", *self._query_args(creds, anonymous, tls_verify), ref)
        return json.loads(out)["Tags"]

    def delete(self, ref: str, *, creds: Creds | None = None, tls_verify: bool = True) -> str:
        return self.run("delete", *self._query_args(creds, False, tls_verify), ref)

    def login(self, host: str, creds: Creds, *, tls_verify: bool = True) -> str:
        args = ["login", f"--authfile={self.authfile}", *self._tls_args("", tls_verify)]
        args += ["--username", creds[0], "--password-stdin"]
        argv = ["skopeo", "--policy", str(self.policy), *args, host]
        proc = subprocess.run(
            self._wrap(argv),
            input=creds[1],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=self.timeout,
        )
        if proc.returncode != 0:
            raise SkopeoError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def cache_files(self) -> list[Path]:
        """Files in this instance's blob-info cache (proves the isolation works)."""
        return sorted(p for p in self.cache_dir.rglob("*") if p.is_file())
