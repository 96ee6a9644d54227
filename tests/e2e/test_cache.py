"""The blob cache (issue 14) against the real token-auth registry and real clients.

Every test counts what reached the upstream (the registry's access log, or the bytes over
a throttled link) instead of trusting the proxy's own word. A hit is a 307 to the proxy's
local blob server; a miss or a refusal comes from the upstream itself.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.clients import CONTAINERD_TOOLS, DOCKER_TOOLS, Containerd, Dockerd, require_tools
from tests.e2e.conftest import in_ci, require_tool
from tests.e2e.faultkit import push_image
from tests.e2e.proxycheck import RULES
from tests.e2e.throttle import ThrottleRelay
from tests.e2e.upstream import ALICE, BOB, LOOPBACK, Mitmdump, UserAcl, free_port

MANIFEST_ACCEPT = {
    "Accept": "application/vnd.oci.image.manifest.v1+json,"
    "application/vnd.docker.distribution.manifest.v2+json"
}


def cache_args(directory: Path, *extra: str, cap: str = "1G") -> list[str]:
    return [
        "--set",
        f"registry_cache_dir={directory}",
        "--set",
        f"registry_cache_port={free_port()}",
        "--set",
        f"registry_cache_max_bytes={cap}",
        *extra,
    ]


def fetch(client, repo: str, digest: str, kind: str = "blobs"):
    """GET through the proxy, following one redirect as registry clients do.

    Returns (status of the first answer, body finally received, Location or None)."""
    headers = MANIFEST_ACCEPT if kind == "manifests" else None
    r = client.request(
        "GET", f"/v2/{repo}/{kind}/{digest}", headers=headers, scopes=[f"repository:{repo}:pull"]
    )
    location = r.header("Location") if r.status == 307 else None
    if location is None:
        return r.status, r.body, None
    followed = client.raw("GET", location)
    assert followed.status == 200, (followed.status, followed.body[:200])
    return r.status, followed.body, location


def cached_files(directory: Path, settle: float = 0.3) -> dict[str, int]:
    """digest -> size of every blob in the cache directory (temp files left out).

    A miss's last bytes reach the client just before the writer thread renames the file:
    wait until nothing is being written (no temp file) and `settle` seconds passed."""
    deadline = time.monotonic() + 10
    time.sleep(settle)
    while temp_files(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = {}
    for path in directory.glob("*/sha*/*"):
        found[f"{path.parent.name}:{path.name}"] = path.stat().st_size
    return found


def temp_files(directory: Path) -> list[Path]:
    return list(directory.glob("*/tmp/*"))


def upstream_gets(registry, digest: str) -> list:
    """The registry's GETs of `digest` that delivered it (since the last mark)."""
    return [
        e
        for e in registry.access_log(since_mark=True)
        if e.method == "GET" and e.path.endswith(digest) and e.status == 200
    ]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def pushed(registry, http_client, make_image, unique):
    """`pushed(repo_upstream, layers=1, layer_size=...)` pushes an image straight to the
    registry as alice and returns it."""

    def push(upstream_repo: str, **kwargs):
        image = make_image(**kwargs)
        push_image(http_client(registry.url, ALICE), upstream_repo, image, "v1")
        return image

    return push


def layer_bytes(image, digest: str) -> bytes:
    return (image.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def test_miss_then_hit_is_verified_redirected_and_tags_asked_upstream(
    registry, proxy, http_client, pushed, unique, tmp_path
):
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/app", layers=1, layer_size=2_000_000)
    digest = image.layers[0].digest
    p = proxy(RULES, extra_args=cache_args(cache))
    client = http_client(p.url, ALICE)
    repo = f"team/{unique}/app"
    registry.mark()

    status, body, location = fetch(client, repo, digest)
    assert (status, sha256(body), location) == (200, digest, None)  # the miss streams
    assert cached_files(cache) == {digest: len(body)}
    assert len(upstream_gets(registry, digest)) == 1

    registry.mark()
    for _ in range(2):
        status, body, location = fetch(client, repo, digest)
        assert (status, sha256(body)) == (307, digest)
        assert location.startswith(f"http://127.0.0.1:{location.split(':')[2].split('/')[0]}/")
    # Hits never fetched the blob again; each asked the upstream about this client (HEAD)
    # or reused the answer.
    entries = registry.access_log(since_mark=True)
    assert not upstream_gets(registry, digest)
    assert {e.method for e in entries if e.path.endswith(digest)} <= {"HEAD"}
    assert any(e.method == "HEAD" and e.status == 200 for e in entries)

    # The manifest by digest is cached too.
    status, manifest, _ = fetch(client, repo, image.digest, "manifests")
    assert (status, sha256(manifest)) == (200, image.digest)
    registry.mark()
    r = client.request("GET", f"/v2/{repo}/manifests/{image.digest}", headers=MANIFEST_ACCEPT)
    assert r.status == 200 and sha256(r.body) == image.digest
    assert r.header("Content-Type") == "application/vnd.oci.image.manifest.v1+json"
    assert not upstream_gets(registry, image.digest)
    # By tag the upstream is asked every time (a HEAD with the client's token names the
    # digest the tag has now) and the manifest of that digest comes from the cache.
    for _ in range(2):
        r = client.request("GET", f"/v2/{repo}/manifests/v1", headers=MANIFEST_ACCEPT)
        assert r.status == 200 and sha256(r.body) == image.digest
        assert r.header("Docker-Content-Digest") == image.digest
        assert r.header("Content-Type") == "application/vnd.oci.image.manifest.v1+json"
    tag = [e for e in registry.access_log(since_mark=True) if e.path.endswith("/v1")]
    assert [(e.method, e.status) for e in tag if e.status == 200] == [("HEAD", 200)] * 2
    assert "registry cache" in p.log_text()


def test_corrupt_upstream_blob_is_never_cached(
    registry, proxy, http_client, pushed, unique, tmp_path
):
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/bad", layers=1, layer_size=1_000_000)
    digest = image.layers[0].digest
    hexdigest = digest.split(":", 1)[1]
    data_file = (
        registry.storage_dir
        / "docker/registry/v2/blobs/sha256"
        / hexdigest[:2]
        / hexdigest
        / "data"
    )
    good = data_file.read_bytes()
    data_file.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    p = proxy(RULES, extra_args=cache_args(cache))
    client = http_client(p.url, ALICE)
    repo = f"team/{unique}/bad"
    try:
        for _ in range(2):
            status, body, location = fetch(client, repo, digest)
            # The client gets what the upstream sent (and will reject it); the cache
            # keeps nothing, not even a temp file.
            assert (status, location, len(body)) == (200, None, len(good))
            assert sha256(body) != digest
            assert cached_files(cache) == {} and temp_files(cache) == []
    finally:
        data_file.write_bytes(good)
    registry.mark()
    status, body, _ = fetch(client, repo, digest)
    assert (status, sha256(body)) == (200, digest)
    assert len(upstream_gets(registry, digest)) == 1  # a miss again: fetched and now kept
    assert cached_files(cache) == {digest: len(good)}
    assert "did not match" in p.log_text()


def test_hit_needs_the_clients_own_rights(
    registry, token_server, proxy, http_client, pushed, unique, tmp_path
):
    """The cache holds the blob; anonymous, bob (no rights) and bob after his rights were
    revoked get the upstream's 401, never the blob."""
    cache = tmp_path / "cache"
    image = pushed(f"library/{unique}", layers=1, layer_size=500_000)
    digest = image.layers[0].digest
    p = proxy(RULES, extra_args=cache_args(cache))
    status, body, _ = fetch(http_client(p.url, ALICE), unique, digest)
    assert status == 200 and cached_files(cache) == {digest: len(body)}

    registry.mark()
    for creds in (None, BOB):
        status, body, location = fetch(http_client(p.url, creds), unique, digest)
        assert (status, location) == (401, None), creds
        assert b"UNAUTHORIZED" in body
    refused = [e for e in registry.access_log(since_mark=True) if e.path.endswith(digest)]
    assert {(e.method, e.status) for e in refused if e.method == "GET"} == {("GET", 401)}

    # bob is granted pull, is served from the cache, then loses it again.
    acl = token_server.acl.users
    saved = acl[BOB[0]]
    acl[BOB[0]] = UserAcl(password=BOB[1], pull=(*saved.pull, f"library/{unique}"))
    try:
        status, body, location = fetch(http_client(p.url, BOB), unique, digest)
        assert (status, sha256(body)) == (307, digest)
    finally:
        acl[BOB[0]] = saved
    status, body, location = fetch(http_client(p.url, BOB), unique, digest)
    assert (status, location) == (401, None)
    assert sha256(body) != digest


def test_a_tag_is_followed_upstream_and_its_cached_manifest_needs_the_clients_rights(
    registry, token_server, proxy, http_client, make_image, unique, tmp_path
):
    """The manifest behind a tag is served from the cache only after the upstream named
    its digest to this client: a moved tag gives the new manifest, a client without
    rights (never granted, or revoked) the upstream's 401."""
    p = proxy(RULES, extra_args=cache_args(tmp_path / "cache"))
    first, second = make_image(), make_image()
    push_image(http_client(registry.url, ALICE), f"library/{unique}", first, "v1")

    def by_tag(creds):
        r = http_client(p.url, creds).request(
            "GET", f"/v2/{unique}/manifests/v1", headers=MANIFEST_ACCEPT
        )
        return r.status, sha256(r.body)

    assert by_tag(ALICE) == (200, first.digest)  # fetched upstream, cached by its digest
    registry.mark()
    assert by_tag(ALICE) == (200, first.digest)
    tag = [(e.method, e.status) for e in registry.access_log(since_mark=True) if "/v1" in e.path]
    assert ("HEAD", 200) in tag and ("GET", 200) not in tag  # served from the cache

    push_image(http_client(registry.url, ALICE), f"library/{unique}", second, "v1")
    assert by_tag(ALICE) == (200, second.digest)  # the tag moved: never a stale answer
    assert by_tag(ALICE) == (200, second.digest)

    assert by_tag(None)[0] == 401
    assert by_tag(BOB)[0] == 401
    acl = token_server.acl.users
    saved = acl[BOB[0]]
    acl[BOB[0]] = UserAcl(password=BOB[1], pull=(*saved.pull, f"library/{unique}"))
    try:
        assert by_tag(BOB) == (200, second.digest)
    finally:
        acl[BOB[0]] = saved
    status, body = by_tag(BOB)
    assert status == 401 and body != second.digest


def test_requests_without_credentials_get_the_upstreams_last_answer(
    registry, proxy, http_client, pushed, unique, tmp_path
):
    """The ping and a pull request sent before the client has a token (ctr does both
    every pull) are answered as the upstream answered the same a moment ago; with a
    token everything goes to the upstream as before."""
    pushed(f"library/{unique}")
    p = proxy(RULES, extra_args=cache_args(tmp_path / "cache"))
    plain = http_client(p.url, None)
    registry.mark()
    for target in ("/v2/", f"/v2/{unique}/manifests/v1"):
        answers = []
        for method in ("GET", "GET", "HEAD", "HEAD"):
            r = plain.raw(method, p.url + target, headers=MANIFEST_ACCEPT)
            answers.append((r.status, r.header("WWW-Authenticate"), r.body))
        assert answers[0][0] == 401 and p.url in answers[0][1]  # this proxy's realm
        assert answers[1] == answers[0] and answers[3] == answers[2], target
    upstream = [(e.method, e.path) for e in registry.access_log(since_mark=True)]
    assert upstream.count(("GET", "/v2/")) == 1 and upstream.count(("HEAD", "/v2/")) == 1
    tag = f"/v2/library/{unique}/manifests/v1"
    assert upstream.count(("GET", tag)) == 1 and upstream.count(("HEAD", tag)) == 1
    # With a token the upstream judges it.
    manifest = f"/v2/{unique}/manifests/v1"
    r = http_client(p.url, ALICE).request("GET", manifest, headers=MANIFEST_ACCEPT)
    assert r.status == 200
    assert ("GET", tag) in [(e.method, e.path) for e in registry.access_log(since_mark=True)][-2:]


def test_concurrent_misses_fetch_once(registry, proxy, http_client, pushed, unique, tmp_path):
    """Ten clients ask for one uncached 8 MB blob at once, over a 25 MB/s link: it
    crosses the link once (counted by the link and by the registry)."""
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/big", layers=1, layer_size=8_000_000)
    digest = image.layers[0].digest
    size = len(layer_bytes(image, digest))
    link = ThrottleRelay(registry.port, rate=25e6, delay=0.02).start()
    try:
        p = proxy(RULES, upstream=link.url, extra_args=cache_args(cache))
        repo = f"team/{unique}/big"
        clients = [http_client(p.url, ALICE) for _ in range(10)]
        for c in clients:  # each gets its own token first (HEAD goes upstream uncached)
            assert (
                c.request(
                    "HEAD", f"/v2/{repo}/blobs/{digest}", scopes=[f"repository:{repo}:pull"]
                ).status
                == 200
            )
        registry.mark()
        link.reset_counts()
        results: list = [None] * len(clients)
        start = threading.Barrier(len(clients))

        def pull(i: int) -> None:
            start.wait(timeout=30)
            results[i] = fetch(clients[i], repo, digest)

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(r is not None and sha256(r[1]) == digest for r in results), results
        assert len(upstream_gets(registry, digest)) == 1
        assert link.bytes_down <= 1.1 * size, (link.bytes_down, size)
        assert sum(1 for r in results if r[0] == 307) == len(clients) - 1
        assert "single-flight" not in p.log_text()  # (comments are not logged; sanity)
    finally:
        link.stop()


def test_eviction_keeps_the_cap_and_spares_recent_and_served_blobs(
    registry, proxy, http_client, pushed, unique, tmp_path
):
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/ev", layers=4, layer_size=1_000_000)
    a, b, c, d = (layer.digest for layer in image.layers)
    size = len(layer_bytes(image, a))
    cap = int(2.5 * size)
    p = proxy(RULES, extra_args=cache_args(cache, cap=str(cap)))
    client = http_client(p.url, ALICE)
    repo = f"team/{unique}/ev"

    def pull(digest: str) -> int:
        status, body, _ = fetch(client, repo, digest)
        assert sha256(body) == digest
        time.sleep(0.2)  # distinct mtimes (the LRU clock), and the writer has finished
        return status

    assert [pull(a), pull(b)] == [200, 200]
    assert pull(a) == 307  # a is now served more recently than b
    assert pull(c) == 200  # over the cap: b, least recently served, goes
    assert set(cached_files(cache)) == {a, c}
    # a is the oldest now but was handed out by redirect within the URL lifetime: it may
    # still be being downloaded, so c goes instead.
    assert pull(d) == 200
    assert set(cached_files(cache)) == {a, d}
    assert sum(cached_files(cache).values()) <= cap


def _stop(m: Mitmdump) -> None:
    m.stop()
    m.cleanup()


def test_restart_uses_the_warm_directory_and_checks_it(
    registry, ca, http_client, pushed, unique, tmp_path
):
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/warm", layers=2, layer_size=500_000)
    good, tampered = (layer.digest for layer in image.layers)
    repo = f"team/{unique}/warm"
    first = Mitmdump(registry.url, ca, RULES, extra_args=cache_args(cache)).start()
    try:
        for digest in (good, tampered):
            assert fetch(http_client(first.url, ALICE), repo, digest)[0] == 200
    finally:
        _stop(first)
    assert set(cached_files(cache)) == {good, tampered}
    # A flipped byte on disk (bad sector, a buggy replica): found on first use, dropped.
    path = next(cache.glob(f"*/sha256/{tampered.split(':')[1]}"))
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))

    second = Mitmdump(registry.url, ca, RULES, extra_args=cache_args(cache)).start()
    try:
        registry.mark()
        client = http_client(second.url, ALICE)
        status, body, _ = fetch(client, repo, good)
        assert (status, sha256(body)) == (307, good)
        status, body, _ = fetch(client, repo, tampered)
        assert (status, sha256(body)) == (200, tampered)  # refetched, not served bad
        assert [e.path for e in upstream_gets(registry, good)] == []
        assert len(upstream_gets(registry, tampered)) == 1
        time.sleep(0.3)
        assert fetch(client, repo, tampered)[0] == 307
    finally:
        _stop(second)


def test_two_proxies_share_one_directory(registry, ca, http_client, pushed, unique, tmp_path):
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/shared", layers=1, layer_size=500_000)
    digest = image.layers[0].digest
    repo = f"team/{unique}/shared"
    one = Mitmdump(registry.url, ca, RULES, extra_args=cache_args(cache)).start()
    two = Mitmdump(registry.url, ca, RULES, extra_args=cache_args(cache)).start()
    try:
        registry.mark()
        assert fetch(http_client(one.url, ALICE), repo, digest)[0] == 200
        time.sleep(0.3)
        status, body, location = fetch(http_client(two.url, ALICE), repo, digest)
        assert (status, sha256(body)) == (307, digest)
        assert len(upstream_gets(registry, digest)) == 1
        # Both sign with the key in the shared directory: behind one address either
        # replica honours the other's redirect.
        status, _, location_one = fetch(http_client(one.url, ALICE), repo, digest)
        port_two = location.split(":")[2].split("/")[0]
        port_one = location_one.split(":")[2].split("/")[0]
        swapped = location_one.replace(f":{port_one}/", f":{port_two}/")
        r = http_client(two.url).raw("GET", swapped)
        assert (r.status, sha256(r.body)) == (200, digest)
        forged = swapped.replace("&s=", "&s=0")
        assert http_client(two.url).raw("GET", forged).status == 403
        assert not list(cache.rglob("*.lock"))
    finally:
        _stop(one)
        _stop(two)


class _MountedMitmdump(Mitmdump):
    """mitmdump in a private mount namespace where the cache directory is a read-only
    bind mount or a tiny tmpfs (a full disk) — nothing on the host changes."""

    def __init__(self, *args, cache: Path, mount: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache
        self.mount = mount

    def command(self) -> list[str]:
        if self.mount == "readonly":
            setup = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
        else:
            setup = 'mount -t tmpfs -o size=256k tmpfs "$0"'
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{setup} && exec "$@"',
            str(self.cache),
            *super().command(),
        ]


@pytest.mark.parametrize("mount", ["readonly", "full"])
def test_unwritable_directory_never_fails_a_pull(
    registry, ca, http_client, pushed, unique, tmp_path, mount
):
    if os.geteuid() != 0:
        why = "needs root for a private mount namespace (a read-only / full directory)"
        pytest.fail(why) if in_ci() else pytest.skip(why)
    require_tool("unshare", "util-linux")
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/ro", layers=2, layer_size=600_000)
    warm, cold = (layer.digest for layer in image.layers)
    repo = f"team/{unique}/ro"
    if mount == "readonly":  # a warm directory, then mounted read-only
        first = Mitmdump(registry.url, ca, RULES, extra_args=cache_args(cache)).start()
        try:
            assert fetch(http_client(first.url, ALICE), repo, warm)[0] == 200
        finally:
            _stop(first)
    else:
        cache.mkdir()
    m = _MountedMitmdump(
        registry.url, ca, RULES, extra_args=cache_args(cache), cache=cache, mount=mount
    ).start()
    try:
        client = http_client(m.url, ALICE)
        for _ in range(2):
            status, body, _ = fetch(client, repo, cold)
            assert (status, sha256(body)) == (200, cold)
            time.sleep(0.3)
        if mount == "readonly":
            assert fetch(client, repo, warm)[0] == 307  # what it holds is still served
            assert "not writable" in m.log_text()
        log = m.log_text()
        assert (
            log.count("cannot write") <= 1
            if mount == "readonly"
            else log.count("cannot write") == 1
        ), log[-2000:]
    finally:
        _stop(m)
    assert cold not in cached_files(cache)


def test_skopeo_pulls_warm_through_the_cache(registry, proxy, skopeo, pushed, unique, tmp_path):
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/sk", layers=3, layer_size=300_000)
    p = proxy(RULES, extra_args=cache_args(cache))
    src = f"docker://{p.host}/team/{unique}/sk:v1"
    skopeo.copy(src, f"oci:{tmp_path / 'cold'}:x", src_creds=ALICE, tls_verify=False)
    time.sleep(0.3)
    registry.mark()
    skopeo.copy(src, f"oci:{tmp_path / 'warm'}:x", src_creds=ALICE, tls_verify=False)
    warm = registry.access_log(since_mark=True)
    for digest in image.blob_digests:
        assert not upstream_gets(registry, digest), digest
        assert (tmp_path / "warm" / "blobs" / "sha256" / digest.split(":")[1]).exists()
        # One question per blob for this client's new token (asked ahead or not).
        assert [e.method for e in warm if e.path.endswith(digest)] == ["HEAD"], digest
    # The ping was answered by the proxy; the tag was asked with a HEAD, nothing fetched.
    assert not [e for e in warm if e.path == "/v2/"]
    assert [(e.method, e.status) for e in warm if e.path.endswith("/v1")] == [("HEAD", 200)]


def _redirects(mitmdump) -> int:
    return mitmdump.log_text().count("<< 307 Temporary Redirect")


def test_docker_pulls_warm_through_the_cache(registry, proxy, pushed, unique, tmp_path):
    require_tools(*DOCKER_TOOLS)
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/dk-{unique}", layers=2, layer_size=300_000)
    p = proxy(RULES, extra_args=cache_args(cache))
    ref = f"{p.host}/team/dk-{unique}:v1"
    with Dockerd() as dockerd:
        dockerd.login(p.host, *ALICE)
        assert dockerd.pull(ref) == image.digest
        assert set(cached_files(cache)) >= set(image.blob_digests)
        dockerd.remove_images(ref)
        registry.mark()
        before = _redirects(p)
        assert dockerd.pull(ref) == image.digest
    assert not [d for d in image.blob_digests if upstream_gets(registry, d)]
    assert _redirects(p) - before >= len(image.layers)  # docker followed the redirects


def test_ctr_pulls_warm_through_the_cache(registry, proxy, pushed, unique, tmp_path):
    require_tools(*CONTAINERD_TOOLS)
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/ctr-{unique}", layers=2, layer_size=300_000)
    p = proxy(RULES, extra_args=cache_args(cache))
    ref = f"{p.host}/team/ctr-{unique}:v1"
    user = ":".join(BOB)
    for warm in (False, True):  # a fresh containerd each time: an empty content store
        with Containerd() as containerd:
            containerd.configure_host(p.host, plain_http=True)
            registry.mark()
            before = _redirects(p)
            containerd.pull(ref, user=user)
            assert containerd.image_digest(ref) == image.digest
        fetched = [d for d in image.blob_digests if upstream_gets(registry, d)]
        if warm:
            # Layers by redirect; the config (small) answered from the file: none upstream.
            assert fetched == [] and _redirects(p) - before >= len(image.layers)
        else:
            assert sorted(fetched) == sorted(image.blob_digests)
            assert set(cached_files(cache)) >= set(image.blob_digests)


@pytest.mark.parametrize("mode", ["auto", "through"])
def test_tls_clients_get_hits_over_tls(
    registry, proxy, http_client, pushed, unique, tmp_path, mode
):
    """A client that speaks TLS to the proxy never gets its blob in clear text: a 307 to
    the blob server over TLS, with the certificate the proxy presents (`auto`), or the
    proxy relays it over the client's connection (`through`)."""
    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/tls", layers=1, layer_size=1_000_000)
    digest = image.layers[0].digest
    p = proxy(
        RULES, tls=True, extra_args=cache_args(cache, "--set", f"registry_cache_serve={mode}")
    )
    client = http_client(p.url, ALICE)  # trusts the test CA only
    repo = f"team/{unique}/tls"
    assert fetch(client, repo, digest)[0] == 200
    assert digest in cached_files(cache)
    registry.mark()
    status, body, location = fetch(client, repo, digest)
    assert sha256(body) == digest
    if mode == "auto":
        assert status == 307 and location.startswith("https://127.0.0.1:"), location
        # The same port still speaks plain HTTP to plain-HTTP clients' redirects.
        plain = location.replace("https://", "http://")
        assert sha256(http_client(p.url).raw("GET", plain).body) == digest
    else:
        assert (status, location) == (200, None)
    assert not upstream_gets(registry, digest)


def test_counters_in_the_metrics_endpoint(registry, proxy, http_client, pushed, unique, tmp_path):
    import urllib.request

    cache = tmp_path / "cache"
    image = pushed(f"acme_team/{unique}/m", layers=1, layer_size=300_000)
    digest = image.layers[0].digest
    port = free_port()
    args = cache_args(cache, "--set", f"registry_metrics=127.0.0.1:{port}")
    p = proxy(RULES, extra_args=args)
    client = http_client(p.url, ALICE)
    repo = f"team/{unique}/m"
    assert [fetch(client, repo, digest)[0] for _ in range(3)] == [200, 307, 307]
    time.sleep(0.3)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("registry_rewrite_cache_")
    }
    size = len(layer_bytes(image, digest))
    assert values["registry_rewrite_cache_misses_total"] == 1
    assert values["registry_rewrite_cache_hits_total"] == 2
    assert values["registry_rewrite_cache_bytes_fetched_total"] == size
    assert values["registry_rewrite_cache_bytes_served_total"] == 2 * size
    assert values["registry_rewrite_cache_evictions_total"] == 0


def test_a_tag_answered_from_the_cache_holds_the_request_body(
    registry, proxy, http_client, pushed, unique, tmp_path
):
    """A GET by tag the cache answers never streams a body sent along: a small one with
    `Expect: 100-continue` is read and the manifest served; a big chunked one gets the
    413 JSON after at most a few MiB, and the proxy goes on serving."""
    from tests.e2e.test_fail_closed import assert_json_error, send_streaming

    p = proxy(RULES, extra_args=cache_args(tmp_path / "cache"))
    image = pushed(f"library/{unique}")
    client = http_client(p.url, ALICE)
    for _ in range(2):  # fetched, then served from the cache
        r = client.request("GET", f"/v2/{unique}/manifests/v1", headers=MANIFEST_ACCEPT)
        assert r.status == 200 and sha256(r.body) == image.digest
    token = next(iter(client._tokens.values()))
    headers = {"Authorization": f"Bearer {token}", **MANIFEST_ACCEPT}
    target = f"/v2/{unique}/manifests/v1".encode()
    registry.mark()
    status, hdrs, body, _ = send_streaming(
        LOOPBACK, p.port, "GET", target, {**headers, "Expect": "100-continue"}, 1000, chunked=False
    )
    assert status == 200 and sha256(body) == image.digest, (status, hdrs, body[:200])
    status, hdrs, body, sent = send_streaming(
        LOOPBACK, p.port, "GET", target, headers, 64 << 20, chunked=True, deadline=20
    )
    assert_json_error(status, hdrs, body, 413)
    assert sent < 64 << 20
    tag = [(e.method, e.status) for e in registry.access_log(since_mark=True) if "/v1" in e.path]
    assert ("GET", 200) not in tag  # both answered by the cache, after a HEAD each
    r = client.request("GET", f"/v2/{unique}/manifests/v1", headers=MANIFEST_ACCEPT)
    assert r.status == 200 and sha256(r.body) == image.digest
