"""The end-to-end infrastructure itself, without the addon.

If these fail, proxy tests cannot be trusted: they prove that the token server issues
tokens distribution accepts, that ACLs bite, that skopeo's isolation works and that the
registry log tells which repositories were touched (including cross-repository mounts).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.e2e.images import fetch_manifest, manifest_digest
from tests.e2e.upstream import (
    ALICE,
    BOB,
    SYSTEM_BLOB_INFO_CACHE,
    SkopeoError,
    TokenServer,
    decode_jwt_claims,
)


def _token_call(token_server, ca, *, query=None, form=None, basic=None):
    """Call the token server directly; returns (status, parsed JSON body)."""
    url = token_server.realm
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if form is not None else "GET")
    if basic:
        req.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    try:
        with urllib.request.urlopen(req, context=ca.client_context(), timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_push_inspect_and_list_tags_as_alice(registry, token_server, skopeo, make_image, unique):
    repo = f"acme_team/{unique}/app"
    image = make_image(layers=3, layer_size=10_000)
    token_server.clear_requests()

    skopeo.copy(image.ref, f"docker://{registry.host}/{repo}:v1", dest_creds=ALICE)
    skopeo.copy(image.ref, f"docker://{registry.host}/{repo}:v2", dest_creds=ALICE)

    info = skopeo.inspect(f"docker://{registry.host}/{repo}:v1", creds=ALICE)
    assert info["Digest"] == image.digest
    assert info["Layers"] == [layer.digest for layer in image.layers]
    raw = skopeo.inspect(f"docker://{registry.host}/{repo}:v2", creds=ALICE, raw=True)
    assert raw == image.manifest_bytes
    assert sorted(skopeo.list_tags(f"docker://{registry.host}/{repo}", creds=ALICE)) == [
        "v1",
        "v2",
    ]

    # Every request of ours reached the registry under the name we used.
    assert registry.repositories_seen() >= {repo}
    puts = [u for m, u in registry.requests() if m == "PUT" and u.startswith(f"/v2/{repo}/")]
    assert f"/v2/{repo}/manifests/v1" in puts

    # Token requests: Basic auth, the registry's service, push+pull asked for and granted.
    push_requests = [
        r for r in token_server.requests() if f"repository:{repo}:pull,push" in r.scopes
    ]
    assert push_requests, token_server.requests()
    for r in push_requests:
        assert r.basic_auth and r.service == "test-registry" and r.subject == "alice"
        assert {"type": "repository", "name": repo, "actions": ["pull", "push"]} in r.granted


def test_manifest_digest_direct(registry, skopeo, make_image, http_client, unique):
    repo = f"acme_team/{unique}/digest"
    image = make_image()
    skopeo.copy(image.ref, f"docker://{registry.host}/{repo}:latest", dest_creds=ALICE)

    client = http_client(registry.url, ALICE)
    fetched = fetch_manifest(client, repo, "latest")
    assert fetched.digest == fetched.header_digest == image.digest
    assert fetched.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert manifest_digest(client, repo, image.digest) == image.digest


def test_multi_arch_index(registry, skopeo, make_index, http_client, unique):
    repo = f"acme_team/{unique}/multi"
    index = make_index()
    skopeo.copy(
        index.ref, f"docker://{registry.host}/{repo}:multi", dest_creds=ALICE, all_images=True
    )

    raw = skopeo.inspect(f"docker://{registry.host}/{repo}:multi", creds=ALICE, raw=True)
    assert raw == index.index_bytes
    client = http_client(registry.url, ALICE)
    assert manifest_digest(client, repo, "multi") == index.digest
    for arch in ("amd64", "arm64"):
        child = index.image_for(arch)
        assert manifest_digest(client, repo, child.digest) == child.digest
        config = client.request("GET", f"/v2/{repo}/blobs/{child.config.digest}")
        assert config.status == 200
        assert json.loads(config.body)["architecture"] == arch


def test_cross_repo_mount_shows_in_registry_log(registry, token_server, skopeo, make_image, unique):
    first, second = f"acme_team/{unique}/first", f"acme_team/{unique}/second"
    image = make_image(layers=2)
    skopeo.copy(image.ref, f"docker://{registry.host}/{first}:v1", dest_creds=ALICE)
    registry.mark()
    token_server.clear_requests()

    skopeo.copy(image.ref, f"docker://{registry.host}/{second}:v1", dest_creds=ALICE)

    entries = registry.access_log(since_mark=True)
    mounts = [
        e
        for e in entries
        if e.method == "POST"
        and e.path == f"/v2/{second}/blobs/uploads/"
        and e.query.get("from") == [first]
    ]
    # skopeo learnt from its (private, fresh) blob-info cache that `first` holds the
    # layers, and distribution linked them instead of accepting an upload.
    assert sorted(m.query["mount"][0] for m in mounts) == sorted(
        layer.digest for layer in image.layers
    )
    assert all(m.status == 201 for m in mounts), mounts
    layer_uploads = [
        e for e in entries if e.method == "PATCH" and e.path.startswith(f"/v2/{second}/")
    ]
    assert len(layer_uploads) <= 1  # at most the config blob is uploaded again
    # The mount needs a token for both repositories.
    scopes = token_server.requested_scopes()
    assert f"repository:{second}:pull,push" in scopes
    assert f"repository:{first}:pull" in scopes
    assert skopeo.cache_files(), "skopeo did not use the private blob-info cache"


def test_skopeo_blob_info_cache_is_private(registry, skopeo, make_image, unique):
    host_cache = SYSTEM_BLOB_INFO_CACHE / "blob-info-cache-v1.boltdb"
    before = host_cache.stat().st_mtime_ns if host_cache.exists() else None

    image = make_image(layers=1)
    skopeo.copy(image.ref, f"docker://{registry.host}/acme_team/{unique}/c:v1", dest_creds=ALICE)

    assert [p.name for p in skopeo.cache_files()] == ["blob-info-cache-v1.boltdb"]
    after = host_cache.stat().st_mtime_ns if host_cache.exists() else None
    assert after == before, "skopeo wrote the machine-wide blob-info cache"


def test_anonymous_pull_of_public_repo_and_refused_push(
    registry, token_server, skopeo, make_image, unique
):
    public = f"acme_team/public-{unique}"
    image = make_image(layers=1)
    skopeo.copy(image.ref, f"docker://{registry.host}/{public}:v1", dest_creds=ALICE)
    token_server.clear_requests()

    info = skopeo.inspect(f"docker://{registry.host}/{public}:v1", anonymous=True)
    assert info["Digest"] == image.digest
    anon = [r for r in token_server.requests() if not r.basic_auth]
    assert anon and all(r.subject is None for r in anon)
    assert any(r.granted for r in anon)

    registry.mark()
    other = make_image(layers=1)
    with pytest.raises(SkopeoError) as err:
        skopeo.copy(other.ref, f"docker://{registry.host}/{public}:v2", dest_anonymous=True)
    assert "unauthorized" in err.value.stderr.lower() or "denied" in err.value.stderr.lower()
    wrote = [e for e in registry.access_log(since_mark=True) if e.method in ("PUT", "PATCH")]
    assert all(e.status >= 400 for e in wrote), wrote
    # The token server was asked for push, but only pull was granted.
    asked = [r for r in token_server.requests() if f"repository:{public}:pull,push" in r.scopes]
    assert asked
    for r in asked:
        assert {"type": "repository", "name": public, "actions": ["pull"]} in r.granted

    # Not public: anonymous pull is refused.
    private = f"acme_team/{unique}/private"
    skopeo.copy(image.ref, f"docker://{registry.host}/{private}:v1", dest_creds=ALICE)
    with pytest.raises(SkopeoError):
        skopeo.inspect(f"docker://{registry.host}/{private}:v1", anonymous=True)


def test_skopeo_login_and_delete(registry, skopeo, make_image, unique):
    repo = f"acme_team/{unique}/login"
    image = make_image(layers=1)
    skopeo.login(registry.host, ALICE)
    # The credentials went to the private auth file, and later commands find them there.
    assert registry.host in json.loads(skopeo.authfile.read_text())["auths"]
    skopeo.copy(image.ref, f"docker://{registry.host}/{repo}:v1")
    assert skopeo.list_tags(f"docker://{registry.host}/{repo}") == ["v1"]

    registry.mark()
    skopeo.delete(f"docker://{registry.host}/{repo}:v1")
    deletes = [e for e in registry.access_log(since_mark=True) if e.method == "DELETE"]
    assert [(e.path, e.status) for e in deletes] == [(f"/v2/{repo}/manifests/{image.digest}", 202)]
    with pytest.raises(SkopeoError):
        skopeo.inspect(f"docker://{registry.host}/{repo}:v1")


def test_push_outside_acl_is_refused(registry, skopeo, make_image, unique):
    image = make_image(layers=1)
    for creds, repo in ((ALICE, f"other_team/{unique}/app"), (BOB, f"acme_team/{unique}/bob")):
        registry.mark()
        with pytest.raises(SkopeoError):
            skopeo.copy(image.ref, f"docker://{registry.host}/{repo}:v1", dest_creds=creds)
        manifest_puts = [
            e for e in registry.access_log(since_mark=True) if e.method == "PUT" and e.status < 400
        ]
        assert manifest_puts == []


def test_token_server_get_and_oauth_flows(registry, token_server, ca, http_client, unique):
    repo = f"acme_team/{unique}/tok"
    other = f"acme_team/{unique}/tok2"

    # GET: repeated scope params, one of them holding two scopes; one scope is denied.
    status, body = _token_call(
        token_server,
        ca,
        query=[
            ("service", "test-registry"),
            ("account", "alice"),
            ("offline_token", "true"),
            ("scope", f"repository:{repo}:pull,push repository:{other}:pull"),
            ("scope", "repository:forbidden/x:pull,push"),
            ("scope", "registry:catalog:*"),
        ],
        basic="alice:alice-secret",
    )
    assert status == 200
    assert body["token"] == body["access_token"] and body["refresh_token"]
    claims = decode_jwt_claims(body["token"])
    assert claims["aud"] == "test-registry" and claims["sub"] == "alice"
    assert claims["iss"] == token_server.issuer
    assert claims["access"] == [
        {"type": "repository", "name": repo, "actions": ["pull", "push"]},
        {"type": "repository", "name": other, "actions": ["pull"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]
    last = token_server.requests()[-1]
    assert last.scopes == (
        f"repository:{repo}:pull,push",
        f"repository:{other}:pull",
        "repository:forbidden/x:pull,push",
        "registry:catalog:*",
    )
    assert last.basic_auth and last.offline and last.account == "alice"

    # Wrong password: 401 with a JSON body, and the request is still recorded.
    status, body = _token_call(
        token_server, ca, query=[("service", "test-registry")], basic="alice:nope"
    )
    assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED"
    assert token_server.requests()[-1].status == 401

    # OAuth2 password grant, then a refresh-token grant for another scope.
    status, body = _token_call(
        token_server,
        ca,
        form={
            "grant_type": "password",
            "username": "alice",
            "password": "alice-secret",
            "service": "test-registry",
            "client_id": "e2e",
            "access_type": "offline",
            "scope": f"repository:{repo}:pull,push",
        },
    )
    assert status == 200 and body["refresh_token"]
    refresh = body["refresh_token"]
    status, body = _token_call(
        token_server,
        ca,
        form={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": "test-registry",
            "client_id": "e2e",
            "scope": f"repository:{other}:pull registry:catalog:*",
        },
    )
    assert status == 200
    assert decode_jwt_claims(body["access_token"])["access"][0]["name"] == other
    recorded = token_server.requests()[-1]
    assert recorded.grant_type == "refresh_token" and recorded.client_id == "e2e"
    assert recorded.scopes == (f"repository:{other}:pull", "registry:catalog:*")
    assert not recorded.basic_auth

    # distribution accepts the refreshed token (catalog needs registry:catalog:*).
    client = http_client(registry.url)
    catalog = client.raw(
        "GET", registry.url + "/v2/_catalog", {"Authorization": f"Bearer {body['token']}"}, None
    )
    assert catalog.status == 200, catalog.body
    assert "repositories" in catalog.json()

    status, body = _token_call(
        token_server, ca, form={"grant_type": "refresh_token", "refresh_token": "bogus"}
    )
    assert status == 401
    status, body = _token_call(token_server, ca, form={"grant_type": "password", "username": "x"})
    assert status == 401


def test_catalog_only_for_alice(registry, http_client):
    alice = http_client(registry.url, ALICE)
    response = alice.request("GET", "/v2/_catalog")
    assert response.status == 200
    challenge = alice.history[0].header("WWW-Authenticate")
    assert 'scope="registry:catalog:*"' in challenge

    bob = http_client(registry.url, BOB)
    assert bob.request("GET", "/v2/_catalog").status == 401


def test_registry_rejects_token_from_foreign_key(registry, token_server, ca, http_client):
    # Guards against a registry that accepts anything: a token signed by another key
    # (same kid, same claims) must be refused.
    impostor = TokenServer(ca, token_server.acl, issuer=token_server.issuer)
    impostor.key_id = token_server.key_id
    token, _ = impostor.issue("alice", "test-registry", ["registry:catalog:*"])
    client = http_client(registry.url)
    response = client.raw(
        "GET", registry.url + "/v2/_catalog", {"Authorization": f"Bearer {token}"}, None
    )
    assert response.status == 401
    genuine, _ = token_server.issue("alice", "test-registry", ["registry:catalog:*"])
    response = client.raw(
        "GET", registry.url + "/v2/_catalog", {"Authorization": f"Bearer {genuine}"}, None
    )
    assert response.status == 200


def test_mitmdump_launcher_without_addon(
    proxy, registry, token_server, skopeo, make_image, unique, ca
):
    # The launcher itself (ports, TLS to the client with the test CA, upstream
    # verification) works with no script loaded: mitmdump is a plain reverse proxy then.
    repo = f"acme_team/{unique}/through"
    image = make_image(layers=1)
    plain = proxy(tls=False, addon=None)
    secure = proxy(tls=True, addon=None)
    assert plain.url.startswith("http://") and secure.url.startswith("https://")

    skopeo.copy(image.ref, f"docker://{secure.host}/{repo}:v1", dest_creds=ALICE)
    assert skopeo.inspect(f"docker://{secure.host}/{repo}:v1", creds=ALICE)["Digest"] == (
        image.digest
    )
    # The client sees our leaf certificate, signed by the test CA.
    pem = ssl.get_server_certificate(("127.0.0.1", secure.port))
    assert pem.strip() == ca.cert_pem.read_text().strip()

    # Plain HTTP on the other one; the registry's challenge comes through untouched.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(plain.url + "/v2/", timeout=30)
    assert err.value.code == 401
    assert token_server.realm in err.value.headers["WWW-Authenticate"]
