"""The proxy is no open proxy and hides what the rules don't map (issue 6, items 2 and 3).

A `Recorder` listens on another 127.0.0.1 port and stands for any host the operator did
not configure: absolute-form targets, CONNECT, a client-supplied `realm`, `Host` or
`X-Forwarded-*`, and an upstream `Location` or token realm naming it must never make the
proxy connect there (nor send the client there on the proxy's word).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse

import pytest

from tests.e2e.faultkit import (
    FakeUpstream,
    Recorder,
    parse_raw_response,
    pull_image,
    push_image,
    raw_http,
)
from tests.e2e.upstream import ALICE

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""

BASIC_ALICE = "Basic " + base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()


@pytest.fixture
def recorder():
    r = Recorder().start()
    yield r
    r.stop()


def assert_untouched(recorder: Recorder, grace: float = 0.5) -> None:
    time.sleep(grace)  # a connection the proxy made would have been accepted by now
    assert recorder.connections == [], [c.first_bytes[:200] for c in recorder.connections]
    assert recorder.accepted == 0


def forwarding_headers(target: str) -> str:
    """Every header a client could use to pretend the request was meant for `target`."""
    return (
        f"Host: {target}\r\n"
        f"X-Forwarded-Host: {target}\r\n"
        "X-Forwarded-Proto: http\r\n"
        "X-Forwarded-Port: 80\r\n"
        f"X-Forwarded-For: {target.split(':')[0]}\r\n"
        f"Forwarded: for=127.0.0.1;host={target};proto=http\r\n"
    )


def test_absolute_form_and_connect_reach_only_the_upstream(registry, proxy, recorder, unique):
    p = proxy(RULES)
    rec = recorder.address
    targets = [
        f"GET http://{rec}/v2/",
        f"GET http://{rec}/v2/team/{unique}/app/manifests/latest",
        f"HEAD http://{rec}/v2/team/{unique}/app/blobs/sha256:{'0' * 64}",
        f"POST http://{rec}/v2/team/{unique}/app/blobs/uploads/",
        f"GET https://{rec}/v2/",
        f"GET http://{rec}/auth?service=test-registry&scope=repository:team/{unique}/app:pull",
        f"GET http://{rec}/",
        f"GET http://{rec}/some/other/path",
        f"CONNECT {rec}",
        f"OPTIONS http://{rec}/v2/",
    ]
    registry.mark()
    answers = {}
    for target in targets:
        raw = raw_http(
            p.port,
            f"{target} HTTP/1.1\r\nHost: {rec}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        status, headers, body = parse_raw_response(raw)
        answers[target] = status
        assert status != 0, (target, raw[:300])
        # Nothing in the answer points the client at the other host either.
        for name in ("location", "www-authenticate", "link"):
            assert str(recorder.port) not in headers.get(name, ""), (target, headers)
        assert b"<html" not in body.lower(), (target, body[:300])
    print("\nabsolute-form / CONNECT answers:", json.dumps(answers, indent=1))
    assert_untouched(recorder)
    # What reached the upstream carried no foreign authority: mitmproxy keeps the
    # absolute form in reverse mode but puts the upstream's own authority in it.
    uris = [uri for _, uri in registry.requests(since_mark=True)]
    assert uris, "the upstream should have seen the /v2/ requests"
    foreign = [u for u in uris if not u.startswith(("/", registry.url + "/"))]
    assert foreign == [], foreign
    assert not [u for u in uris if str(recorder.port) in u], uris
    assert answers[f"CONNECT {rec}"] >= 400
    assert answers[f"GET http://{rec}/"] == 404  # not a registry endpoint, under deny


def test_client_realm_host_and_forwarded_headers_are_ignored(
    registry, token_server, proxy, recorder, http_client, unique
):
    p = proxy(RULES)
    rec = recorder.address
    evil_realm = urllib.parse.quote(f"http://{rec}/auth", safe="")
    token_server.clear_requests()
    registry.mark()

    # /auth with a realm of the client's choosing, GET and POST, plus forwarding headers.
    scope = f"repository:team/{unique}/app:pull,push"
    raw = raw_http(
        p.port,
        (
            f"GET /auth?realm={evil_realm}&service=test-registry&scope={scope} HTTP/1.1\r\n"
            f"{forwarding_headers(rec)}Authorization: {BASIC_ALICE}\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    status, _, body = parse_raw_response(raw)
    assert status == 200, raw[:500]
    token = json.loads(body)["token"]
    form = (
        f"grant_type=password&username={ALICE[0]}&password={ALICE[1]}&service=test-registry"
        f"&client_id=e2e&realm={evil_realm}&scope={urllib.parse.quote(scope)}"
    ).encode()
    raw = raw_http(
        p.port,
        (
            f"POST /auth?realm={evil_realm} HTTP/1.1\r\n{forwarding_headers(rec)}"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(form)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + form,
    )
    assert parse_raw_response(raw)[0] == 200, raw[:500]
    # Both went to the real token server, with the mapped scope.
    asked = token_server.requests()
    assert len(asked) == 2, asked
    assert all(r.scopes == (f"repository:acme_team/{unique}/app:pull,push",) for r in asked)

    # The challenge still names the proxy's own token endpoint.
    raw = raw_http(
        p.port, f"GET /v2/ HTTP/1.1\r\n{forwarding_headers(rec)}Connection: close\r\n\r\n".encode()
    )
    status, headers, _ = parse_raw_response(raw)
    assert status == 401
    assert f'realm="{p.url}/auth"' in headers["www-authenticate"], headers

    # Upload sessions: the registry builds Location from Host / X-Forwarded-* / Forwarded
    # (each on its own, as some win over others); the client must still be sent back
    # to the proxy, never to the host it named, nor straight to the upstream.
    variants = {
        "Host": f"Host: {rec}\r\n",
        "X-Forwarded-Host": f"X-Forwarded-Host: {rec}\r\n",
        "X-Forwarded-Proto": "X-Forwarded-Proto: http\r\n",
        "Forwarded": f'Forwarded: for=127.0.0.1;host="{rec}";proto=http\r\n',
        "all": forwarding_headers(rec),
    }
    for label, extra in variants.items():
        raw = raw_http(
            p.port,
            (
                f"POST /v2/team/{unique}/app/blobs/uploads/ HTTP/1.1\r\n{extra}"
                f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n"
            ).encode(),
        )
        status, headers, body = parse_raw_response(raw)
        assert status == 202, (label, raw[:500])
        location = headers["location"]
        print(f"\nupload Location with a forged {label}: {location[:90]}")
        assert str(recorder.port) not in location, (label, location)
        assert location.startswith(f"{p.url}/v2/team/{unique}/app/blobs/uploads/"), (
            label,
            location,
        )

    assert_untouched(recorder)
    uris = [uri for _, uri in registry.requests(since_mark=True)]
    assert not [u for u in uris if str(recorder.port) in u], uris


def _fake_registry(recorder_address: str):
    """Routes for a plain-HTTP upstream that points clients and the proxy at a third host."""
    third = f"http://{recorder_address}"

    def route(method, target, headers):
        path = urllib.parse.urlsplit(target).path
        json_headers = {"Content-Type": "application/json"}
        if "/blobs/sha256:" in path and method in ("GET", "HEAD"):
            # Like registries on S3/CDN storage: the blob lives elsewhere.
            return 307, {"Location": f"{third}/storage/blob?sig=x"}, b""
        if path.endswith("/blobs/uploads/") and method == "POST":
            return 202, {"Location": f"{third}{path}upload-1?_state=x", "Range": "0-0"}, b""
        if "/manifests/" in path:
            return 404, json_headers, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}'
        return 200, json_headers, b"{}"

    return route


def test_upstream_location_to_a_third_host_is_never_followed(proxy, recorder, unique):
    fake = FakeUpstream(_fake_registry(recorder.address)).start()
    try:
        p = proxy(RULES, upstream=fake.url)
        seen = {}
        for method, path in [
            ("GET", f"/v2/team/{unique}/app/blobs/sha256:{'a' * 64}"),
            ("HEAD", f"/v2/team/{unique}/app/blobs/sha256:{'a' * 64}"),
            ("POST", f"/v2/team/{unique}/app/blobs/uploads/"),
        ]:
            raw = raw_http(
                p.port,
                f"{method} {path} HTTP/1.1\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            status, headers, _ = parse_raw_response(raw)
            seen[f"{method} {path.split('/', 4)[-1]}"] = (status, headers.get("location"))
        print("\nthird-host Location as the client gets it:", json.dumps(seen, indent=1))
        assert_untouched(recorder)
        # The upstream did see the mapped requests: the proxy forwarded, it did not follow.
        paths = [urllib.parse.urlsplit(t).path for _, t, _ in fake.requests]
        assert f"/v2/acme_team/{unique}/app/blobs/uploads/" in paths, paths
        statuses = {k: v[0] for k, v in seen.items()}
        assert sorted(statuses.values()) == [202, 307, 307], seen
    finally:
        fake.stop()


def test_foreign_token_realm_is_logged_once_and_never_used(token_server, proxy, recorder, unique):
    foreign = f"http://{recorder.address}/token"
    challenge = f'Bearer realm="{foreign}",service="test-registry"'

    def route(method, target, headers):
        path = urllib.parse.urlsplit(target).path
        h = {"Content-Type": "application/json", "WWW-Authenticate": challenge}
        if path.startswith("/v2/") and path != "/v2/":
            name = path[4:].split("/manifests/")[0]
            h["WWW-Authenticate"] += f',scope="repository:{name}:pull"'
        return 401, h, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'

    fake = FakeUpstream(route).start()
    try:
        rules = RULES.replace(
            "token_path: /auth", f"upstream:\n  realm: {token_server.realm}\ntoken_path: /auth"
        )
        p = proxy(rules, upstream=fake.url)
        token_server.clear_requests()
        n = 40
        for i in range(n):
            path = "/v2/" if i % 2 else f"/v2/team/{unique}/app{i}/manifests/latest"
            raw = raw_http(p.port, f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
            status, headers, _ = parse_raw_response(raw)
            assert status == 401
            assert f'realm="{p.url}/auth"' in headers["www-authenticate"], headers
        # A token request goes to the configured realm, not the advertised one.
        raw = raw_http(
            p.port,
            (
                f"GET /auth?service=test-registry&scope=repository:team/{unique}/app0:pull "
                f"HTTP/1.1\r\nAuthorization: {BASIC_ALICE}\r\nConnection: close\r\n\r\n"
            ).encode(),
        )
        assert parse_raw_response(raw)[0] == 200, raw[:300]
        assert token_server.requested_scopes() == [f"repository:acme_team/{unique}/app0:pull"]
        assert_untouched(recorder)
        time.sleep(0.5)  # the log is unbuffered but written by another process
        lines = [line for line in p.log_text().splitlines() if foreign in line]
        warnings = [line for line in lines if "advertises token realm" in line]
        print(f"\nlog lines naming the foreign realm after {n} challenges:", lines)
        assert len(warnings) == 1, warnings
        assert "configure" in warnings[0] and token_server.realm in warnings[0]
    finally:
        fake.stop()


# --- unmatched: deny hides everything outside the rules (item 3) ----------------------


@pytest.fixture
def hidden_and_mapped(registry, http_client, make_image, unique):
    """Pushed straight to the registry: one repository the rules map, one they don't."""
    direct = http_client(registry.url, ALICE)
    mapped = f"acme_team/{unique}/app"
    hidden = f"library/hidden{unique}"
    image = make_image(layers=1, layer_size=2048)
    push_image(direct, mapped, image, tag="1")
    push_image(direct, hidden, image, tag="1")
    return mapped, hidden, image


def _catalog(client, base: str, page: int) -> list[str]:
    names: list[str] = []
    url = f"{base}/v2/_catalog?n={page}"
    for _ in range(500):  # bounded pagination
        r = client.request("GET", url, scopes=["registry:catalog:*"])
        assert r.status == 200, (r.status, r.body[:300])
        names += r.json()["repositories"]
        link = r.header("Link")
        if not link:
            return names
        target = link.split(";")[0].strip().strip("<>")
        url = target if "://" in target else base + target
    raise AssertionError("catalog did not end within 500 pages")


def test_deny_catalog_lists_only_mapped_names(
    registry, token_server, proxy, http_client, hidden_and_mapped, unique
):
    mapped, hidden, _ = hidden_and_mapped
    p = proxy(RULES)
    direct_names = _catalog(http_client(registry.url, ALICE), registry.url, 1000)
    assert hidden in direct_names and mapped in direct_names  # the filter has work to do

    token_server.clear_requests()
    for page in (1000, 7):  # one page, and paginated (cursors across hidden names)
        names = _catalog(http_client(p.url, ALICE), p.url, page)
        assert f"team/{unique}/app" in names
        assert all(n.startswith("team/") for n in names), [
            n for n in names if not n.startswith("team/")
        ][:10]
        assert not [n for n in names if "hidden" in n or "acme_team" in n]
        assert len(names) == len(set(names)), "pagination repeated names"
        expected = sorted(
            "team/" + n[len("acme_team/") :] for n in direct_names if n.startswith("acme_team/")
        )
        assert sorted(names) == expected
    print(f"\ncatalog: {len(direct_names)} upstream names, {len(names)} shown through the proxy")
    assert "registry:catalog:*" in token_server.requested_scopes()


def test_deny_refuses_upstream_names_and_asks_no_token_for_them(
    registry, token_server, proxy, http_client, hidden_and_mapped, unique
):
    mapped, hidden, image = hidden_and_mapped
    p = proxy(RULES)
    client = http_client(p.url, ALICE)
    # The mapped name works through the proxy under its client name (positive control).
    assert pull_image(client, f"team/{unique}/app", "1")[0] == image.digest

    registry.mark()
    token_server.clear_requests()
    digest = image.layers[0].digest
    for name in (mapped, hidden):
        for method, path in [
            ("GET", f"/v2/{name}/manifests/1"),
            ("HEAD", f"/v2/{name}/manifests/{image.digest}"),
            ("GET", f"/v2/{name}/blobs/{digest}"),
            ("GET", f"/v2/{name}/tags/list"),
            ("POST", f"/v2/{name}/blobs/uploads/"),
            ("PUT", f"/v2/{name}/manifests/2"),
            ("DELETE", f"/v2/{name}/manifests/{image.digest}"),
        ]:
            r = client.request(method, path, scopes=[f"repository:{name}:pull,push"])
            assert r.status == 404, (method, path, r.status, r.body[:200])
            if method != "HEAD":
                assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN", r.body
        # Mounting from an upstream name into a mapped repository: no mount (the proxy
        # asks for a plain upload instead, which containerd needs), and `from` is dropped.
        r = client.request(
            "POST",
            f"/v2/team/{unique}/other/blobs/uploads/?mount={digest}&from={name}",
            scopes=[f"repository:team/{unique}/other:pull,push"],
        )
        assert r.status == 202, (r.status, r.body[:300])
        assert r.header("Location").startswith(f"{p.url}/v2/team/{unique}/other/blobs/uploads/")
        # Asking the proxy for a token on the upstream name directly: scope dropped.
        raw = raw_http(
            p.port,
            (
                f"GET /auth?service=test-registry&scope=repository:{name}:pull,push"
                f"&scope=repository:{name}:*&scope=repository(plugin):{name}:pull HTTP/1.1\r\n"
                f"Authorization: {BASIC_ALICE}\r\nConnection: close\r\n\r\n"
            ).encode(),
        )
        status, _, body = parse_raw_response(raw)
        assert status == 200
        assert json.loads(body)["token"]

    # The upstream saw only the plain upload requests, never either name; the token
    # server no scope for either name, only the mount target's (mapped) scope.
    uris = [uri for _, uri in registry.requests(since_mark=True)]
    assert [u for u in uris if hidden in u or mapped in u] == [], uris
    assert {urllib.parse.urlsplit(u).path for u in uris} == {
        f"/v2/acme_team/{unique}/other/blobs/uploads/"
    }, uris
    assert not [u for u in uris if "from=" in u or "mount=" in u], uris
    scopes = token_server.requested_scopes()
    assert [s for s in scopes if hidden in s or mapped in s] == [], scopes
    assert set(scopes) == {f"repository:acme_team/{unique}/other:pull,push"}, scopes


def test_token_service_redirect_is_not_followed_nor_passed_on(proxy, recorder, unique):
    """A realm answering with a redirect to a third host: the proxy neither follows it
    nor hands the client its Location."""
    third = f"http://{recorder.address}/auth?stolen=1"
    realm = FakeUpstream(lambda method, target, headers: (302, {"Location": third}, b"")).start()
    try:
        rules = RULES.replace(
            "token_path: /auth", f"upstream:\n  realm: {realm.url}/auth\ntoken_path: /auth"
        )
        p = proxy(rules)
        for method, extra in [("GET", ""), ("POST", "grant_type=password&username=a&password=b")]:
            raw = raw_http(
                p.port,
                (
                    f"{method} /auth?service=test-registry&scope=repository:team/{unique}/a:pull"
                    f" HTTP/1.1\r\nAuthorization: {BASIC_ALICE}\r\n"
                    "Content-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {len(extra)}\r\nConnection: close\r\n\r\n{extra}"
                ).encode(),
            )
            status, headers, _ = parse_raw_response(raw)
            print(f"\ntoken service redirecting elsewhere, {method} /auth: client got {status}")
            assert "location" not in headers, headers
            assert status != 200
        assert len(realm.requests) == 2  # the configured realm was asked, once each
        assert_untouched(recorder)
    finally:
        realm.stop()
