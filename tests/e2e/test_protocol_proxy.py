"""The registry protocol through mitmdump + the addon, spoken by hand (regclient.RegistryHTTP),
for what docker, skopeo and ctr don't exercise.

Clients say `team/...` and `{name}`; the registry holds `acme_team/...` and `library/{name}`
(proxycheck.RULES, `unmatched: deny`). Each test checks what reached the upstream registry
(or a stub standing in for it) and the token server, not only what the client got back.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.e2e.conftest import require_tool
from tests.e2e.images import ACCEPT_MANIFESTS, digest_of
from tests.e2e.proxycheck import (
    RULES,
    assert_only_upstream_names,
    assert_scopes_mapped,
    push_image_raw,
    token_requests_for,
)
from tests.e2e.regclient import parse_challenge
from tests.e2e.upstream import ALICE, LOOPBACK, Registry, serve_in_thread, stop_serving

BASIC_ALICE = "Basic " + base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MAX_PAGES = 50  # bound on _catalog paging loops


def _token(response) -> str:
    assert response.status == 200, (response.status, response.body)
    body = response.json()
    return body.get("token") or body["access_token"]


def _granted(request) -> dict[str, list[str]]:
    """name -> actions of the access the token server put into a token."""
    return {g["name"]: g["actions"] for g in request.granted}


# --------------------------------------------------------------------------------------
# Token endpoint: several scopes, POST forms, refresh tokens
# --------------------------------------------------------------------------------------


def test_token_get_with_repeated_scope_parameters(
    registry, token_server, proxy, http_client, unique
):
    p = proxy(RULES)
    a, b = f"team/{unique}/a", f"team/{unique}/b"
    query = [
        ("service", "test-registry"),
        ("scope", f"repository:{a}:pull"),
        ("scope", f"repository:{b}:pull,push"),
        ("scope", f"repository:tool{unique}:pull"),  # the {name} rule: library/...
        ("scope", f"repository:other/{unique}:pull"),  # no rule: must not reach the realm
    ]
    client = http_client(p.url)
    token_server.clear_requests()
    r = client.raw(
        "GET", f"{p.url}/auth?{urllib.parse.urlencode(query)}", {"Authorization": BASIC_ALICE}
    )
    token = _token(r)
    (req,) = token_server.requests()
    assert (req.method, req.basic_auth, req.subject, req.service) == (
        "GET",
        True,
        ALICE[0],
        "test-registry",
    )
    assert req.scopes == (
        f"repository:acme_team/{unique}/a:pull",
        f"repository:acme_team/{unique}/b:pull,push",
        f"repository:library/tool{unique}:pull",
    )
    assert _granted(req) == {
        f"acme_team/{unique}/a": ["pull"],
        f"acme_team/{unique}/b": ["pull", "push"],
        f"library/tool{unique}": ["pull"],
    }

    # The token is good for the client names, through the proxy.
    registry.mark()
    r = client.raw("POST", f"{p.url}/v2/{b}/blobs/uploads/", {"Authorization": f"Bearer {token}"})
    assert r.status == 202, r.body
    assert r.header("Location").startswith(f"{p.url}/v2/{b}/blobs/uploads/")
    assert [(e.method, e.path, e.status) for e in registry.access_log(since_mark=True)] == [
        ("POST", f"/v2/acme_team/{unique}/b/blobs/uploads/", 202)
    ]


def test_token_get_with_space_separated_scopes_in_one_value(
    token_server, proxy, http_client, unique
):
    p = proxy(RULES)
    value = (
        f"repository:team/{unique}/a:pull repository:team/{unique}/b:push "
        f"registry:catalog:* repository:other/{unique}:pull"
    )
    query = urllib.parse.urlencode(
        [("service", "test-registry"), ("scope", value), ("offline_token", "true")]
    )
    token_server.clear_requests()
    r = http_client(p.url).raw("GET", f"{p.url}/auth?{query}", {"Authorization": BASIC_ALICE})
    _token(r)
    assert r.json().get("refresh_token"), "offline_token=true did not reach the realm"
    (req,) = token_server.requests()
    assert req.scopes == (
        f"repository:acme_team/{unique}/a:pull",
        f"repository:acme_team/{unique}/b:push",
        "registry:catalog:*",
    )
    assert req.offline and req.subject == ALICE[0]
    assert _granted(req) == {
        f"acme_team/{unique}/a": ["pull"],
        f"acme_team/{unique}/b": ["push"],
        "catalog": ["*"],
    }


def test_token_post_password_and_refresh_token_grants(
    registry, token_server, proxy, http_client, unique
):
    p = proxy(RULES)
    client = http_client(p.url)
    scopes = f"repository:team/{unique}/a:pull repository:team/{unique}/b:pull,push"
    mapped = (
        f"repository:acme_team/{unique}/a:pull",
        f"repository:acme_team/{unique}/b:pull,push",
    )

    # grant_type=password, several scopes in one form value, access_type=offline
    token_server.clear_requests()
    form = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "username": ALICE[0],
            "password": ALICE[1],
            "service": "test-registry",
            "client_id": "e2e-raw",
            "access_type": "offline",
            "scope": scopes,
        }
    )
    r = client.raw("POST", f"{p.url}/auth", FORM, form.encode())
    _token(r)
    refresh = r.json()["refresh_token"]
    (req,) = token_server.requests()
    assert (req.method, req.grant_type, req.client_id, req.offline, req.subject) == (
        "POST",
        "password",
        "e2e-raw",
        True,
        ALICE[0],
    )
    assert req.scopes == mapped

    # grant_type=refresh_token with that refresh token, other scopes
    token_server.clear_requests()
    form = urllib.parse.urlencode(
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": "test-registry",
            "client_id": "e2e-raw",
            "scope": f"repository:team/{unique}/c:pull,push repository:tool{unique}:pull",
        }
    )
    r = client.raw("POST", f"{p.url}/auth", FORM, form.encode())
    token = _token(r)
    (req,) = token_server.requests()
    assert (req.method, req.grant_type, req.subject) == ("POST", "refresh_token", ALICE[0])
    assert req.scopes == (
        f"repository:acme_team/{unique}/c:pull,push",
        f"repository:library/tool{unique}:pull",
    )
    assert _granted(req)[f"acme_team/{unique}/c"] == ["pull", "push"]

    # a refresh token from a GET with offline_token=true works in a POST too
    query = urllib.parse.urlencode([("service", "test-registry"), ("offline_token", "true")])
    r = client.raw("GET", f"{p.url}/auth?{query}", {"Authorization": BASIC_ALICE})
    refresh = r.json()["refresh_token"]
    token_server.clear_requests()
    form = urllib.parse.urlencode(
        {"grant_type": "refresh_token", "refresh_token": refresh, "scope": scopes}
    )
    r = client.raw("POST", f"{p.url}/auth", FORM, form.encode())
    _token(r)
    (req,) = token_server.requests()
    assert (req.grant_type, req.subject, req.scopes) == ("refresh_token", ALICE[0], mapped)

    # the POST-issued token works against the proxy for the client name
    registry.mark()
    r = client.raw(
        "POST",
        f"{p.url}/v2/team/{unique}/c/blobs/uploads/",
        {"Authorization": f"Bearer {token}"},
    )
    assert r.status == 202, r.body
    assert_only_upstream_names(registry.access_log(since_mark=True), f"acme_team/{unique}/c")

    # the scope field repeated in one form, one of them holding two scopes
    token_server.clear_requests()
    form = urllib.parse.urlencode(
        [
            ("grant_type", "password"),
            ("username", ALICE[0]),
            ("password", ALICE[1]),
            ("scope", f"repository:team/{unique}/a:pull"),
            ("scope", f"repository:team/{unique}/b:pull,push repository:other/{unique}:pull"),
        ]
    )
    _token(client.raw("POST", f"{p.url}/auth", FORM, form.encode()))
    (req,) = token_server.requests()
    assert (req.grant_type, req.scopes) == ("password", mapped)

    # wrong password: the realm's 401 reaches the client as it was
    token_server.clear_requests()
    form = urllib.parse.urlencode(
        {"grant_type": "password", "username": ALICE[0], "password": "wrong", "scope": scopes}
    )
    r = client.raw("POST", f"{p.url}/auth", FORM, form.encode())
    assert r.status == 401
    assert [(q.status, q.scopes) for q in token_server.requests()] == [(401, mapped)]


# --------------------------------------------------------------------------------------
# _catalog paging
# --------------------------------------------------------------------------------------


def _client_name(upstream: str) -> str | None:
    """What RULES make of an upstream name (written out independently of the addon)."""
    if upstream.startswith("acme_team/"):
        return "team/" + upstream.removeprefix("acme_team/")
    if upstream.startswith("library/") and upstream.count("/") == 1:
        return upstream.removeprefix("library/")
    return None


def _next_link(response) -> str | None:
    link = response.header("Link")
    if link is None:
        return None
    m = re.match(r'\s*<([^>]*)>\s*;\s*rel="?next"?', link)
    assert m, link
    return m.group(1)


@pytest.fixture
def private_registry(ca, token_server):
    """A registry of its own, so the catalog holds exactly what the test put there."""
    require_tool("docker-registry")
    reg = Registry(ca, token_server).start()
    yield reg
    reg.cleanup()


def test_catalog_paging_through_link(
    private_registry, token_server, proxy, http_client, make_image, unique
):
    reg = private_registry
    upstream_names = [
        f"acme_team/{unique}/a",
        f"acme_team/{unique}/b/c",
        "library/alpha",
        "library/deep/one",  # library/{name} holds one component: no client name
        "library/deep/three",
        "library/deep/two",
        "library/zeta",
    ]
    image = make_image(layers=1, layer_size=100)
    direct = http_client(reg.url, ALICE)
    for name in upstream_names:
        push_image_raw(direct, name, image, "v1")
    r = direct.request("GET", "/v2/_catalog?n=100", scopes=["registry:catalog:*"])
    assert r.json()["repositories"] == sorted(upstream_names)
    expected = [c for c in map(_client_name, sorted(upstream_names)) if c is not None]
    assert expected == [f"team/{unique}/a", f"team/{unique}/b/c", "alpha", "zeta"]

    p = proxy(RULES, upstream=reg.url)
    for n in (1, 2):
        direct_pages = _catalog_pages(direct, "/v2/_catalog", n)
        assert [name for page in direct_pages for name in page] == sorted(upstream_names)
        reg.mark()
        token_server.clear_requests()
        pages = _catalog_pages(http_client(p.url, ALICE), "/v2/_catalog", n, proxy_url=p.url)
        # Page for page what the upstream listed, less the names no rule maps back.
        assert pages == [
            [_client_name(u) for u in page if _client_name(u)] for page in direct_pages
        ]
        assert [name for page in pages for name in page] == expected, f"n={n}"
        assert [] in pages  # a page whose names were all dropped, and paging went on
        # The upstream was asked with upstream names in last=: each page's last name.
        lasts = [
            e.query.get("last", [None])[0]
            for e in reg.access_log(since_mark=True)
            if e.path == "/v2/_catalog" and e.status == 200
        ]
        assert lasts == [None] + [page[-1] for page in direct_pages[:-1]], lasts
        assert {s for q in token_server.requests() for s in q.scopes} == {"registry:catalog:*"}


def _catalog_pages(client, path: str, n: int, proxy_url: str | None = None) -> list[list[str]]:
    """Follow `Link: <...>; rel="next"` from `path?n=N` to the end; the pages' names."""
    pages: list[list[str]] = []
    url: str | None = f"{path}?n={n}"
    while url is not None:
        assert len(pages) < MAX_PAGES, pages
        r = client.request("GET", url, scopes=["registry:catalog:*"])
        assert r.status == 200, r.body
        repositories = r.json()["repositories"]
        assert len(repositories) <= n
        pages.append(repositories)
        url = _next_link(r)
        if url is not None and proxy_url is not None:
            # relative (as distribution sends it) or at the proxy; never an upstream name
            assert url.startswith(("/v2/_catalog?", f"{proxy_url}/v2/_catalog?")), url
            assert "acme_team" not in url and "library" not in url, url
    return pages


# --------------------------------------------------------------------------------------
# Uploads, HEAD, Range, errors, referrers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain-http", "tls"])
def test_chunked_upload(registry, token_server, proxy, http_client, unique, tls):
    p = proxy(RULES, tls=tls)
    repo, up = f"team/{unique}/chunked", f"acme_team/{unique}/chunked"
    client = http_client(p.url, ALICE)
    scopes = [f"repository:{repo}:pull,push"]
    data = bytes(range(256)) * 300 + b"tail"
    digest = digest_of(data)
    chunks = [data[:30_000], data[30_000:60_000], data[60_000:]]
    registry.mark()
    token_server.clear_requests()

    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes)
    assert r.status == 202, r.body
    session = f"{p.url}/v2/{repo}/blobs/uploads/"
    location = r.header("Location")
    assert location.startswith(session), location
    offset = 0
    for chunk in chunks:
        r = client.request(
            "PATCH",
            location,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            },
            body=chunk,
            scopes=scopes,
        )
        assert r.status == 202, r.body
        offset += len(chunk)
        assert r.header("Range") == f"0-{offset - 1}"
        location = r.header("Location")
        assert location.startswith(session), location
    r = client.request("GET", location, scopes=scopes)  # upload status
    assert (r.status, r.header("Range")) == (204, f"0-{len(data) - 1}")
    assert r.header("Location").startswith(session)
    r = client.request("PUT", f"{location}&digest={digest}", scopes=scopes)
    assert r.status == 201, r.body
    assert r.header("Location") == f"{p.url}/v2/{repo}/blobs/{digest}"
    assert r.header("Docker-Content-Digest") == digest
    r = client.request("GET", f"/v2/{repo}/blobs/{digest}", scopes=scopes)
    assert (r.status, r.body) == (200, data)

    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up)
    done = [
        (e.method, e.status) for e in entries if e.path.startswith(f"/v2/{up}/") and e.status < 300
    ]
    assert done == [
        ("POST", 202),
        ("PATCH", 202),
        ("PATCH", 202),
        ("PATCH", 202),
        ("GET", 204),
        ("PUT", 201),
        ("GET", 200),
    ]
    (put,) = [e for e in entries if e.method == "PUT"]
    assert put.query["digest"] == [digest]
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert {s for q in reqs for s in q.scopes} == {f"repository:{up}:pull,push"}


def test_monolithic_upload_head_range_and_delete(
    registry, token_server, proxy, http_client, unique
):
    p = proxy(RULES)
    repo, up = f"team/{unique}/mono", f"acme_team/{unique}/mono"
    client = http_client(p.url, ALICE)
    scopes = [f"repository:{repo}:pull,push"]
    data = bytes(range(256)) * 40
    digest = digest_of(data)
    registry.mark()
    token_server.clear_requests()

    # monolithic: POST, then one PUT carrying the whole blob
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes)
    assert r.status == 202
    location = r.header("Location")
    assert location.startswith(f"{p.url}/v2/{repo}/blobs/uploads/"), location
    r = client.request(
        "PUT",
        f"{location}&digest={digest}",
        headers={"Content-Type": "application/octet-stream"},
        body=data,
        scopes=scopes,
    )
    assert r.status == 201, r.body
    assert r.header("Location") == f"{p.url}/v2/{repo}/blobs/{digest}"

    # HEAD: headers as GET would send them, no body
    r = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", scopes=scopes)
    assert (r.status, r.body) == (200, b"")
    assert r.header("Content-Length") == str(len(data))
    assert r.header("Docker-Content-Digest") == digest

    # Range: 206 and exactly those bytes
    r = client.request(
        "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=100-1123"}, scopes=scopes
    )
    assert r.status == 206, r.body
    assert r.body == data[100:1124]
    assert r.header("Content-Range") == f"bytes 100-1123/{len(data)}"
    r = client.request(
        "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=-16"}, scopes=scopes
    )
    assert (r.status, r.body) == (206, data[-16:])

    # a manifest on top, then HEAD and GET of it by tag and by digest
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    config_digest = digest_of(config)
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes)
    r = client.request(
        "PUT",
        f"{r.header('Location')}&digest={config_digest}",
        body=config,
        headers={"Content-Type": "application/octet-stream"},
        scopes=scopes,
    )
    assert r.status == 201
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest,
                    "size": len(data),
                }
            ],
        }
    ).encode()
    mtype = "application/vnd.oci.image.manifest.v1+json"
    r = client.request(
        "PUT",
        f"/v2/{repo}/manifests/v1",
        headers={"Content-Type": mtype},
        body=manifest,
        scopes=scopes,
    )
    assert r.status == 201, r.body
    assert r.header("Location") == f"{p.url}/v2/{repo}/manifests/{digest_of(manifest)}"
    for ref in ("v1", digest_of(manifest)):
        head = client.request(
            "HEAD",
            f"/v2/{repo}/manifests/{ref}",
            headers={"Accept": ACCEPT_MANIFESTS},
            scopes=scopes,
        )
        assert (head.status, head.body) == (200, b"")
        assert head.header("Docker-Content-Digest") == digest_of(manifest)
        assert head.header("Content-Length") == str(len(manifest))
        get = client.request(
            "GET",
            f"/v2/{repo}/manifests/{ref}",
            headers={"Accept": ACCEPT_MANIFESTS},
            scopes=scopes,
        )
        assert (get.status, get.body) == (200, manifest)
    r = client.request("GET", f"/v2/{repo}/tags/list", scopes=scopes)
    assert r.json() == {"name": repo, "tags": ["v1"]}

    # delete the manifest, then the layer blob
    scopes = [f"repository:{repo}:delete,pull,push"]
    r = client.request("DELETE", f"/v2/{repo}/manifests/{digest_of(manifest)}", scopes=scopes)
    assert r.status == 202, r.body
    r = client.request("HEAD", f"/v2/{repo}/manifests/v1", scopes=scopes)
    assert r.status == 404
    r = client.request("DELETE", f"/v2/{repo}/blobs/{digest}", scopes=scopes)
    assert r.status == 202, r.body
    r = client.request("GET", f"/v2/{repo}/blobs/{digest}", scopes=scopes)
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"

    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up)
    ok = [
        (e.method, e.path.removeprefix(f"/v2/{up}/"), e.status) for e in entries if e.status < 300
    ]
    assert ok[:6] == [
        ("POST", "blobs/uploads/", 202),
        ("PUT", ok[1][1], 201),
        ("HEAD", f"blobs/{digest}", 200),
        ("GET", f"blobs/{digest}", 206),
        ("GET", f"blobs/{digest}", 206),
        ("POST", "blobs/uploads/", 202),
    ]
    assert ("HEAD", "manifests/v1", 200) in ok and ("GET", "tags/list", 200) in ok
    assert [(m, p) for m, p, _ in ok if m == "DELETE"] == [
        ("DELETE", f"manifests/{digest_of(manifest)}"),
        ("DELETE", f"blobs/{digest}"),
    ]
    assert not [e for e in entries if e.method == "PATCH"]  # nothing went up in chunks
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert f"repository:{up}:delete,pull,push" in {s for q in reqs for s in q.scopes}


def _scope_set(scopes) -> set[tuple[str, str]]:
    """{(name, sorted actions)} of `repository:name:actions` scopes."""
    out = set()
    for scope in scopes:
        kind, rest = scope.split(":", 1)
        name, actions = rest.rsplit(":", 1)
        assert kind == "repository", scope
        out.add((name, ",".join(sorted(actions.split(",")))))
    return out


def test_cross_repo_mount_by_hand(registry, token_server, proxy, http_client, make_image, unique):
    p = proxy(RULES)
    src, src_up = f"team/{unique}/base", f"acme_team/{unique}/base"
    dst, dst_up = f"team/{unique}/derived", f"acme_team/{unique}/derived"
    image = make_image(layers=1)
    push_image_raw(http_client(registry.url, ALICE), src_up, image, "v1")
    layer = image.layers[0].digest
    client = http_client(p.url, ALICE)
    registry.mark()
    token_server.clear_requests()

    # The upstream's challenge names both repositories: the client sees both client names.
    mount = f"/v2/{dst}/blobs/uploads/?mount={layer}&from={urllib.parse.quote(src, safe='')}"
    r = client.raw("POST", p.url + mount)
    assert r.status == 401
    _, params = parse_challenge(r.header("WWW-Authenticate") or "")
    # (distribution lists the actions in no fixed order)
    assert _scope_set(params["scope"].split()) == {(dst, "pull,push"), (src, "pull")}
    r = client.request("POST", mount)  # token for the challenge's scopes, then the mount
    assert r.status == 201, r.body
    assert r.header("Location") == f"{p.url}/v2/{dst}/blobs/{layer}"
    assert r.header("Docker-Content-Digest") == layer
    (req,) = token_server.requests()
    assert _scope_set(req.scopes) == {(dst_up, "pull,push"), (src_up, "pull")}

    # A source no rule maps cannot be mounted from: a plain upload session starts instead.
    scopes = [f"repository:{dst}:pull,push"]
    r = client.request(
        "POST", f"/v2/{dst}/blobs/uploads/?mount={layer}&from=other%2Fx", scopes=scopes
    )
    assert r.status == 202, r.body
    assert r.header("Location").startswith(f"{p.url}/v2/{dst}/blobs/uploads/")

    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, src_up, dst_up)
    posts = [(e.path, e.query, e.status) for e in entries if e.method == "POST"]
    assert {p for p, _, _ in posts} == {f"/v2/{dst_up}/blobs/uploads/"}
    assert [(q, status) for _, q, status in posts if status != 401] == [
        ({"mount": [layer], "from": [src_up]}, 201),
        ({}, 202),  # mount and from dropped
    ]


def test_anonymous_pull_of_public_repo(
    registry, token_server, proxy, http_client, make_image, unique
):
    p = proxy(RULES)
    public, up_public = f"team/public-{unique}", f"acme_team/public-{unique}"
    private, up_private = f"team/{unique}/private", f"acme_team/{unique}/private"
    image = make_image(layers=1)
    direct = http_client(registry.url, ALICE)
    push_image_raw(direct, up_public, image, "v1")
    push_image_raw(direct, up_private, image, "v1")
    client = http_client(p.url)  # no credentials
    registry.mark()
    token_server.clear_requests()

    r = client.request("GET", f"/v2/{public}/manifests/v1", headers={"Accept": ACCEPT_MANIFESTS})
    assert (r.status, digest_of(r.body)) == (200, image.digest)
    r = client.request("GET", f"/v2/{public}/blobs/{image.layers[0].digest}")
    assert r.status == 200 and digest_of(r.body) == image.layers[0].digest
    r = client.request("GET", f"/v2/{private}/manifests/v1", headers={"Accept": ACCEPT_MANIFESTS})
    assert r.status == 401  # the anonymous token grants nothing there
    assert r.json()["errors"][0]["detail"][0]["Name"] == private

    assert_only_upstream_names(registry.access_log(since_mark=True), up_public, up_private)
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert {(q.method, q.basic_auth, q.subject) for q in reqs} == {("GET", False, None)}
    granted = {g["name"]: g["actions"] for q in reqs for g in q.granted}
    assert granted == {up_public: ["pull"]}


def test_not_found_errors_name_client_repositories(
    registry, token_server, proxy, http_client, make_image, unique
):
    p = proxy(RULES)
    repo, up = f"team/{unique}/app", f"acme_team/{unique}/app"
    push_image_raw(http_client(registry.url, ALICE), up, make_image(layers=1), "v1")
    client = http_client(p.url, ALICE)
    registry.mark()
    token_server.clear_requests()

    def get(path: str, scope_repo: str, method: str = "GET"):
        return client.request(method, path, scopes=[f"repository:{scope_repo}:pull"])

    r = get(f"/v2/{repo}/manifests/nope", repo)
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    r = get(f"/v2/{repo}/blobs/sha256:{'0' * 64}", repo)
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    r = get(f"/v2/{repo}/manifests/nope", repo, "HEAD")
    assert (r.status, r.body) == (404, b"")
    missing = f"team/{unique}/missing"
    r = get(f"/v2/{missing}/tags/list", missing)
    assert r.status == 404
    assert r.json()["errors"] == [
        {
            "code": "NAME_UNKNOWN",
            "message": "repository name not known to registry",
            "detail": {"name": missing},
        }
    ]
    # A 401 (insufficient scope) names the client repository too, in body and challenge.
    r = client.raw("GET", f"{p.url}/v2/{missing}/manifests/v1")
    assert r.status == 401
    assert r.json()["errors"][0]["detail"][0]["Name"] == missing
    assert f'scope="repository:{missing}:pull"' in r.header("WWW-Authenticate")

    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up, f"acme_team/{unique}/missing")
    assert sorted({e.status for e in entries}) == [401, 404]
    assert_scopes_mapped(token_server.requests())

    # A name no rule maps: refused by the proxy, in the registry's error format.
    registry.mark()
    token_server.clear_requests()
    r = client.raw("GET", f"{p.url}/v2/other/{unique}/manifests/v1")
    assert r.status == 404
    assert r.json()["errors"][0] == {
        "code": "NAME_UNKNOWN",
        "message": "repository name not known to registry",
        "detail": {"name": f"other/{unique}"},
    }
    assert not [e for e in registry.access_log(since_mark=True) if unique in e.uri]
    assert token_server.requests() == []


def test_referrers_path_reaches_upstream_under_mapped_name(
    registry, token_server, proxy, http_client, make_image, unique
):
    p = proxy(RULES)
    repo, up = f"team/{unique}/app", f"acme_team/{unique}/app"
    image = make_image(layers=1)
    push_image_raw(http_client(registry.url, ALICE), up, image, "v1")
    client = http_client(p.url, ALICE)
    registry.mark()
    r = client.request(
        "GET",
        f"/v2/{repo}/referrers/{image.digest}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        scopes=[f"repository:{repo}:pull"],
    )
    assert r.status == 404  # distribution 2.8 has no referrers API
    entries = registry.access_log(since_mark=True)
    assert [(e.method, e.path, e.status) for e in entries] == [
        ("GET", f"/v2/{up}/referrers/{image.digest}", 404)
    ]


# --------------------------------------------------------------------------------------
# An upstream that redirects blob downloads to other storage
# --------------------------------------------------------------------------------------


class _Recording(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler, owner):
        self.owner = owner
        super().__init__((LOOPBACK, 0), handler)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Recording

    def log_message(self, format, *args):  # noqa: A002
        pass

    def reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(
                (self.command, self.path, (self.headers.get("Authorization") or "").split(" ")[0])
            )
        owner.handle(self)

    do_HEAD = do_GET


class RedirectingUpstream:
    """A registry stand-in on 127.0.0.1 that sends blob downloads to a storage server on
    another port with `307 Location: http://127.0.0.1:OTHER/blob-storage/...`, like
    registries backed by S3 or a CDN, and a storage server that serves them.

    /v2/ and anything without a Bearer token get a challenge naming `realm`; manifests of
    `repo` redirect to the blob of `digest` at the registry itself (an absolute URL at the
    upstream, which the proxy must rewrite). `requests` / `storage_requests` record
    (method, path, auth scheme).
    """

    def __init__(self, realm: str, blobs: dict[str, bytes]):
        self.realm = realm
        self.blobs = blobs
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []
        self.storage_requests: list[tuple[str, str, str]] = []
        self.registry = _Recording(_Handler, self)
        self.storage = _Recording(_Handler, _Storage(self))
        self.threads = [serve_in_thread(s, poll=0.1) for s in (self.registry, self.storage)]

    @property
    def url(self) -> str:
        return self.registry.url

    def storage_url(self, name: str, digest: str) -> str:
        return f"{self.storage.url}/blob-storage/{name}/{digest}?X-Amz-Signature=e2e&expires=60"

    def handle(self, h: _Handler) -> None:
        path = urllib.parse.urlsplit(h.path).path
        m = re.fullmatch(r"/v2/(.+)/(blobs|manifests)/([^/]+)", path)
        auth = h.headers.get("Authorization") or ""
        if path == "/v2/" or (m and not auth.startswith("Bearer ")):
            challenge = f'Bearer realm="{self.realm}",service="stub-registry"'
            if m:
                challenge += f',scope="repository:{m.group(1)}:pull"'
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]}).encode()
            h.reply(401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, body)
        elif m and m.group(2) == "blobs" and m.group(3) in self.blobs:
            h.reply(307, {"Location": self.storage_url(m.group(1), m.group(3))})
        elif m and m.group(2) == "manifests":
            digest = next(iter(self.blobs))
            h.reply(307, {"Location": f"{self.url}/v2/{m.group(1)}/blobs/{digest}"})
        else:
            h.reply(404, {"Content-Type": "application/json"}, b'{"errors": []}')

    def stop(self) -> None:
        for server, thread in zip((self.registry, self.storage), self.threads, strict=True):
            stop_serving(server, thread)


class _Storage:
    def __init__(self, stub: RedirectingUpstream):
        self.stub = stub
        self.lock = stub.lock
        self.requests = stub.storage_requests

    def handle(self, h: _Handler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        digest = parts.path.rsplit("/", 1)[-1]
        signed = urllib.parse.parse_qs(parts.query).get("X-Amz-Signature") == ["e2e"]
        if not parts.path.startswith("/blob-storage/") or not signed:
            h.reply(403, {}, b"bad signature")
        elif digest in self.stub.blobs:
            h.reply(200, {"Content-Type": "application/octet-stream"}, self.stub.blobs[digest])
        else:
            h.reply(404, {}, b"no such blob")


@pytest.fixture
def redirecting_upstream(token_server):
    data = bytes(range(256)) * 64
    stub = RedirectingUpstream(token_server.realm, {digest_of(data): data})
    yield stub
    stub.stop()


def test_blob_redirect_to_other_host_is_passed_untouched(
    redirecting_upstream, token_server, proxy, http_client, unique
):
    stub = redirecting_upstream
    p = proxy(RULES, upstream=stub.url)
    ((digest, data),) = stub.blobs.items()
    repo, up = f"team/{unique}/app", f"acme_team/{unique}/app"
    client = http_client(p.url, ALICE)
    token_server.clear_requests()

    r = client.request("GET", f"/v2/{repo}/blobs/{digest}", scopes=[f"repository:{repo}:pull"])
    assert r.status == 307, r.body
    # Exactly what the upstream sent, although its path holds an upstream repository name.
    assert r.header("Location") == stub.storage_url(up, digest)
    followed = client.raw("GET", r.header("Location"))
    assert (followed.status, digest_of(followed.body)) == (200, digest)

    # The upstream saw the upstream name (challenged, then with the token), the storage
    # server the exact URL.
    assert stub.requests == [
        ("GET", f"/v2/{up}/blobs/{digest}", ""),
        ("GET", f"/v2/{up}/blobs/{digest}", "Bearer"),
    ]
    storage_path = stub.storage_url(up, digest).removeprefix(stub.storage.url)
    assert stub.storage_requests == [("GET", storage_path, "")]
    reqs = token_server.requests()
    assert [(q.method, q.service, q.scopes) for q in reqs] == [
        ("GET", "stub-registry", (f"repository:{up}:pull",))
    ]

    # A redirect back to the upstream itself must lead to the proxy, with the client name.
    r = client.request("GET", f"/v2/{repo}/manifests/v1", scopes=[f"repository:{repo}:pull"])
    assert r.status == 307
    assert r.header("Location") == f"{p.url}/v2/{repo}/blobs/{digest}"
    assert stub.requests[-1] == ("GET", f"/v2/{up}/manifests/v1", "Bearer")
    _, params = parse_challenge(client.history[0].header("WWW-Authenticate") or "")
    assert params["realm"] == f"{p.url}/auth"
    assert not token_requests_for(token_server, f":{repo}:")
