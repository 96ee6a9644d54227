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
    DOCKER_TOOLS,
    CommandError,
    Dockerd,
    require_tools,
)
from tests.e2e.images import digest_of
from tests.e2e.profiles import ACR_SERVICE, PROFILES, RATE_LIMITED_MARK, Front
from tests.e2e.proxycheck import push_image_raw
from tests.e2e.regclient import parse_challenge
from tests.e2e.upstream import ALICE, SkopeoError

# Client prefix -> upstream prefix, per profile. The upstream side lives where the
# session's ACL lets alice push (acme_team/*, library/*) and anyone pull
# (acme_team/public*).
NAMES = {
    "acr": ("team", "acme_team"),
    "hub": ("hub", "library"),
    "ghcr": ("gh", "acme_team"),
    "quay": ("quay", "acme_team"),
    "gar": ("gar", "acme_team"),
    "azure": ("az", "acme_team"),
    "ecr": ("ecr", "acme_team"),
}


HUB_PAIR = """
unmatched: deny
rules:
  - client: "hub/{name}"
    upstream: "library/{name}"
  - client: "hub/{org}/{name}"
    upstream: "{org}/{name}"
"""

# The same pair as a read-only mirror: nothing is ever written through the proxy.
HUB_MIRROR = """
unmatched: deny
rules:
  - client: "hub/{name}"
    upstream: "library/{name}"
    actions: [pull]
  - client: "hub/{org}/{name}"
    upstream: "{org}/{name}"
    actions: [pull]
"""


def rules_for(key: str) -> str:
    client, upstream = NAMES[key]
    if key == "hub":
        # Docker Hub's implicit library/ for one-component names, other namespaces as
        # they are: hub/nginx <-> library/nginx, hub/bitnami/redis <-> bitnami/redis.
        return HUB_PAIR

    return f"""
unmatched: deny
rules:
  - client: "{client}/{{r:path}}"
    upstream: "{upstream}/{{r:path}}"
"""


def names(key: str, unique: str, public: bool = False) -> tuple[str, str]:
    """(client name, upstream name) of a fresh repository for one test; `public` ones
    anyone may pull."""
    client, upstream = NAMES[key]
    if public:
        if key == "hub":
            return f"hub/acme_team/public-{unique}", f"acme_team/public-{unique}"
        return f"{client}/public-{key}-{unique}", f"{upstream}/public-{key}-{unique}"
    leaf = f"app-{key}-{unique}"
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
    prefixes = ("acme_team/", "library/")
    seen = f.names_seen()
    wrong = sorted(n for n in seen if not n.startswith(prefixes))
    assert not wrong, f"client names reached {key}: {wrong}"
    assert set(must) <= seen, (must, seen)


def assert_tokens_mapped(f: Front, key: str) -> None:
    """Every scope that reached the token service names an upstream repository, with this
    registry's own service string; ECR has no token service and got nothing."""
    if PROFILES[key].basic_only:
        assert not f.token_requests
        return
    assert f.token_requests, "no token request reached the token service"
    for r in f.token_requests:
        for s in r.scopes:
            if s.startswith("repository"):
                assert s.split(":", 1)[1].startswith(("acme_team/", "library/")), (s, r)
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
    if key == "hub":
        # hub/<org>/<name> as well as hub/<name> (library/)
        org_repo, org_up = f"hub/acme_team/org-{unique}", f"acme_team/org-{unique}"
        push_image_raw(http_client(f"https://{f.registry.host}", ALICE), org_up, image, "v1")
        containerd.pull(f"{p.host}/{org_repo}:v1", user=user)
        assert containerd.image_digest(f"{p.host}/{org_repo}:v1") == image.digest
        assert org_up in f.names_seen()
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


# --------------------------------------------------------------------------------------
# Each registry's own quirks, by raw HTTP through the proxy
# --------------------------------------------------------------------------------------


def _seed(f: Front, http_client, up: str, image, tag: str = "v1") -> None:
    """Push an image straight into the registry behind the front."""
    push_image_raw(http_client(f"https://{f.registry.host}", ALICE), up, image, tag)


def _challenge(response) -> dict[str, str]:
    """The Bearer challenge's parameters; a scope's actions in a stable order (the
    registry lists them in whatever order its access records came)."""
    scheme, params = parse_challenge(response.header("WWW-Authenticate") or "")
    assert scheme == "bearer", response.headers
    if "scope" in params:
        params["scope"] = " ".join(
            f"{s.rsplit(':', 1)[0]}:{','.join(sorted(s.rsplit(':', 1)[1].split(',')))}"
            for s in params["scope"].split(" ")
        )
    return params


def _blob_redirect(f: Front, client, repo: str, digest: str, status: int):
    """GET a blob through the proxy: the registry's redirect reaches the client exactly as
    sent, and nothing reached the storage host until the client followed it itself."""
    r = client.request("GET", f"/v2/{repo}/blobs/{digest}", scopes=[f"repository:{repo}:pull"])
    assert r.status == status, (r.status, r.body[:200])
    assert r.header("Location") == f.redirects[-1]
    assert f.storage_requests == [], "the proxy followed the redirect"
    followed = client.raw("GET", r.header("Location"))  # as a client does, without credentials
    assert (followed.status, digest_of(followed.body)) == (200, digest)
    ((seen),) = f.storage_requests
    assert seen.authorization is False  # nobody added credentials on the way
    return r


def test_hub_rate_limit_headers_blob_redirect_and_429(
    front, proxy, http_client, make_image, unique
):
    """Docker Hub: realm on auth.docker.io (another host), service registry.docker.io,
    library/ names, RateLimit-* and docker-ratelimit-source headers, 307 to the CDN,
    429 TOOMANYREQUESTS with Retry-After.

    https://gist.github.com/jeversol/369009aaad4cd2cd8e2610fa68d4c4be (headers),
    https://github.com/docker/docs/issues/21908 (429), https://github.com/docker/docs/pull/22916
    (Retry-After), https://github.com/docker/hub-feedback/issues/2218 (CDN for blobs)."""
    f = front("hub")
    p = proxy(rules_for("hub"), upstream=f.url, tls=True)
    repo, up = names("hub", unique)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    client = http_client(p.url, ALICE)
    f.clear()

    accept = {"Accept": image.manifest.media_type}
    r = client.request("HEAD", f"/v2/{repo}/manifests/v1", headers=accept)
    assert r.status == 200
    assert [r.header(h) for h in ("RateLimit-Limit", "RateLimit-Remaining")] == [
        "100;w=21600",
        "99;w=21600",
    ]
    assert r.header("Docker-RateLimit-Source") == "127.0.0.1"
    assert _challenge(client.history[0]) == {
        "realm": f"{p.url}/auth",
        "service": "registry.docker.io",
        "scope": f"repository:{repo}:pull",
    }
    (t,) = f.token_requests  # at the auth host, another port than the registry's
    assert f.auth_port not in (0, f.port)
    assert (t.method, t.path, t.service, t.scopes, t.user, t.status) == (
        "GET", "/token", "registry.docker.io", (f"repository:{up}:pull",), "alice", 200,
    )  # fmt: skip

    r = _blob_redirect(f, client, repo, image.layers[0].digest, 307)
    location = urllib.parse.urlsplit(r.header("Location"))
    assert location.path.startswith("/registry-v2/docker/registry/v2/blobs/sha256/")
    assert location.query.startswith("verify=")

    limited = f"hub/{RATE_LIMITED_MARK}-{unique}"
    r = client.request("GET", f"/v2/{limited}/manifests/v1", headers=accept)
    assert r.status == 429
    assert r.header("Retry-After") == "3600"
    assert r.header("RateLimit-Remaining") == "0;w=21600"
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert_front_saw_only(f, "hub", up, f"library/{RATE_LIMITED_MARK}-{unique}")
    assert not f.names_seen() & {repo, limited}


def test_ghcr_placeholder_scope_anonymous_push_denied_blob_redirect(
    front, proxy, http_client, skopeo, make_image, unique
):
    """ghcr.io: /v2/ challenges with scope repository:user/image:pull, which names no
    repository of the client's; anonymous pull,push is refused 403 DENIED, pull alone is
    not; blobs are redirected.

    https://toddysm.com/2024/02/12/authenticating-with-oci-registries-github-container-registry-ghcr-implementation,
    https://github.com/mccutchen/go-httpbin/issues/223, https://github.com/scarf-sh/gateway/pull/35"""
    f = front("ghcr")
    p = proxy(rules_for("ghcr"), upstream=f.url, tls=True)
    repo, up = names("ghcr", unique)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    anonymous = http_client(p.url)

    ping = anonymous.raw("GET", f"{p.url}/v2/")
    assert ping.status == 401
    # The placeholder is an upstream name no rule reaches: it must not reach the client.
    assert _challenge(ping) == {"realm": f"{p.url}/auth", "service": "ghcr.io"}

    def token(actions: str):
        query = urllib.parse.urlencode(
            [("service", "ghcr.io"), ("scope", f"repository:{repo}:{actions}")]
        )
        return anonymous.raw("GET", f"{p.url}/auth?{query}")

    f.clear()
    denied = token("pull,push")
    assert denied.status == 403
    assert denied.json()["errors"][0]["code"] == "DENIED"
    assert token("pull").status == 200
    assert [(t.scopes, t.user, t.status) for t in f.token_requests] == [
        ((f"repository:{up}:pull,push",), None, 403),
        ((f"repository:{up}:pull",), None, 200),
    ]

    client = http_client(p.url, ALICE)
    _blob_redirect(f, client, repo, image.layers[0].digest, 307)
    assert_front_saw_only(f, "ghcr", up)

    # skopeo pushing anonymously gets the registry's refusal, and nothing is written.
    f.clear()
    with pytest.raises(SkopeoError) as refused:
        skopeo.copy(image.ref, f"docker://{p.host}/{repo}:anon", dest_anonymous=True)
    # (as skopeo says against ghcr.io: "Requesting bearer token: ... 403 (Forbidden)")
    assert "bearer token" in refused.value.stderr and "403" in refused.value.stderr
    assert [t.status for t in f.token_requests] == [403]
    assert not [r for r in f.requests if r.method in ("POST", "PUT", "PATCH")]


def test_quay_blob_302_with_long_cache_control(front, proxy, http_client, make_image, unique):
    """quay.io: realm /v2/auth on the registry host; blobs answered 302 to an expiring
    signed CloudFront URL with Cache-Control max-age=31536000.

    https://github.com/rpardini/docker-registry-proxy/issues/5,
    https://github.com/rpardini/docker-registry-proxy/issues/26"""
    f = front("quay")
    p = proxy(rules_for("quay"), upstream=f.url, tls=True)
    repo, up = names("quay", unique)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    client = http_client(p.url, ALICE)
    f.clear()

    r = _blob_redirect(f, client, repo, image.layers[0].digest, 302)
    assert r.header("Cache-Control") == "max-age=31536000"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(r.header("Location")).query)
    assert {"Expires", "Signature", "Key-Pair-Id"} <= set(query)
    assert _challenge(client.history[0])["service"] == "quay.io"
    assert [t.path for t in f.token_requests] == ["/v2/auth"]
    assert_front_saw_only(f, "quay", up)
    assert_tokens_mapped(f, "quay")


def test_gar_no_service_relative_location_large_headers(front, proxy, http_client, unique):
    """Artifact Registry: the /v2/ challenge has a realm and no service (repository
    challenges have one); Location headers are relative; responses carry big headers.

    https://github.com/apple/container/issues/2274, https://github.com/oras-project/oras/issues/157"""
    f = front("gar")
    p = proxy(rules_for("gar"), upstream=f.url, tls=True)
    repo, up = names("gar", unique)
    client = http_client(p.url, ALICE)

    ping = client.raw("GET", f"{p.url}/v2/")
    assert _challenge(ping) == {"realm": f"{p.url}/auth"}
    big = [(k, v) for k, v in ping.headers if k.lower().startswith("x-goog-debug-")]
    assert sum(len(v) for _, v in big) == PROFILES["gar"].big_headers

    f.clear()
    scopes = [f"repository:{repo}:pull,push"]
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes)
    assert r.status == 202, r.body
    assert _challenge(client.history[-3]) == {
        "realm": f"{p.url}/auth",
        "service": "us-docker.pkg.dev",
        "scope": f"repository:{repo}:pull,push",
    }
    location = r.header("Location")
    assert location.startswith(f"/v2/{repo}/blobs/uploads/"), location  # relative, client name
    data = b"gar blob " + unique.encode()
    digest = digest_of(data)
    sep = "&" if "?" in location else "?"
    put = client.request("PUT", f"{location}{sep}digest={digest}", body=data, scopes=scopes)
    assert put.status == 201, put.body
    assert put.header("Location") == f"/v2/{repo}/blobs/{digest}"
    assert sum(len(v) for k, v in put.headers if k.lower().startswith("x-goog-debug-")) == (
        PROFILES["gar"].big_headers
    )
    assert_front_saw_only(f, "gar", up)
    assert_tokens_mapped(f, "gar")

    # A client that knows only the /v2/ challenge asks without a service: so does the
    # token service get it.
    f.clear()
    scope = urllib.parse.quote(f"repository:{repo}:pull", safe="")
    r = client.raw("GET", f"{p.url}/auth?scope={scope}", {"Authorization": _basic(ALICE)})
    assert r.status == 200, r.body
    assert [(t.path, t.service, t.scopes) for t in f.token_requests] == [
        ("/v2/token", None, (f"repository:{up}:pull",))
    ]


def test_acr_realm_elsewhere_service_with_colons_account_oauth_post_oss_redirect(
    front, proxy, http_client, make_image, unique
):
    """Alibaba ACR: realm on dockerauth.<another region> (another host); the service
    registry.aliyuncs.com:cn-shenzhen:26842 is URL-encoded in token GETs, beside account=;
    an OAuth2 POST as BuildKit sends it; blobs 307 to OSS over plain http with
    Expires/OSSAccessKeyId/Signature.

    https://www.alibabacloud.com/blog/reverse-proxy-to-access-alibaba-cloud-container-registry_597957,
    https://github.com/distribution/distribution/issues/1300,
    https://github.com/dragonflyoss/dragonfly-archived/pull/523, https://github.com/moby/buildkit/pull/2553"""
    f = front("acr")
    p = proxy(rules_for("acr"), upstream=f.url, tls=True)
    repo, up = names("acr", unique)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    client = http_client(p.url, ALICE)

    challenge = _challenge(client.raw("GET", f"{p.url}/v2/{repo}/tags/list"))
    assert challenge == {
        "realm": f"{p.url}/auth",
        "service": ACR_SERVICE,
        "scope": f"repository:{repo}:pull",
    }
    f.clear()
    encoded = urllib.parse.quote(ACR_SERVICE, safe="")
    scope = urllib.parse.quote(f"repository:{repo}:pull", safe="")
    query = f"account=alice&scope={scope}&service={encoded}"
    r = client.raw("GET", f"{p.url}/auth?{query}", {"Authorization": _basic(ALICE)})
    assert r.status == 200, r.body
    (t,) = f.token_requests
    assert f.auth_port not in (0, f.port)
    assert (t.method, t.service, t.account, t.scopes, t.user) == (
        "GET", ACR_SERVICE, "alice", (f"repository:{up}:pull",), "alice",
    )  # fmt: skip
    assert f"service={encoded}" in t.raw and "account=alice" in t.raw  # still URL-encoded

    f.clear()
    form = urllib.parse.urlencode(
        [
            ("grant_type", "password"),
            ("username", ALICE[0]),
            ("password", ALICE[1]),
            ("service", ACR_SERVICE),
            ("scope", f"repository:{repo}:pull,push repository:{repo}:pull"),
            ("client_id", "buildkit-client"),
            ("access_type", "online"),
        ]
    )
    r = client.raw(
        "POST",
        f"{p.url}/auth",
        {"Content-Type": "application/x-www-form-urlencoded"},
        form.encode(),
    )
    assert r.status == 200, r.body
    (t,) = f.token_requests
    assert (t.method, t.grant_type, t.client_id, t.service, t.user) == (
        "POST", "password", "buildkit-client", ACR_SERVICE, "alice",
    )  # fmt: skip
    assert t.scopes == (f"repository:{up}:pull,push", f"repository:{up}:pull")
    assert ALICE[1] not in t.raw

    f.clear()
    r = _blob_redirect(f, client, repo, image.layers[0].digest, 307)
    location = urllib.parse.urlsplit(r.header("Location"))
    assert location.scheme == "http"
    assert {"Expires", "OSSAccessKeyId", "Signature"} <= set(urllib.parse.parse_qs(location.query))
    assert_front_saw_only(f, "acr", up)


def test_azure_nonstandard_actions_pass_untouched(
    front, proxy, http_client, skopeo, make_image, unique
):
    """Azure ACR: realm /oauth2/token; scopes with metadata_read, delete and * are mapped,
    their actions passed on as they are, and skopeo can delete through the proxy.

    https://azure.github.io/acr/Token-BasicAuth.html, https://github.com/Azure/acr/issues/676"""
    f = front("azure")
    p = proxy(rules_for("azure"), upstream=f.url, tls=True)
    repo, up = names("azure", unique)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    client = http_client(p.url, ALICE)
    f.clear()

    r = client.request("GET", f"/v2/{repo}/tags/list")
    assert r.status == 200 and r.json() == {"name": repo, "tags": ["v1"]}
    assert _challenge(client.history[-3]) == {
        "realm": f"{p.url}/auth",
        "service": "contoso.azurecr.io",
        "scope": f"repository:{repo}:metadata_read",
    }
    scopes = [
        f"repository:{repo}:metadata_read",
        f"repository:{repo}:delete",
        f"repository:{repo}:*",
    ]
    query = urllib.parse.urlencode(
        [("service", "contoso.azurecr.io")] + [("scope", s) for s in scopes]
    )
    assert (
        client.raw("GET", f"{p.url}/auth?{query}", {"Authorization": _basic(ALICE)}).status == 200
    )
    assert [(t.path, t.scopes) for t in f.token_requests] == [
        ("/oauth2/token", (f"repository:{up}:metadata_read",)),
        (
            "/oauth2/token",
            (f"repository:{up}:metadata_read", f"repository:{up}:delete", f"repository:{up}:*"),
        ),
    ]

    f.clear()
    skopeo.delete(f"docker://{p.host}/{repo}:v1", creds=ALICE)
    assert [(r.method, r.status) for r in f.requests if r.method == "DELETE"][-1] == (
        "DELETE",
        202,
    )
    assert_front_saw_only(f, "azure", up)
    assert_tokens_mapped(f, "azure")


def test_ecr_basic_challenge_passes_and_no_bearer_flow_is_invented(
    front, proxy, http_client, make_image, unique
):
    """AWS ECR: `Basic realm=...` with a text/plain body and no token service; the proxy
    passes the challenge on (the body becomes a registry JSON error), invents no Bearer
    flow, and sends Basic credentials upstream as they are.

    https://wom.icu/today-i-learned/2023-09-11,
    https://docs.aws.amazon.com/AmazonECR/latest/userguide/registry_auth.html"""
    f = front("ecr")
    p = proxy(rules_for("ecr"), upstream=f.url, tls=True)
    repo, up = names("ecr", unique)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    client = http_client(p.url)

    ping = client.raw("GET", f"{p.url}/v2/")
    assert ping.status == 401
    assert ping.header("WWW-Authenticate") == (
        f'Basic realm="{f.url}/",service="ecr.amazonaws.com"'
    )
    # Its text/plain body is not parsed for names: a registry error stands in for it.
    assert ping.header("Content-Type") == "application/json"
    assert ping.json()["errors"][0]["code"] == "UNAUTHORIZED"

    token = client.raw("GET", f"{p.url}/auth?scope=repository%3A{repo}%3Apull")
    assert token.status == 502  # no realm to send it to: none is made up
    assert token.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert not f.token_requests

    f.clear()
    accept = {"Accept": image.manifest.media_type, "Authorization": _basic(ALICE)}
    r = client.raw("GET", f"{p.url}/v2/{repo}/manifests/v1", accept)
    assert r.status == 200
    assert digest_of(r.body) == image.digest
    assert [(x.method, x.path, x.auth) for x in f.requests] == [
        ("GET", f"/v2/{up}/manifests/v1", "Basic")
    ]


# --------------------------------------------------------------------------------------
# docker: Docker Hub and ACR
# --------------------------------------------------------------------------------------


@pytest.fixture
def dockerd(registry):
    require_tools(*DOCKER_TOOLS)
    with Dockerd() as d:
        yield d


@pytest.mark.parametrize("key", ["acr", "hub"])
def test_docker_login_pull_push(key, front, proxy, dockerd, make_image, http_client, unique):
    """docker login, pull and push through the proxy: login GETs a refresh token from the
    registry's own realm (another host for both), later tokens are OAuth2 POSTs with its
    service string; blobs come from the storage host the registry redirected docker to."""
    f = front(key)
    p = proxy(rules_for(key), upstream=f.url, tls=True)
    repo, up = names(key, unique)
    image = make_image(layers=2, layer_size=30_000)
    _seed(f, http_client, up, image)

    dockerd.login(p.host, *ALICE)
    (login,) = f.token_requests
    assert (login.method, login.service, login.client_id, login.user, login.status) == (
        "GET", PROFILES[key].service, "docker", "alice", 200,
    )  # fmt: skip
    assert dockerd.stored_auth(p.host).get("identitytoken")

    f.clear()
    assert dockerd.pull(f"{p.host}/{repo}:v1") == image.digest
    if key == "hub":
        # hub/<org>/<name> as well as hub/<name> (library/)
        org_repo, org_up = f"hub/acme_team/org-{unique}", f"acme_team/org-{unique}"
        _seed(f, http_client, org_up, image)
        assert dockerd.pull(f"{p.host}/{org_repo}:v1") == image.digest
        assert org_up in f.names_seen()
    assert_front_saw_only(f, key, up)
    assert_tokens_mapped(f, key)
    assert {(t.method, t.grant_type, t.client_id) for t in f.token_requests} == {
        ("POST", "refresh_token", "docker")
    }
    assert_redirects_followed(f, key, [layer.digest for layer in image.layers])

    f.clear()
    dockerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{repo}:v2")
    dockerd.push(f"{p.host}/{repo}:v2")
    assert ("PUT", f"/v2/{up}/manifests/v2", 201) in [
        (r.method, r.path, r.status) for r in f.requests
    ]
    assert_front_saw_only(f, key, up)
    assert_tokens_mapped(f, key)


# --------------------------------------------------------------------------------------
# anonymous pull and _catalog, every profile
# --------------------------------------------------------------------------------------


@ALL
def test_skopeo_anonymous_pull(
    key, front, proxy, skopeo, make_image, http_client, tmp_path, unique
):
    """Anonymous pull of a public repository works wherever the registry allows it; ECR
    has no anonymous access at all (the Basic challenge reaches skopeo, which gives up)."""
    f = front(key)
    p = proxy(rules_for(key), upstream=f.url, tls=True)
    repo, up = names(key, unique, public=True)
    image = make_image(layers=1, layer_size=10_000)
    _seed(f, http_client, up, image)
    f.clear()

    out = tmp_path / "pulled"
    proc = skopeo.run(
        "copy",
        "--retry-times=0",
        "--src-no-creds",
        f"--src-cert-dir={skopeo.ca.cert_dir}",
        f"docker://{p.host}/{repo}:v1",
        f"oci:{out}:v1",
        check=False,
    )
    if PROFILES[key].basic_only:
        assert proc.returncode != 0
        assert "401" in proc.stderr or "unauthorized" in proc.stderr.lower(), proc.stderr
        # (skopeo answers the Basic challenge with empty credentials: refused too)
        assert {r.status for r in f.requests} == {401}, f.requests
        return
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest
    assert_front_saw_only(f, key, up)
    assert_tokens_mapped(f, key)
    assert all(t.user is None and t.method == "GET" for t in f.token_requests)
    assert_redirects_followed(f, key, [layer.digest for layer in image.layers])


@ALL
def test_catalog(key, front, proxy, http_client, make_image, unique):
    """_catalog through the proxy lists client names only (for registries that offer
    it; the profiles do not model which hosted registries refuse _catalog)."""
    f = front(key)
    p = proxy(rules_for(key), upstream=f.url, tls=True)
    repo, up = names(key, unique)
    _seed(f, http_client, up, make_image(layers=1, layer_size=1_000))
    f.clear()
    client = http_client(p.url, ALICE)
    if PROFILES[key].basic_only:
        r = client.raw("GET", f"{p.url}/v2/_catalog?n=1000", {"Authorization": _basic(ALICE)})
    else:
        r = client.request("GET", "/v2/_catalog?n=1000", scopes=["registry:catalog:*"])
    assert r.status == 200, r.body
    listed = r.json()["repositories"]
    assert repo in listed
    assert not [n for n in listed if n.startswith(("acme_team/", "library/"))]
    if not PROFILES[key].basic_only:
        assert f.token_scopes() == ["registry:catalog:*"]


def test_hub_read_only_mirror(front, proxy, dockerd, http_client, make_image, unique):
    """The Docker Hub pair as a read-only mirror (`actions: [pull]`): docker pulls
    hub/<name>, hub/<org>/<name> and the alias hub/library/<name>; its push is refused by
    the proxy with 403 DENIED and never reaches the registry; token requests lose their
    push; the challenge asks only for pull."""
    f = front("hub")
    p = proxy(HUB_MIRROR, upstream=f.url, tls=True)
    image = make_image(layers=1, layer_size=10_000)
    lib_repo, lib_up = f"hub/mirror-{unique}", f"library/mirror-{unique}"
    org_repo, org_up = f"hub/acme_team/mirror-{unique}", f"acme_team/mirror-{unique}"
    _seed(f, http_client, lib_up, image)
    _seed(f, http_client, org_up, image)

    dockerd.login(p.host, *ALICE)
    f.clear()
    for ref in (lib_repo, org_repo, f"hub/library/mirror-{unique}"):
        assert dockerd.pull(f"{p.host}/{ref}:v1") == image.digest
    assert_front_saw_only(f, "hub", lib_up, org_up)
    assert all(s.endswith(":pull") for s in f.token_scopes()), f.token_scopes()

    f.clear()
    dockerd.tag(f"{p.host}/{lib_repo}:v1", f"{p.host}/{lib_repo}:v2")
    with pytest.raises(CommandError) as refused:
        dockerd.push(f"{p.host}/{lib_repo}:v2")
    assert "denied" in str(refused.value).lower()
    assert not [r for r in f.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]
    assert all(s.endswith(":pull") for s in f.token_scopes()), f.token_scopes()

    client = http_client(p.url, ALICE)
    f.clear()
    r = client.raw("POST", f"{p.url}/v2/{lib_repo}/blobs/uploads/")
    assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED"
    assert not f.requests
    query = urllib.parse.urlencode(
        [("service", "registry.docker.io"), ("scope", f"repository:{lib_repo}:pull,push")]
    )
    assert (
        client.raw("GET", f"{p.url}/auth?{query}", {"Authorization": _basic(ALICE)}).status == 200
    )
    assert f.token_scopes() == [f"repository:{lib_up}:pull"]
    r = client.raw("GET", f"{p.url}/v2/{lib_repo}/manifests/v1")
    assert _challenge(r)["scope"] == f"repository:{lib_repo}:pull"
