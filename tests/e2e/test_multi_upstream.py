"""Two real upstream registries, each with its own token service (own key, users and
service name), behind one mitmdump (issue 7).

Upstream A is the reverse-mode target (rules: team/... -> acme_team/...); upstream B is
named in the rules file (tools/... -> b_tools/...) and the proxy logs in to B with its own
account (carol), because the clients only have accounts on A.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.clients import CONTAINERD_TOOLS, Containerd, require_tools
from tests.e2e.images import fetch_manifest
from tests.e2e.proxycheck import push_image_raw, repository_of
from tests.e2e.upstream import ALICE, Acl, Registry, TokenServer, UserAcl

CAROL = ("carol", "carol-secret")


@pytest.fixture(scope="module")
def upstream_b(ca):
    token = TokenServer(
        ca,
        Acl(users={CAROL[0]: UserAcl(password=CAROL[1], push=("b_tools/*",))}),
        issuer="issuer-b",
    ).start()
    reg = Registry(ca, token, service="registry-b").start()
    yield reg, token
    reg.cleanup()
    token.stop()


@pytest.fixture
def two_upstreams(proxy, upstream_b, monkeypatch):
    reg_b, _ = upstream_b
    monkeypatch.setenv("E2E_B_PASSWORD", CAROL[1])
    rules = f"""
unmatched: deny
rules:
  - client: "team/{{r:path}}"
    upstream: "acme_team/{{r:path}}"
upstreams:
  b:
    url: {reg_b.url}
    credentials:
      username: {CAROL[0]}
      password_env: E2E_B_PASSWORD
    rules:
      - client: "tools/{{r:path}}"
        upstream: "b_tools/{{r:path}}"
        actions: [pull, push]       # a robot-account upstream is pull-only by default
"""
    return proxy(rules)


def names_seen(registry) -> set[str]:
    return {n for e in registry.access_log(since_mark=True) if (n := repository_of(e.path))}


def test_skopeo_push_and_pull_to_both_upstreams(
    two_upstreams, registry, token_server, upstream_b, skopeo, make_image, http_client, unique
):
    p = two_upstreams
    reg_b, token_b = upstream_b
    image_a, image_b = make_image(layers=2), make_image(layers=2)
    registry.mark()
    reg_b.mark()
    token_server.clear_requests()
    token_b.clear_requests()

    a_ref = f"docker://{p.host}/team/{unique}/app:1"
    b_ref = f"docker://{p.host}/tools/{unique}/cli:1"
    skopeo.copy(image_a.ref, a_ref, dest_creds=ALICE, tls_verify=False)
    skopeo.copy(image_b.ref, b_ref, dest_creds=ALICE, tls_verify=False)
    assert skopeo.inspect(a_ref, creds=ALICE, tls_verify=False)["Digest"] == image_a.digest
    assert skopeo.inspect(b_ref, creds=ALICE, tls_verify=False)["Digest"] == image_b.digest
    assert skopeo.list_tags(
        f"docker://{p.host}/tools/{unique}/cli", creds=ALICE, tls_verify=False
    ) == ["1"]

    # Each upstream saw only its own names, under its own mapping.
    assert names_seen(registry) == {f"acme_team/{unique}/app"}
    assert names_seen(reg_b) == {f"b_tools/{unique}/cli"}
    # Each token service saw only scopes of its own upstream, and its own service name;
    # alice's credentials went to A only, B got the proxy's own account.
    a_scopes = token_server.requested_scopes()
    b_requests = token_b.requests()
    assert a_scopes and all(f"acme_team/{unique}/app" in s for s in a_scopes), a_scopes
    assert b_requests and all(
        s == f"repository:b_tools/{unique}/cli:pull,push"
        or s == f"repository:b_tools/{unique}/cli:pull"
        for r in b_requests
        for s in r.scopes
    ), [r.scopes for r in b_requests]
    assert {(r.subject, r.service, r.status) for r in b_requests} == {("carol", "registry-b", 200)}
    assert {r.subject for r in token_server.requests()} == {"alice"}

    # Stored upstream B under its name, byte for byte.
    direct_b = http_client(reg_b.url, CAROL)
    assert fetch_manifest(direct_b, f"b_tools/{unique}/cli", "1").digest == image_b.digest

    # Pull both back through the one proxy address.
    for ref, image in ((a_ref, image_a), (b_ref, image_b)):
        out = image.layout.parent / f"pulled-{image.digest[7:19]}"
        skopeo.copy(ref, f"oci:{out}:x", src_creds=ALICE, tls_verify=False)
        assert (
            json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == image.digest
        )


def test_mount_across_upstreams_becomes_an_upload(
    two_upstreams, registry, upstream_b, skopeo, make_image, unique
):
    p = two_upstreams
    reg_b, _ = upstream_b
    image = make_image(layers=2)
    skopeo.copy(
        image.ref, f"docker://{p.host}/team/{unique}/src:1", dest_creds=ALICE, tls_verify=False
    )
    reg_b.mark()
    # skopeo knows the layers are in team/...; B cannot mount from A, so it uploads.
    skopeo.copy(
        image.ref, f"docker://{p.host}/tools/{unique}/dst:1", dest_creds=ALICE, tls_verify=False
    )
    entries = reg_b.access_log(since_mark=True)
    assert not [e for e in entries if "from" in e.query], entries
    uploaded = {e.query["digest"][0] for e in entries if e.method == "PUT" and "digest" in e.query}
    assert {layer.digest for layer in image.layers} <= uploaded


def test_ping_is_one_challenge_for_all_upstreams(two_upstreams, http_client):
    p = two_upstreams
    r = http_client(p.url).raw("GET", f"{p.url}/v2/")
    assert r.status == 401
    assert f'realm="{p.url}/auth"' in (r.header("WWW-Authenticate") or "")
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_containerd_push_and_pull_to_both_upstreams(
    two_upstreams, registry, token_server, upstream_b, make_image, http_client, unique
):
    require_tools(*CONTAINERD_TOOLS)
    p = two_upstreams
    reg_b, token_b = upstream_b
    image = make_image(layers=2, layer_size=20_000)
    push_image_raw(http_client(registry.url, ALICE), f"acme_team/{unique}/seed", image, "v1")
    with Containerd() as ctr:
        ctr.configure_host(p.host, plain_http=True)
        user = ":".join(ALICE)
        ctr.pull(f"{p.host}/team/{unique}/seed:v1", user=user)
        ctr.tag(f"{p.host}/team/{unique}/seed:v1", f"{p.host}/tools/{unique}/seed:v1")
        reg_b.mark()
        token_b.clear_requests()
        ctr.push(f"{p.host}/tools/{unique}/seed:v1", user=user)
        assert names_seen(reg_b) == {f"b_tools/{unique}/seed"}
        assert {r.subject for r in token_b.requests()} == {"carol"}
        direct_b = http_client(reg_b.url, CAROL)
        assert fetch_manifest(direct_b, f"b_tools/{unique}/seed", "v1").digest == image.digest

        ctr.remove_images(f"{p.host}/tools/{unique}/seed:v1", f"{p.host}/team/{unique}/seed:v1")
        ctr.pull(f"{p.host}/tools/{unique}/seed:v1", user=user)
        assert ctr.image_digest(f"{p.host}/tools/{unique}/seed:v1") == image.digest
        registry.mark()
        token_server.clear_requests()
        ctr.tag(f"{p.host}/tools/{unique}/seed:v1", f"{p.host}/team/{unique}/back:v1")
        ctr.push(f"{p.host}/team/{unique}/back:v1", user=user)
        assert names_seen(registry) <= {f"acme_team/{unique}/back", f"acme_team/{unique}/seed"}
        reqs = token_server.requests()
        assert reqs and {(r.method, r.grant_type, r.subject) for r in reqs} == {
            ("POST", "password", "alice")
        }
