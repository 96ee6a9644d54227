"""Real docker and containerd clients straight against the token-auth registry (no proxy).

These pin down what the clients themselves do (token flows, scopes, TLS trust, upload
patterns), so the proxy tests can tell client quirks from proxy bugs. ACL of the shared
registry (upstream.default_acl): alice pushes acme_team/*, bob pulls acme_team/*, anyone
pulls acme_team/public*.
"""

from __future__ import annotations

import base64

import pytest

from tests.e2e.clients import (
    CONTAINERD_TOOLS,
    DOCKER_TOOLS,
    CommandError,
    Containerd,
    Dockerd,
    require_tools,
    write_image_archive,
)
from tests.e2e.upstream import ALICE, BOB


@pytest.fixture
def dockerd(registry):
    require_tools(*DOCKER_TOOLS)
    with Dockerd() as d:
        yield d


@pytest.fixture
def containerd(registry, ca):
    require_tools(*CONTAINERD_TOOLS)
    with Containerd() as c:
        c.configure_host(registry.host, ca=ca.ca_pem)
        yield c


def _token_requests(token_server, repo: str):
    """Token requests whose scopes mention `repo` (the token server is shared by all tests)."""
    return [r for r in token_server.requests() if any(f":{repo}:" in s for s in r.scopes)]


def test_docker_login_push_pull_logout(dockerd, registry, token_server, tmp_path, unique):
    repo = f"acme_team/dk-{unique}"
    ref = f"{registry.host}/{repo}:v1"
    write_image_archive(tmp_path / "img.tar", [ref], seed=unique)
    assert dockerd.load_image(tmp_path / "img.tar") == [ref]

    # login: GET + Basic, offline_token=true, client_id=docker, no scope
    token_server.clear_requests()
    dockerd.login(registry.host, *ALICE)
    (login,) = [r for r in token_server.requests() if r.account == ALICE[0]]
    assert (login.method, login.basic_auth, login.offline, login.client_id, login.scopes) == (
        "GET", True, True, "docker", (),
    )  # fmt: skip
    # The refresh token replaces the password in config.json.
    stored = dockerd.stored_auth(registry.host)
    assert stored["identitytoken"]
    assert base64.b64decode(stored["auth"]) == f"{ALICE[0]}:".encode()

    # push: OAuth2 POST with the refresh token (not the password)
    token_server.clear_requests()
    pushed = dockerd.push(ref)
    reqs = _token_requests(token_server, repo)
    assert reqs and all(
        (r.method, r.grant_type, r.client_id) == ("POST", "refresh_token", "docker") for r in reqs
    )
    assert f"repository:{repo}:push,pull" in reqs[0].scopes
    assert ("PUT", f"/v2/{repo}/manifests/v1") in registry.requests()

    # pull into a daemon without the image
    dockerd.remove_images(ref)
    token_server.clear_requests()
    assert dockerd.pull(ref) == pushed
    reqs = _token_requests(token_server, repo)
    assert {(r.method, r.grant_type, r.scopes) for r in reqs} == {
        ("POST", "refresh_token", (f"repository:{repo}:pull",))
    }

    # logout: anonymous again, and anonymous may not pull acme_team/dk-*
    dockerd.logout(registry.host)
    assert dockerd.stored_auth(registry.host) == {}
    dockerd.remove_images(ref)
    with pytest.raises(CommandError, match="denied"):
        dockerd.pull(ref)


def test_docker_trusts_any_tls_cert_on_loopback(dockerd, registry):
    """dockerd treats 127.0.0.0/8 as an insecure registry: no CA is installed anywhere, yet
    TLS to the registry (and its token server) works, because it is not verified at all."""
    assert registry.url.startswith("https://")
    dockerd.login(registry.host, *BOB)  # would fail on an unverifiable certificate otherwise


def test_docker_pull_only_user_cannot_push(dockerd, registry, tmp_path, unique):
    ref = f"{registry.host}/acme_team/dk-{unique}:v1"
    write_image_archive(tmp_path / "img.tar", [ref], seed=unique)
    dockerd.load_image(tmp_path / "img.tar")
    dockerd.login(registry.host, *BOB)
    with pytest.raises(CommandError, match="denied"):
        dockerd.push(ref)


def test_docker_cross_repo_push_mounts_blobs(dockerd, registry, token_server, tmp_path, unique):
    """A second push of the same layers to another repository asks for pull on the first
    repository too and mounts the layer (POST ...?mount=DIGEST&from=REPO) instead of uploading.
    A proxy that renames repositories has to rename the `from` parameter and that scope."""
    src, dst = f"acme_team/dk-{unique}", f"acme_team/dk-{unique}-copy"
    write_image_archive(tmp_path / "img.tar", [f"{registry.host}/{src}:v1"], seed=unique)
    dockerd.load_image(tmp_path / "img.tar")
    dockerd.login(registry.host, *ALICE)
    dockerd.push(f"{registry.host}/{src}:v1")
    dockerd.tag(f"{registry.host}/{src}:v1", f"{registry.host}/{dst}:v1")

    token_server.clear_requests()
    registry.mark()
    dockerd.push(f"{registry.host}/{dst}:v1")
    scopes = {s for r in _token_requests(token_server, dst) for s in r.scopes}
    assert f"repository:{src}:pull" in scopes
    mounts = [
        e
        for e in registry.access_log(since_mark=True)
        if e.method == "POST" and e.query.get("from") == [src]
    ]
    assert mounts and mounts[0].path == f"/v2/{dst}/blobs/uploads/"
    assert mounts[0].status == 201  # mounted, nothing uploaded


def test_ctr_push_pull_with_credentials(containerd, registry, token_server, tmp_path, unique):
    repo = f"acme_team/ctr-{unique}"
    ref = f"{registry.host}/{repo}:v1"
    write_image_archive(tmp_path / "img.tar", [ref], seed=unique)
    assert ref in containerd.import_image(tmp_path / "img.tar")
    local_digest = containerd.image_digest(ref)

    with pytest.raises(CommandError, match="insufficient_scope"):
        containerd.push(ref)  # anonymous

    # --user: OAuth2 POST grant_type=password, client_id=containerd-client
    token_server.clear_requests()
    containerd.push(ref, user=":".join(ALICE))
    reqs = _token_requests(token_server, repo)
    assert reqs and all(
        (r.method, r.grant_type, r.client_id) == ("POST", "password", "containerd-client")
        for r in reqs
    )
    assert {f"repository:{repo}:pull", f"repository:{repo}:pull,push"} <= set(reqs[0].scopes)
    assert ("PUT", f"/v2/{repo}/manifests/v1") in registry.requests()

    containerd.remove_images(ref)
    with pytest.raises(CommandError, match="insufficient_scope"):
        containerd.pull(ref)  # anonymous may not pull acme_team/ctr-*
    containerd.pull(ref, user=":".join(BOB))
    assert containerd.image_digest(ref) == local_digest


def test_ctr_anonymous_pull_of_public_repo(containerd, registry, token_server, tmp_path, unique):
    repo = f"acme_team/public-ctr-{unique}"
    ref = f"{registry.host}/{repo}:v1"
    write_image_archive(tmp_path / "img.tar", [ref], seed=unique)
    containerd.import_image(tmp_path / "img.tar")
    containerd.push(ref, user=":".join(ALICE))
    containerd.remove_images(ref)

    token_server.clear_requests()
    containerd.pull(ref)
    reqs = _token_requests(token_server, repo)
    assert reqs and all((r.method, r.basic_auth, r.subject) == ("GET", False, None) for r in reqs)


def test_ctr_verifies_tls(containerd, registry, tmp_path, unique):
    """Unlike dockerd, ctr checks the certificate: without the test CA in hosts.toml it fails."""
    containerd.configure_host(registry.host)  # no CA
    with pytest.raises(CommandError, match="x509"):
        containerd.pull(f"{registry.host}/acme_team/public-none-{unique}:v1")
