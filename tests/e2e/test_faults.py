"""Upstream faults with real processes (issue 6, item 5).

A private registry (and, where needed, a private token server) is stopped, killed,
restarted, or replaced by a listener that never answers or resets mid-body.  Clients
must get registry-style JSON errors (never HTML), never hang past a documented timeout,
mitmdump must log no traceback, an interrupted push must be retryable, and the proxy must
work again once the upstream is back, without a restart.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from tests.e2e.faultkit import (
    CuttingRelay,
    RestartableRegistry,
    Scripted,
    Silent,
    parse_raw_response,
    pull_image,
    push_image,
    raw_http,
)
from tests.e2e.images import ACCEPT_MANIFESTS, fetch_manifest
from tests.e2e.upstream import (
    ALICE,
    LOOPBACK,
    SkopeoError,
    TokenServer,
    _TLSServer,
    _TokenHandler,
    default_acl,
    serve_in_thread,
    stop_serving,
)

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""

TCP_TIMEOUT = 5  # mitmproxy's tcp_timeout for the tests with a silent upstream
TOKEN_TIMEOUT = 3  # the addon's registry_token_timeout for the silent token service


@pytest.fixture
def private_registry(request, ca, token_server):
    reg = RestartableRegistry(ca, token_server).start()
    yield reg
    if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
        print("----- private registry log (tail) -----")
        print("\n".join(reg.log_text().splitlines()[-80:]))
    reg.cleanup()


def assert_clean_log(p) -> None:
    log = p.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert p.proc is not None and p.proc.poll() is None, "mitmdump must still run"


def assert_registry_error(status, headers, body, method="GET", codes=(502, 504)) -> str:
    """A registry-style JSON error: returns its code."""
    assert status in codes, (status, headers, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    if method == "HEAD":
        # mitmproxy's HTTP/1 error answers carry their body even for HEAD (with
        # Connection: close, so clients drop it); the body is JSON all the same.
        return json.loads(body)["errors"][0]["code"] if body else ""
    assert b"<html" not in body.lower() and b"Traceback" not in body
    doc = json.loads(body)
    return doc["errors"][0]["code"]


def request(port: int, method: str, path: str, headers: str = "", timeout: float = 30):
    """One raw HTTP/1.1 exchange with the proxy: (status, headers, body, seconds)."""
    start = time.monotonic()
    data = raw_http(
        port,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\n"
        "Connection: close\r\n\r\n".encode(),
        timeout=timeout,
    )
    status, head, body = parse_raw_response(data)
    return status, head, body, time.monotonic() - start


def test_registry_down_gives_json_502_and_recovers_without_restart(
    private_registry, proxy, http_client, make_image, unique
):
    reg = private_registry
    p = proxy(RULES, upstream=reg.url)
    repo = f"team/{unique}/app"
    image = make_image(layers=2, layer_size=10_000)
    client = http_client(p.url, ALICE)
    push_image(client, repo, image, tag="1")
    token = client._tokens[(f"repository:{repo}:pull,push",)]
    auth = f"Authorization: Bearer {token}\r\n"
    pid = p.proc.pid

    reg.kill()  # SIGKILL: like a crash
    blob = image.layers[0].digest
    figures = {}
    for method, path in [
        ("GET", "/v2/"),
        ("GET", f"/v2/{repo}/manifests/1"),
        ("HEAD", f"/v2/{repo}/manifests/{image.digest}"),
        ("GET", f"/v2/{repo}/blobs/{blob}"),
        ("POST", f"/v2/{repo}/blobs/uploads/"),
        ("GET", f"/v2/{repo}/tags/list"),
        ("GET", "/v2/_catalog"),
    ]:
        status, headers, body, took = request(p.port, method, path, auth)
        code = assert_registry_error(status, headers, body, method, codes=(502,))
        assert code in ("UNAVAILABLE", ""), body
        assert took < 5, (method, path, took)
        figures[f"{method} {path[:40]}"] = f"{status} {code} {took * 1000:.0f} ms"
    print("\nregistry killed:", json.dumps(figures, indent=1))
    # Tokens do not need the registry: the realm is known and up.
    status, _, body, _ = request(
        p.port, "GET", f"/auth?service=test-registry&scope=repository:{repo}:pull"
    )
    assert status == 200, body

    reg.restart()
    # Same mitmdump process, fresh clients: pull and push work again.
    assert p.proc.pid == pid and p.proc.poll() is None
    after = http_client(p.url, ALICE)
    assert pull_image(after, repo, "1")[0] == image.digest
    second = make_image(layers=1, layer_size=5_000)
    push_image(after, repo, second, tag="2")
    direct = http_client(reg.url, ALICE)
    assert fetch_manifest(direct, f"acme_team/{unique}/app", "2").digest == second.digest
    assert_clean_log(p)


def test_registry_restart_with_a_kept_alive_client_connection(
    private_registry, proxy, http_client, make_image, unique
):
    """A client keeps its connection across the outage (docker and skopeo do)."""
    reg = private_registry
    p = proxy(RULES, upstream=reg.url)
    repo = f"team/{unique}/app"
    image = make_image(layers=1)
    client = http_client(p.url, ALICE)
    push_image(client, repo, image, tag="1")
    token = client._tokens[(f"repository:{repo}:pull,push",)]
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT_MANIFESTS}
    path = f"/v2/{repo}/manifests/1"

    conn = http.client.HTTPConnection(LOOPBACK, p.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        assert (r.status, r.read() and True) == (200, True)
        reg.kill()
        outcomes = []
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        outcomes.append(r.status)
        assert r.status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        reg.restart()
        for _ in range(2):  # the error answer may have closed the connection: reconnects
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                body = r.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                conn.close()
                outcomes.append("reconnect")
        outcomes.append(r.status)
        print(f"\nkept-alive client across kill/restart: {outcomes}")
        assert r.status == 200, body[:300]
    finally:
        conn.close()
    assert_clean_log(p)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_silent_upstream_does_not_hang_the_client(proxy, scheme, unique):
    silent = Silent().start()
    try:
        p = proxy(
            RULES,
            upstream=f"{scheme}://{silent.address}",
            extra_args=["--set", f"tcp_timeout={TCP_TIMEOUT}"],
        )
        path = f"/v2/team/{unique}/app/manifests/latest"
        status, headers, body, took = request(p.port, "GET", path, timeout=60)
        print(
            f"\nsilent {scheme} upstream, tcp_timeout={TCP_TIMEOUT}: client got "
            f"{status or 'connection closed, no response'} {body[:120]!r} after {took:.1f} s"
        )
        assert silent.accepted >= 1  # the proxy did try the upstream
        assert TCP_TIMEOUT - 1 <= took <= TCP_TIMEOUT + 5, took
        if status:
            assert_registry_error(status, headers, body)
        assert_clean_log(p)
    finally:
        silent.stop()


def test_silent_token_service_gives_json_504(proxy, unique):
    silent = Silent().start()
    try:
        rules = RULES.replace(
            "token_path: /auth",
            f"upstream:\n  realm: https://{silent.address}/auth\ntoken_path: /auth",
        )
        p = proxy(rules, extra_args=["--set", f"registry_token_timeout={TOKEN_TIMEOUT}"])
        status, headers, body, took = request(
            p.port, "GET", f"/auth?service=test-registry&scope=repository:team/{unique}/a:pull"
        )
        print(f"\nsilent token service: {status} {body[:100]!r} after {took:.1f} s")
        assert assert_registry_error(status, headers, body, codes=(504,)) == "UNAVAILABLE"
        assert TOKEN_TIMEOUT - 0.5 <= took <= TOKEN_TIMEOUT + 5, took
        assert_clean_log(p)
    finally:
        silent.stop()


RESET_CASES = {
    # name: (upstream bytes before the RST, request path suffix)
    "before-headers": (b"", "manifests/latest"),
    "blob-mid-body": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 100000\r\nDocker-Content-Digest: sha256:" + b"0" * 64 + b"\r\n\r\n"
        b"x" * 10_000,
        "blobs/sha256:" + "0" * 64,
    ),
    "blob-chunked-mid-body": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"2710\r\n" + b"y" * 10_000 + b"\r\n",
        "blobs/sha256:" + "0" * 64,
    ),
    "json-error-mid-body": (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n"
        b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":"',
        "manifests/latest",
    ),
}


@pytest.mark.parametrize("case", list(RESET_CASES))
def test_upstream_reset_mid_response(proxy, case, unique):
    reply, suffix = RESET_CASES[case]
    upstream = Scripted(reply, reset=True).start()
    try:
        p = proxy(RULES, upstream=f"http://{upstream.address}")
        path = f"/v2/team/{unique}/app/{suffix}"
        start = time.monotonic()
        conn = http.client.HTTPConnection(LOOPBACK, p.port, timeout=30)
        outcome = ""
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            status, ctype = r.status, r.getheader("Content-Type", "")
            try:
                body = r.read()
                outcome = f"{status} complete body of {len(body)} bytes"
            except (http.client.IncompleteRead, ConnectionError) as e:
                body = None
                outcome = f"{status} then {type(e).__name__} (truncation visible)"
        finally:
            conn.close()
        took = time.monotonic() - start
        print(f"\nupstream reset ({case}): client got {outcome} after {took:.2f} s")
        assert took < 10
        assert upstream.requests, "the request reached the fake upstream"
        if case in ("before-headers", "json-error-mid-body"):
            # Nothing was sent to the client yet: a clean registry error.
            assert status == 502 and ctype.startswith("application/json"), outcome
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        else:
            # Headers were already passed on (streaming): the client must see the cut,
            # never a short body that looks complete.
            assert status == 200 and body is None, outcome
        assert_clean_log(p)
    finally:
        upstream.stop()


class RestartableTokenServer(TokenServer):
    """A private token server that can go away and come back on the same port."""

    def _handle(self, h, method: str) -> None:
        # Remember open connections: the proxy keeps its connection to the token
        # service alive between tokens, and a service that goes down takes it along.
        with self._lock:
            self._open = getattr(self, "_open", set()) | {h.connection}
        super()._handle(h, method)

    def down(self) -> None:
        stop_serving(self._server, self._thread)
        self._server = None
        with self._lock:
            open_connections, self._open = getattr(self, "_open", set()), set()
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        self._server = _TLSServer(
            (LOOPBACK, self.port), _TokenHandler, self.ca.server_context(), owner=self
        )
        self._thread = serve_in_thread(self._server)


def test_token_service_down_gives_json_502_and_recovers(ca, proxy, http_client, unique):
    tokens = RestartableTokenServer(ca, default_acl()).start()
    reg = RestartableRegistry(ca, tokens).start()
    try:
        p = proxy(RULES, upstream=reg.url)
        repo = f"team/{unique}/app"
        push_image(http_client(p.url, ALICE), repo, _small_image(unique), tag="1")

        tokens.down()
        status, headers, body, took = request(
            p.port, "GET", f"/auth?service=test-registry&scope=repository:{repo}:pull"
        )
        print(f"\ntoken service down: /auth -> {status} {body[:100]!r} in {took * 1000:.0f} ms")
        assert assert_registry_error(status, headers, body, codes=(502,)) == "UNAVAILABLE"
        with pytest.raises(PermissionError, match="502"):
            http_client(p.url, ALICE).request("GET", f"/v2/{repo}/tags/list")

        tokens.up()
        r = http_client(p.url, ALICE).request("GET", f"/v2/{repo}/tags/list")
        assert r.status == 200 and r.json()["tags"] == ["1"], r.body
        assert_clean_log(p)
    finally:
        reg.cleanup()
        tokens.stop()


def _small_image(unique):
    # A tiny image without the make_image fixture (this test builds its own registry).
    import tempfile
    from pathlib import Path

    from tests.e2e.images import build_image

    return build_image(Path(tempfile.mkdtemp(prefix=f"e2e-faults-{unique}-")), layers=1)


# --- interrupted pushes -----------------------------------------------------------------


def _verify_upstream(http_client, reg, name: str, image) -> None:
    """The registry itself holds the manifest and every blob, with the right digests."""
    direct = http_client(reg.url, ALICE)
    assert fetch_manifest(direct, name, "1").digest == image.digest
    assert pull_image(direct, name, image.digest)[0] == image.digest


@pytest.mark.slow
def test_push_cut_mid_blob_is_retried_by_skopeo(
    ca, private_registry, proxy, skopeo, make_image, http_client, unique
):
    reg = private_registry
    relay = CuttingRelay(reg.port).start()  # mitmdump -> relay -> registry, TLS inside
    try:
        p = proxy(RULES, upstream=f"https://{relay.address}")
        image = make_image(layers=1, layer_size=8 << 20, files_per_layer=1)
        layer = image.layers[0].size
        dest = f"docker://{p.host}/team/{unique}/big:1"
        relay.cut_after(layer // 2)
        start = time.monotonic()
        with pytest.raises(SkopeoError) as failed:
            skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
        first = time.monotonic() - start
        assert relay.cuts == 1
        err = failed.value.stderr.strip().splitlines()[-1][:300]
        start = time.monotonic()
        skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
        second = time.monotonic() - start
        print(
            f"\npush of a {layer / 2**20:.1f} MiB layer cut after {layer // 2} bytes: "
            f"skopeo failed in {first:.1f} s ({err}); retry succeeded in {second:.1f} s"
        )
        _verify_upstream(http_client, reg, f"acme_team/{unique}/big", image)
        assert_clean_log(p)
    finally:
        relay.stop()


@pytest.mark.slow
def test_registry_killed_mid_push_then_skopeo_retry_succeeds(
    private_registry, proxy, skopeo, make_image, http_client, unique
):
    reg = private_registry
    p = proxy(RULES, upstream=reg.url)
    image = make_image(layers=1, layer_size=48 << 20, files_per_layer=1)
    dest = f"docker://{p.host}/team/{unique}/huge:1"
    uploads = reg.storage_dir / "docker/registry/v2/repositories/acme_team" / unique / "huge"
    result: dict = {}

    def push():
        try:
            skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
            result["ok"] = True
        except SkopeoError as e:
            result["error"] = e.stderr.strip().splitlines()[-1][:300]

    worker = threading.Thread(target=push, daemon=True)
    worker.start()
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.is_alive():
        sizes = [f.stat().st_size for f in uploads.glob("_uploads/*/data")]
        if sizes and max(sizes) > 1 << 20:
            reg.kill()
            killed_at = max(sizes)
            break
        time.sleep(0.01)
    worker.join(timeout=180)
    assert not worker.is_alive()
    assert killed_at is not None, f"the upload finished before it could be interrupted: {result}"
    assert "error" in result, result
    print(
        f"\nregistry SIGKILLed with {killed_at / 2**20:.1f} of "
        f"{image.layers[0].size / 2**20:.1f} MiB uploaded; skopeo: {result['error']}"
    )
    # While it is down, what the client sees is a registry error, not a hang.
    status, headers, body, _ = request(p.port, "GET", f"/v2/team/{unique}/huge/tags/list")
    assert_registry_error(status, headers, body, codes=(502,))

    reg.restart()
    start = time.monotonic()
    skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
    print(f"retry after restart succeeded in {time.monotonic() - start:.1f} s")
    _verify_upstream(http_client, reg, f"acme_team/{unique}/huge", image)
    assert_clean_log(p)
