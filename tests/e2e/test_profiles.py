"""Each hosted registry's quirks (tests/e2e/profiles.py) through mitmdump + the addon, with
real clients (skopeo, ctr, docker) and raw HTTP.

Every test asserts three things: what reached the registry (the front: upstream names
only), what reached its token service (mapped scopes, its own service string, untouched
actions), and what the client saw (client names only, redirects and rate-limit headers as
the registry sent them). Sources for each registry's behaviour are in profiles.PROFILES.
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from tests.e2e.clients import (
    CONTAINERD_TOOLS,
    DOCKER_TOOLS,
    Containerd,
    Dockerd,
    require_tools,
)
from tests.e2e.images import digest_of, fetch_manifest
from tests.e2e.profiles import ACR_SERVICE, PROFILES, RATE_LIMITED_MARK, Front
from tests.e2e.proxycheck import push_image_raw
from tests.e2e.regclient import parse_challenge
from tests.e2e.upstream import ALICE

# Client prefix -> upstream prefix, per profile. The upstream side lives where the
# session's ACL lets alice push (acme_team/*, library/*).
NAMES = {
    "acr": ("team", "acme_team"),
    "hub": ("hub", "library"),
    "ghcr": ("gh", "acme_team/gh"),
    "quay": ("quay", "acme_team/quay"),
    "gar": ("gar", "acme_team/gar"),
    "azure": ("az", "acme_team/az"),
    "ecr": ("ecr", "acme_team/ecr"),
}


def rules_for(key: str) -> str:
    client, upstream = NAMES[key]
    if key == "hub":
        # Docker Hub's implicit library/: one path component.
        return f"""
unmatched: deny
rules:
  - client: "hub/{{name}}"
    upstream: "library/{{name}}"
"""
    return f"""
unmatched: deny
rules:
  - client: "{client}/{{r:path}}"
    upstream: "{upstream}/{{r:path}}"
"""


def names(key: str, unique: str) -> tuple[str, str]:
    """(client name, upstream name) of a fresh repository for one test."""
    client, upstream = NAMES[key]
    leaf = f"app-{unique}"
    return f"{client}/{leaf}", f"{upstream}/{leaf}"


ALL = pytest.mark.parametrize("key", list(PROFILES))


@pytest.fixture
def front(ca, registry, token_server):
    started: list[Front] = []

    def start(key: str) -> Front:
        f = Front(PROFILES[key], ca, registry, token_server).start()
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


def _basic(creds) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def assert_front_saw_only(f: Front, key: str, *must: str) -> None:
    """Only upstream names reached the registry host, and each of `must` did."""
    prefix = NAMES[key][1] + "/"
    seen = f.names_seen()
    wrong = sorted(n for n in seen if not n.startswith(prefix))
    assert not wrong, f"client names reached {key}: {wrong}"
    assert set(must) <= seen, (must, seen)


def assert_tokens_mapped(f: Front, key: str) -> None:
    """Every scope that reached the token service names an upstream repository, with this
    registry's own service string; ECR has no token service and got nothing."""
    if PROFILES[key].basic_only:
        assert not f.token_requests
        return
    assert f.token_requests, "no token request reached the token service"
    prefix = NAMES[key][1] + "/"
    for r in f.token_requests:
        for s in r.scopes:
            if s.startswith("repository"):
                assert s.split(":", 1)[1].startswith(prefix), (s, r)
        assert r.service in (PROFILES[key].service, None), r


def assert_redirects_followed(f: Front, key: str, digests) -> None:
    """The client itself fetched the blobs from the storage host (the proxy passed the
    redirect on, did not follow it)."""
    if not PROFILES[key].redirect_status:
        assert not f.storage_requests
        return
    fetched = {r.path for r in f.storage_requests if r.status == 200}
    for d in digests:
        assert any(d.split(":", 1)[1] in path for path in fetched), (d, fetched)


# --------------------------------------------------------------------------------------
# skopeo: push and pull, every profile
# --------------------------------------------------------------------------------------


@ALL
def test_skopeo_push_pull(key, front, proxy, skopeo, make_image, ca, tmp_path, unique):
    f = front(key)
    p = proxy(rules_for(key), upstream=f.url, tls=True)
    repo, up = names(key, unique)
    image = make_image(layers=2, layer_size=30_000)

    skopeo.copy(image.ref, f"docker://{p.host}/{repo}:v1", dest_creds=ALICE)
    assert_front_saw_only(f, key, up)
    assert ("PUT", f"/v2/{up}/manifests/v1", 201) in [
        (r.method, r.path, r.status) for r in f.requests
    ]
    assert_tokens_mapped(f, key)

    f.clear()
    out = tmp_path / "pulled"
    skopeo.copy(f"docker://{p.host}/{repo}:v1", f"oci:{out}:v1", src_creds=ALICE)
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest
    assert_front_saw_only(f, key, up)
    assert_tokens_mapped(f, key)
    assert_redirects_followed(f, key, [layer.digest for layer in image.layers])
    assert skopeo.list_tags(f"docker://{p.host}/{repo}", creds=ALICE) == ["v1"]


# --------------------------------------------------------------------------------------
# containerd: pull and push, every profile
# --------------------------------------------------------------------------------------


@pytest.fixture
def containerd(registry):
    require_tools(*CONTAINERD_TOOLS)
    with Containerd() as c:
        yield c


@ALL
def test_ctr_pull_push(key, front, proxy, containerd, make_image, ca, http_client, unique):
    f = front(key)
    p = proxy(rules_for(key), upstream=f.url, tls=True)
    containerd.configure_host(p.host, ca=ca.ca_pem)
    repo, up = names(key, unique)
    image = make_image(layers=2, layer_size=30_000)
    push_image_raw(http_client(f"https://{f.registry.host}", ALICE), up, image, "v1")
    user = ":".join(ALICE)

    containerd.pull(f"{p.host}/{repo}:v1", user=user)
    assert containerd.image_digest(f"{p.host}/{repo}:v1") == image.digest
    assert_front_saw_only(f, key, up)
    assert_tokens_mapped(f, key)
    assert_redirects_followed(f, key, [layer.digest for layer in image.layers])
    if not PROFILES[key].basic_only:
        # containerd asks with an OAuth2 POST (grant_type=password), as BuildKit does.
        assert {(r.method, r.grant_type) for r in f.token_requests} == {("POST", "password")}

    f.clear()
    containerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{repo}:v2")
    containerd.push(f"{p.host}/{repo}:v2", user=user)
    assert ("PUT", f"/v2/{up}/manifests/v2", 201) in [
        (r.method, r.path, r.status) for r in f.requests
    ]
    assert_front_saw_only(f, key, up)
    assert_tokens_mapped(f, key)
    if PROFILES[key].basic_only:
        assert {r.auth for r in f.requests if r.status < 400} == {"Basic"}
