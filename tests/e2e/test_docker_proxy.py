"""docker (dockerd 20.10 + CLI) through mitmdump + the addon against the token-auth registry.

Clients say `team/...` and `{name}`; the registry holds `acme_team/...` and `library/{name}`
(proxycheck.RULES). What docker does with tokens is pinned down without the proxy in
test_clients_direct.py: after `docker login` it holds a refresh token and POSTs
`grant_type=refresh_token` for every later token; anonymous, it GETs.

dockerd treats registries on 127.0.0.0/8 as insecure: it speaks https first without
verifying, and would fall back to http only if TLS failed. mitmproxy's reverse mode accepts
TLS on its port, so docker always reaches the proxy over (unverified) https, even when the
proxy serves no certificate of its own; the realm it is sent to is then https as well.
"""

from __future__ import annotations

import pytest

from tests.e2e.clients import DOCKER_TOOLS, CommandError, Dockerd, require_tools
from tests.e2e.images import fetch_manifest
from tests.e2e.proxycheck import (
    RULES,
    TRANSPORT_PROBE,
    assert_anonymous_pull_tokens,
    assert_only_upstream_names,
    assert_scopes_mapped,
    client_transports,
    push_image_raw,
    token_requests_for,
)
from tests.e2e.upstream import ALICE


@pytest.fixture
def dockerd(registry):
    require_tools(*DOCKER_TOOLS)
    with Dockerd() as d:
        yield d


def _mounts(entries, repo: str):
    """Cross-repository mount attempts (POST ...?mount=&from=) into upstream repo `repo`."""
    return [
        e
        for e in entries
        if e.method == "POST" and e.path == f"/v2/{repo}/blobs/uploads/" and "mount" in e.query
    ]


def _uploaded(entries) -> set[str]:
    """Digests of blobs uploaded (the closing PUT ...?digest= of an upload session)."""
    return {
        e.query["digest"][0]
        for e in entries
        if e.method == "PUT" and "/blobs/uploads/" in e.path and "digest" in e.query
    }


def _assert_docker_spoke_tls(p) -> None:
    """Every request reached mitmdump over TLS, the token requests (login GET, POSTs) too."""
    transports = client_transports(p)
    assert {scheme for scheme, _, _ in transports} == {"https"}, transports
    assert {("https", "GET", "/auth"), ("https", "POST", "/auth")} <= set(transports)


def test_docker_login_pull_push_through_proxy(
    dockerd, registry, token_server, proxy, make_image, http_client, unique
):
    p = proxy(RULES, extra_args=TRANSPORT_PROBE)  # a proxy without certificate of its own
    up_repo, repo = f"acme_team/dk-{unique}", f"team/dk-{unique}"
    image = make_image(layers=2, layer_size=30_000)
    direct = http_client(registry.url, ALICE)
    push_image_raw(direct, up_repo, image, "v1")  # seeded straight into the registry

    # login through the proxy: GET + Basic with offline_token, answered with a refresh token
    registry.mark()
    token_server.clear_requests()
    dockerd.login(p.host, *ALICE)
    (login,) = token_server.requests()
    assert (login.method, login.basic_auth, login.offline, login.client_id) == (
        "GET", True, True, "docker",
    )  # fmt: skip
    assert login.status == 200 and login.subject == ALICE[0]
    stored = dockerd.stored_auth(p.host)
    assert stored.get("identitytoken"), stored  # docker got the refresh token via the proxy
    # the ping, then the ping again with the token the proxy got
    assert [(e.method, e.path, e.status) for e in registry.access_log(since_mark=True)] == [
        ("GET", "/v2/", 401),
        ("GET", "/v2/", 200),
    ]

    # pull: the same manifest as the registry holds under the upstream name
    direct_digest = fetch_manifest(direct, up_repo, "v1").digest
    registry.mark()
    token_server.clear_requests()
    pulled = dockerd.pull(f"{p.host}/{repo}:v1")
    assert pulled == image.digest == direct_digest
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up_repo)
    got_blobs = {e.path.rsplit("/", 1)[1] for e in entries if "/blobs/" in e.path}
    assert got_blobs >= {layer.digest for layer in image.layers}
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert {(r.method, r.grant_type, r.client_id, r.scopes) for r in reqs} == {
        ("POST", "refresh_token", "docker", (f"repository:{up_repo}:pull",))
    }
    assert all(r.status == 200 and r.subject == ALICE[0] for r in reqs)

    # push of a new tag: blobs are known, only the manifest goes up
    registry.mark()
    token_server.clear_requests()
    dockerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{repo}:v2")
    pushed = dockerd.push(f"{p.host}/{repo}:v2")
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up_repo)
    assert ("PUT", f"/v2/{up_repo}/manifests/v2", 201) in [
        (e.method, e.path, e.status) for e in entries
    ]
    assert not _uploaded(entries), "blobs were uploaded again"
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert {(r.method, r.grant_type) for r in reqs} == {("POST", "refresh_token")}
    assert f"repository:{up_repo}:push,pull" in {s for r in reqs for s in r.scopes}
    assert fetch_manifest(direct, up_repo, "v2").digest == pushed

    # push of new repositories, under each rule: the layers are mounted from team/dk-...
    for new_repo, new_up in (
        (f"team/dk-{unique}/copy", f"acme_team/dk-{unique}/copy"),
        (f"dk-{unique}", f"library/dk-{unique}"),
    ):
        registry.mark()
        token_server.clear_requests()
        dockerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{new_repo}:v1")
        pushed = dockerd.push(f"{p.host}/{new_repo}:v1")
        entries = registry.access_log(since_mark=True)
        assert_only_upstream_names(entries, new_up)
        mounts = _mounts(entries, new_up)
        assert sorted(m.query["mount"][0] for m in mounts) == sorted(
            layer.digest for layer in image.layers
        ), entries
        # docker mounts from where it last saw the layers: any earlier repository
        sources = {m.query["from"][0] for m in mounts}
        assert sources and sources <= {up_repo, f"acme_team/dk-{unique}/copy"}, sources
        assert all(m.status == 201 for m in mounts), mounts
        # docker always uploads the image config; no layer went up again
        assert _uploaded(entries) <= {image.config.digest}, entries
        reqs = token_server.requests()
        assert_scopes_mapped(reqs)
        assert {(r.method, r.grant_type) for r in reqs} == {("POST", "refresh_token")}
        scopes = {s for r in reqs for s in r.scopes}
        assert f"repository:{new_up}:push,pull" in scopes
        assert {f"repository:{src}:pull" for src in sources} <= scopes  # to mount from
        assert fetch_manifest(direct, new_up, "v1").digest == pushed
    _assert_docker_spoke_tls(p)


@pytest.mark.parametrize("tls", [False, True], ids=["mitmproxy-cert", "test-ca-cert"])
def test_docker_logout_then_anonymous_pull_of_public_repo(
    dockerd, registry, token_server, proxy, make_image, http_client, unique, tls
):
    # tls=True: mitmdump serves the test CA's certificate (--certs); docker checks neither.
    p = proxy(RULES, tls=tls, extra_args=TRANSPORT_PROBE)
    up_public, public = f"acme_team/public-dk-{unique}", f"team/public-dk-{unique}"
    up_private, private = f"acme_team/dk-{unique}", f"team/dk-{unique}"
    image = make_image(layers=1, layer_size=20_000)
    direct = http_client(registry.url, ALICE)
    push_image_raw(direct, up_public, image, "v1")
    push_image_raw(direct, up_private, image, "v1")

    dockerd.login(p.host, *ALICE)
    assert dockerd.pull(f"{p.host}/{private}:v1") == image.digest
    dockerd.logout(p.host)
    assert dockerd.stored_auth(p.host) == {}
    dockerd.remove_images(f"{p.host}/{private}:v1")

    registry.mark()
    token_server.clear_requests()
    assert dockerd.pull(f"{p.host}/{public}:v1") == image.digest
    assert_only_upstream_names(registry.access_log(since_mark=True), up_public)
    assert_anonymous_pull_tokens(token_server, up_public)

    # Anonymous means anonymous: the private repository is refused, by the upstream.
    registry.mark()
    token_server.clear_requests()
    with pytest.raises(CommandError, match="denied|unauthorized"):
        dockerd.pull(f"{p.host}/{private}:v1")
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up_private)
    assert {e.status for e in entries if up_private in e.path} == {401}
    reqs = token_requests_for(token_server, up_private)
    assert reqs and all(not r.basic_auth and not r.granted for r in reqs)
    _assert_docker_spoke_tls(p)
