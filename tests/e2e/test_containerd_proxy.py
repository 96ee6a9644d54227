"""containerd (`ctr` 1.6 on a private daemon) through mitmdump + the addon.

Clients say `team/...`; the registry holds `acme_team/...` (proxycheck.RULES). `ctr --user`
fetches tokens with an OAuth2 POST (`grant_type=password`) whose form `scope` holds several
space-separated scopes, one of which comes from the challenge; anonymously it GETs (see
test_clients_direct.py for the same flows without the proxy). The nginx setup this project
replaces let ctr pull but failed every push with `insufficient_scope`, because the scopes in
the POST body were never renamed.

Both ways a client reaches the proxy are covered:
- plain HTTP (hosts.toml `server = "http://..."`), the local developer shim: the realm the
  proxy advertises must be http://127.0.0.1:PORT/auth. Were it https, ctr would speak TLS to
  mitmproxy, get mitmproxy's own certificate, and fail to verify it.
- TLS with the test CA's certificate (`mitmdump --certs`, the CA in hosts.toml): the realm
  must be https://127.0.0.1:PORT/auth.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.clients import CommandError
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
from tests.e2e.regclient import parse_challenge
from tests.e2e.upstream import ALICE, BOB

TRANSPORTS = pytest.mark.parametrize("tls", [False, True], ids=["plain-http", "tls"])


def _proxy_for_ctr(proxy, containerd, ca, http_client, tls: bool):
    """Start the proxy, point ctr's hosts.toml at it, and check the realm it advertises."""
    p = proxy(RULES, tls=tls, extra_args=TRANSPORT_PROBE)
    if tls:
        containerd.configure_host(p.host, ca=ca.ca_pem)
    else:
        containerd.configure_host(p.host, plain_http=True)
    r = http_client(p.url).raw("GET", f"{p.url}/v2/")
    assert r.status == 401
    scheme, params = parse_challenge(r.header("WWW-Authenticate") or "")
    expected = f"{'https' if tls else 'http'}://{p.host}/auth"
    assert (scheme, params.get("realm")) == ("bearer", expected), r.headers
    return p


def _assert_ctr_came_over(p, tls: bool, *token_methods: str) -> None:
    """Every request of ctr reached mitmdump over the transport hosts.toml names, the token
    requests (at the advertised realm) included."""
    transports = client_transports(p)
    scheme = "https" if tls else "http"
    # [1:]: the first request is the realm check of _proxy_for_ctr.
    assert transports[0] == (scheme, "GET", "/v2/")
    assert {s for s, _, _ in transports[1:]} == {scheme}, transports
    assert {(scheme, m, "/auth") for m in token_methods} <= set(transports), transports


def _uploaded(entries) -> set[str]:
    return {
        e.query["digest"][0]
        for e in entries
        if e.method == "PUT" and "/blobs/uploads/" in e.path and "digest" in e.query
    }


def _check_password_posts(reqs, *must_ask: str) -> None:
    """ctr asked for its tokens by OAuth2 POST grant_type=password, several scopes in one
    form value, every one of them renamed, and got them."""
    assert_scopes_mapped(reqs)
    assert reqs and all(
        (r.method, r.grant_type, r.client_id, r.status)
        == ("POST", "password", "containerd-client", 200)
        for r in reqs
    ), reqs
    assert any(len(r.scopes) >= 2 for r in reqs), [r.scopes for r in reqs]
    asked = {s for r in reqs for s in r.scopes}
    assert set(must_ask) <= asked, asked


@TRANSPORTS
def test_ctr_pull_and_push_with_credentials_through_proxy(
    containerd, registry, token_server, proxy, ca, http_client, make_image, unique, tls
):
    p = _proxy_for_ctr(proxy, containerd, ca, http_client, tls)
    up_repo, repo = f"acme_team/ctr-{unique}", f"team/ctr-{unique}"
    image = make_image(layers=2, layer_size=30_000)
    direct = http_client(registry.url, ALICE)
    push_image_raw(direct, up_repo, image, "v1")
    direct_digest = fetch_manifest(direct, up_repo, "v1").digest
    user = ":".join(BOB)

    # pull (bob may pull acme_team/*)
    registry.mark()
    token_server.clear_requests()
    containerd.pull(f"{p.host}/{repo}:v1", user=user)
    assert containerd.image_digest(f"{p.host}/{repo}:v1") == image.digest == direct_digest
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up_repo)
    fetched = {e.path.rsplit("/", 1)[1] for e in entries if "/blobs/" in e.path and e.status == 200}
    assert fetched >= set(image.blob_digests)
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert {(r.method, r.grant_type, r.client_id) for r in reqs} == {
        ("POST", "password", "containerd-client")
    }
    assert {s for r in reqs for s in r.scopes} == {f"repository:{up_repo}:pull"}
    assert all(r.status == 200 and r.granted for r in reqs)

    # push of a new tag as alice: blobs exist, the manifest goes up as it is
    user = ":".join(ALICE)
    containerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{repo}:v2")
    registry.mark()
    token_server.clear_requests()
    containerd.push(f"{p.host}/{repo}:v2", user=user)
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up_repo)
    assert ("PUT", f"/v2/{up_repo}/manifests/v2", 201) in [
        (e.method, e.path, e.status) for e in entries
    ]
    assert not _uploaded(entries), "blobs were uploaded again"
    _check_password_posts(
        token_server.requests(), f"repository:{up_repo}:pull", f"repository:{up_repo}:pull,push"
    )
    assert fetch_manifest(direct, up_repo, "v2").digest == image.digest

    # push of a new repository: ctr mounts the layers from where it pulled them
    new_repo, new_up = f"team/ctr-{unique}/copy", f"acme_team/ctr-{unique}/copy"
    containerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{new_repo}:v1")
    registry.mark()
    token_server.clear_requests()
    containerd.push(f"{p.host}/{new_repo}:v1", user=user)
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, new_up)
    mounts = [
        e
        for e in entries
        if e.method == "POST" and e.path == f"/v2/{new_up}/blobs/uploads/" and "mount" in e.query
    ]
    assert sorted(m.query["mount"][0] for m in mounts) == sorted(image.blob_digests), entries
    assert {m.query["from"][0] for m in mounts} == {up_repo}
    assert all(m.status == 201 for m in mounts), mounts
    assert not _uploaded(entries), "blobs were uploaded instead of mounted"
    _check_password_posts(
        token_server.requests(),
        f"repository:{new_up}:pull,push",
        f"repository:{up_repo}:pull",
    )
    assert fetch_manifest(direct, new_up, "v1").digest == image.digest
    _assert_ctr_came_over(p, tls, "POST")


@TRANSPORTS
def test_ctr_anonymous_pull_of_public_repo_through_proxy(
    containerd, registry, token_server, proxy, ca, http_client, make_image, unique, tls
):
    p = _proxy_for_ctr(proxy, containerd, ca, http_client, tls)
    up_public, public = f"acme_team/public-ctr-{unique}", f"team/public-ctr-{unique}"
    up_private, private = f"acme_team/ctr-{unique}", f"team/ctr-{unique}"
    image = make_image(layers=1, layer_size=20_000)
    direct = http_client(registry.url, ALICE)
    push_image_raw(direct, up_public, image, "v1")
    push_image_raw(direct, up_private, image, "v1")

    registry.mark()
    token_server.clear_requests()
    containerd.pull(f"{p.host}/{public}:v1")
    assert containerd.image_digest(f"{p.host}/{public}:v1") == image.digest
    assert_only_upstream_names(registry.access_log(since_mark=True), up_public)
    assert_anonymous_pull_tokens(token_server, up_public)

    # Anonymous may neither pull the private repository nor push anywhere.
    registry.mark()
    token_server.clear_requests()
    with pytest.raises(CommandError, match="insufficient_scope|unauthorized|denied"):
        containerd.pull(f"{p.host}/{private}:v1")
    containerd.tag(f"{p.host}/{public}:v1", f"{p.host}/{public}:v2")
    with pytest.raises(CommandError, match="insufficient_scope|unauthorized|denied"):
        containerd.push(f"{p.host}/{public}:v2")
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, up_private, up_public)
    writes = [e for e in entries if e.method in ("POST", "PUT", "PATCH", "DELETE")]
    assert all(e.status == 401 for e in writes), writes  # the upstream refused each one
    reqs = token_requests_for(token_server, up_private, up_public)
    assert_scopes_mapped(reqs)
    assert all(not r.basic_auth and r.subject is None for r in reqs)
    assert not [g for r in reqs for g in r.granted if "push" in g["actions"]]
    _assert_ctr_came_over(p, tls, "GET")


def test_ctr_push_mounting_from_a_name_the_rules_no_longer_map(
    containerd, registry, token_server, proxy, ca, http_client, make_image, unique, tmp_path
):
    """ctr remembers where it pulled layers from and asks to mount from there on push. When
    the rules changed since, the proxy cannot map that source: it must ask the upstream for a
    plain upload (as a registry that cannot mount answers 202), not refuse the POST, which
    fails ctr's whole push ("unexpected status: 404")."""
    legacy = RULES + '  - client: "legacy/{r:path}"\n    upstream: "library/legacy/{r:path}"\n'
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(legacy)
    p = proxy(rules_file=rules_file)
    containerd.configure_host(p.host, plain_http=True)
    old, old_up = f"legacy/ctr-{unique}", f"library/legacy/ctr-{unique}"
    new, new_up = f"team/ctr-{unique}/moved", f"acme_team/ctr-{unique}/moved"
    image = make_image(layers=2, layer_size=20_000)
    push_image_raw(http_client(registry.url, ALICE), old_up, image, "v1")
    user = ":".join(ALICE)
    containerd.pull(f"{p.host}/{old}:v1", user=user)

    rules_file.write_text(RULES)  # the legacy rule is gone
    deadline = time.monotonic() + 15
    while "reloaded 2 rules" not in p.log_text():
        assert time.monotonic() < deadline, p.log_text()
        time.sleep(0.2)

    containerd.tag(f"{p.host}/{old}:v1", f"{p.host}/{new}:v1")
    registry.mark()
    token_server.clear_requests()
    containerd.push(f"{p.host}/{new}:v1", user=user)
    entries = registry.access_log(since_mark=True)
    assert_only_upstream_names(entries, new_up)
    assert old_up not in {n for e in entries for n in e.query.get("from", [])}
    assert _uploaded(entries) == set(image.blob_digests)  # uploaded, since not mounted
    starts = [e for e in entries if e.method == "POST" and e.path.endswith("/blobs/uploads/")]
    assert starts and all(e.status == 202 and not e.query for e in starts), starts
    assert fetch_manifest(http_client(registry.url, ALICE), new_up, "v1").digest == image.digest
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert not [s for r in reqs for s in r.scopes if "legacy" in s]
