"""Scale-out: real HAProxy (Debian's) terminating TLS in front of 3 mitmdump replicas.

HAProxy runs deploy/haproxy.cfg itself, with the addresses filled in through the
environment variables the file documents (RR_BIND, RR_CERT, RR_REPLICA1-3, RR_STATS).
The replicas speak plain HTTP, trust 127.0.0.1 for X-Forwarded-*, and share one rules
directory laid out as the kubelet lays out a ConfigMap volume (rules.yaml -> ..data/ ->
a timestamped directory), so the rules edit below is the same ..data symlink swap a
`kubectl apply` of the ConfigMap makes.

Which replica served what comes from HAProxy's own log (`option httplog`'s line, with
the path for the request target: one line per request naming the server); its stats CSV
gives retries and redispatches. Run with `pytest -s` to see the figures.
"""

from __future__ import annotations

import http.client
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import require_tool
from tests.e2e.faultkit import pull_image, push_image
from tests.e2e.haproxy import HAProxy, LogEntry
from tests.e2e.images import ACCEPT_MANIFESTS, fetch_manifest
from tests.e2e.proxycheck import assert_only_upstream_names
from tests.e2e.regclient import parse_challenge
from tests.e2e.upstream import (
    ALICE,
    BOB,
    LOOPBACK,
    free_port,
)

REPLICAS = 3
RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
# The edit: the same upstream names under another client prefix.
EDITED_RULES = RULES.replace('"team/{r:path}"', '"renamed/{r:path}"')

# Kill test: concurrent pulls of distinct images, a replica SIGKILLed a third of the way.
KILL_PULLS = 36
KILL_WORKERS = 6
KILL_AFTER = 12  # pulls completed before the kill
SKOPEO_EVERY = 6  # every 6th pull is a real skopeo pull, the others raw HTTP
ROUND_TIMEOUT = 180.0  # seconds for the whole round


class ConfigMapDir:
    """A directory as the kubelet keeps a ConfigMap volume: each key is a symlink to
    ..data/KEY, ..data a symlink to a timestamped directory; an update writes a new
    directory and renames a new ..data link over the old one (atomic)."""

    def __init__(self, root: Path, files: dict[str, str]):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.update(files)

    def update(self, files: dict[str, str]) -> None:
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        version = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, data)
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(self.root / old)

    def path(self, name: str) -> Path:
        return self.root / name


@dataclass
class Cluster:
    haproxy: HAProxy
    replicas: list  # Mitmdump, in HAProxy's order replica1..3
    rules: ConfigMapDir


@pytest.fixture
def cluster(request, ca, registry, proxy, tmp_path):
    yield from _cluster(request, ca, proxy, tmp_path, cache=False)


@pytest.fixture
def cache_cluster(request, ca, registry, proxy, tmp_path):
    """The replicas share one blob cache directory; hits are 307s to /blobs/ on HAProxy,
    which routes them to the replicas' blob servers (deploy/haproxy.cfg's RR_BLOBS)."""
    yield from _cluster(request, ca, proxy, tmp_path, cache=True)


@pytest.fixture
def unrouted_cache_cluster(request, ca, registry, proxy, tmp_path):
    """As cache_cluster, but HAProxy is run without RR_BLOBS1-3: it does not route
    /blobs/, which reaches the replicas themselves."""
    yield from _cluster(request, ca, proxy, tmp_path, cache=True, blob_servers=0)


@pytest.fixture
def one_blobs_cache_cluster(request, ca, registry, proxy, tmp_path):
    """As cache_cluster, but only RR_BLOBS1 is set (RR_BLOBS2-3 unset)."""
    yield from _cluster(request, ca, proxy, tmp_path, cache=True, blob_servers=1)


def _cluster(request, ca, proxy, tmp_path, cache: bool, blob_servers: int = REPLICAS):
    require_tool("haproxy")
    rules = ConfigMapDir(tmp_path / "rules", {"rules.yaml": RULES})
    replicas, blobs = [], []
    for _ in range(REPLICAS):
        extra = ["--set", f"registry_trusted_proxies={LOOPBACK}/32"]
        if cache:
            blobs.append(f"{LOOPBACK}:{free_port()}")
            extra += [
                "--set",
                f"registry_cache_dir={tmp_path / 'cache'}",
                "--set",
                "registry_cache_serve=public",
                "--set",
                f"registry_cache_port={blobs[-1].rpartition(':')[2]}",
            ]
        replicas.append(proxy(rules_file=rules.path("rules.yaml"), extra_args=extra))
    ha = HAProxy(ca, [r.host for r in replicas], blobs[:blob_servers]).start()
    try:
        ha.wait_states({f"replica{i}": "UP" for i in range(1, REPLICAS + 1)})
        yield Cluster(ha, replicas, rules)
    finally:
        ha.stop()
        failed = getattr(request.node, "rep_call", None)
        if failed is None or failed.failed:
            print("----- haproxy log (last 100 lines) -----")
            print("\n".join(ha.log_text().splitlines()[-100:]))
        ha.cleanup()


def _replica_counts(entries: list[LogEntry]) -> dict[str, int]:
    counts = Counter(e.server for e in entries)
    return {f"replica{i}": counts.get(f"replica{i}", 0) for i in range(1, REPLICAS + 1)}


def _print_figures(title: str, figures: dict) -> None:
    print(f"\n[haproxy] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_realm_names_the_load_balancer(cluster, http_client):
    """Behind HAProxy the replicas advertise https://LB/auth (X-Forwarded-* from a trusted
    peer), whichever replica answers; the replica's own http://127.0.0.1:PORT never."""
    ha = cluster.haproxy
    client = http_client(ha.url)
    for _ in range(REPLICAS):
        r = client.raw("GET", f"{ha.url}/v2/")
        assert r.status == 401, (r.status, r.body)
        scheme, params = parse_challenge(r.header("WWW-Authenticate") or "")
        assert (scheme, params.get("realm")) == ("bearer", f"{ha.url}/auth")
    # Straight to a replica (no forwarded headers) the realm is the replica itself.
    direct = cluster.replicas[0]
    r = http_client(direct.url).raw("GET", f"{direct.url}/v2/")
    assert parse_challenge(r.header("WWW-Authenticate") or "")[1]["realm"] == f"{direct.url}/auth"
    # The three requests through HAProxy went one to each replica.
    assert _replica_counts(ha.entries()) == {f"replica{i}": 1 for i in range(1, REPLICAS + 1)}


def test_skopeo_and_ctr_pull_and_push_through_haproxy(
    cluster,
    registry,
    token_server,
    skopeo,
    containerd,
    ca,
    make_image,
    http_client,
    unique,
    tmp_path,
):
    ha = cluster.haproxy
    repo, up_repo = f"team/ha-{unique}/app", f"acme_team/ha-{unique}/app"
    image = make_image(layers=4, layer_size=20_000)
    dest = f"docker://{ha.host}/{repo}"
    direct = http_client(registry.url, ALICE)

    # skopeo push (verifying HAProxy's certificate with the test CA)
    registry.mark()
    skopeo.copy(image.ref, f"{dest}:1", dest_creds=ALICE, tls_verify=True)
    assert fetch_manifest(direct, up_repo, "1").digest == image.digest
    assert_only_upstream_names(registry.access_log(since_mark=True), up_repo)

    # skopeo pull: one token, fetched through one replica, used at the others
    ha.mark()
    token_server.clear_requests()
    out = tmp_path / "pulled"
    skopeo.copy(f"{dest}:1", f"oci:{out}:x", src_creds=ALICE, tls_verify=True)
    assert (out / "index.json").read_text().count(image.digest) == 1
    entries = ha.entries(since_mark=True)
    pull_counts = _replica_counts(entries)
    assert sum(1 for n in pull_counts.values() if n) >= 2, pull_counts
    tokens = [e for e in entries if e.path == "/auth"]
    assert len(tokens) == 1 and tokens[0].status == 200, tokens
    assert [(r.status, r.scopes) for r in token_server.requests()] == [
        (200, (f"repository:{up_repo}:pull",))
    ]
    authenticated = [
        e for e in entries if e.status == 200 and ("/manifests/" in e.path or "/blobs/" in e.path)
    ]
    assert len(authenticated) == 1 + 1 + len(image.layers), entries  # manifest, config, layers
    elsewhere = [e for e in authenticated if e.server != tokens[0].server]
    assert elsewhere, f"every authenticated request went to {tokens[0].server}: {entries}"

    # ctr pull (bob) and push of a new tag (alice), OAuth2 POST tokens through HAProxy
    containerd.configure_host(ha.host, ca=ca.ca_pem)
    ha.mark()
    registry.mark()
    containerd.pull(f"{ha.host}/{repo}:1", user=":".join(BOB))
    assert containerd.image_digest(f"{ha.host}/{repo}:1") == image.digest
    containerd.tag(f"{ha.host}/{repo}:1", f"{ha.host}/{repo}:2")
    containerd.push(f"{ha.host}/{repo}:2", user=":".join(ALICE))
    assert fetch_manifest(direct, up_repo, "2").digest == image.digest
    assert_only_upstream_names(registry.access_log(since_mark=True), up_repo)
    ctr_entries = ha.entries(since_mark=True)
    ctr_counts = _replica_counts(ctr_entries)
    assert sum(1 for n in ctr_counts.values() if n) >= 2, ctr_counts
    assert ("PUT", 201) in {(e.method, e.status) for e in ctr_entries if "/manifests/" in e.path}
    assert any(e.method == "POST" and e.path == "/auth" for e in ctr_entries), ctr_entries
    _print_figures("skopeo pull, requests per replica", pull_counts)
    _print_figures("ctr pull + push, requests per replica", ctr_counts)


def _warm_pull(ha, registry, skopeo, image, repo: str, tmp_path) -> set[str]:
    """Push `image` (layers over 64 KiB: redirected, not inlined) through `ha`, pull it
    once to fill the cache at tmp_path/cache, mark both logs, pull it again (checked).
    Returns the hex digests of its layers."""
    dest = f"docker://{ha.host}/{repo}"
    skopeo.copy(image.ref, f"{dest}:1", dest_creds=ALICE, tls_verify=True)
    skopeo.copy(f"{dest}:1", f"oci:{tmp_path / 'cold'}:x", src_creds=ALICE, tls_verify=True)
    layers = {layer.digest.partition(":")[2] for layer in image.layers}
    cached = tmp_path / "cache"
    deadline = time.monotonic() + 30
    while {p.name for p in cached.glob("*/sha256/*")} < layers:  # (renamed into place)
        assert time.monotonic() < deadline, sorted(p.name for p in cached.glob("*/*/*"))
        time.sleep(0.1)
    ha.mark()
    registry.mark()
    out = tmp_path / "warm"
    skopeo.copy(f"{dest}:1", f"oci:{out}:x", src_creds=ALICE, tls_verify=True)
    assert (out / "index.json").read_text().count(image.digest) == 1
    return layers


def test_cache_hits_leave_haproxy_from_the_blob_servers(
    cache_cluster, registry, skopeo, make_image, unique, tmp_path
):
    """Behind a TLS-terminating balancer the blob servers have no certificate clients
    trust, so hits were relayed by the proxy (a few hundred MB/s). With
    registry_cache_serve=public a hit is a 307 to /blobs/ on HAProxy's own address and
    HAProxy sends it to a blob server: a warm pull's layers all come from the blob
    servers, whichever replica signed the URL (one shared directory and key)."""
    ha = cache_cluster.haproxy
    up_repo = f"acme_team/hac-{unique}/app"
    image = make_image(layers=4, layer_size=200_000)
    layers = _warm_pull(ha, registry, skopeo, image, f"team/hac-{unique}/app", tmp_path)
    served = ha.entries(since_mark=True, backend="blobs")
    assert {e.path.rpartition("/")[2] for e in served if e.status == 200} == layers, served
    assert all(e.path.startswith("/blobs/") for e in served), served
    # The URLs' signatures (each opens its blob for a minute) are not in HAProxy's log.
    assert "&s=" not in ha.log_text()
    to_replicas = ha.entries(since_mark=True)
    redirected = [e for e in to_replicas if "/blobs/" in e.path and e.status == 307]
    assert len(redirected) == len(layers), to_replicas
    assert_only_upstream_names(registry.access_log(since_mark=True), up_repo)
    fetched = [uri for method, uri in registry.requests(since_mark=True) if method == "GET"]
    assert not [uri for uri in fetched if "/blobs/" in uri], fetched  # (HEADs only)
    _print_figures(
        "warm pull, layers per blob server",
        dict(Counter(e.server for e in served if e.status == 200)),
    )


def test_cache_hits_whose_blobs_path_is_not_routed_are_relayed_by_the_replicas(
    unrouted_cache_cluster, registry, skopeo, make_image, unique, tmp_path
):
    """Replicas run with registry_cache_serve=public behind a balancer that does not route
    /blobs/ (deploy/haproxy.cfg without RR_BLOBS1): the hits' signed URLs reach the
    replicas, which refused them (`unmatched: deny`: every warm pull failed). Now a
    replica relays a URL of the shared cache from its own blob server (found by attack6):
    the pull succeeds, and nothing of it goes to the upstream."""
    ha = unrouted_cache_cluster.haproxy
    image = make_image(layers=3, layer_size=200_000)
    layers = _warm_pull(ha, registry, skopeo, image, f"team/hau-{unique}/app", tmp_path)
    to_replicas = ha.entries(since_mark=True)
    relayed = [e for e in to_replicas if e.path.startswith("/blobs/")]
    assert {e.path.rpartition("/")[2] for e in relayed if e.status == 200} == layers, relayed
    assert not ha.entries(since_mark=True, backend="blobs")
    fetched = [uri for method, uri in registry.requests(since_mark=True) if method == "GET"]
    assert not [uri for uri in fetched if "/blobs/" in uri], fetched  # (HEADs only)


def test_blob_servers_left_unset_get_no_hits(
    one_blobs_cache_cluster, registry, skopeo, make_image, unique, tmp_path
):
    """RR_BLOBS1 set, RR_BLOBS2-3 not: their servers stand in as 127.0.0.1:9. Tracking
    the replicas (UP) gave them that state, so two hits in three went there and were
    retried elsewhere, and under load some ran out of retries (503: 33 of 400 fetches,
    40 at a time; found by attack6). Checked on their own, they are down: every hit goes
    to blobs1 at the first try."""
    ha = one_blobs_cache_cluster.haproxy
    ha.wait_states({"blobs1": "UP", "blobs2": "DOWN", "blobs3": "DOWN"}, backend="blobs")
    image = make_image(layers=4, layer_size=200_000)
    layers = _warm_pull(ha, registry, skopeo, image, f"team/ha1-{unique}/app", tmp_path)
    served = ha.entries(since_mark=True, backend="blobs")
    assert {e.path.rpartition("/")[2] for e in served if e.status == 200} == layers, served
    assert [(e.server, e.retries) for e in served] == [("blobs1", 0)] * len(served), served


@pytest.mark.slow
def test_replica_killed_during_concurrent_pulls(
    cluster, registry, skopeo, make_image, http_client, unique, tmp_path
):
    ha = cluster.haproxy
    direct = http_client(registry.url, ALICE)
    images = [make_image(layers=2, layer_size=8192) for _ in range(KILL_PULLS)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda ix: push_image(direct, f"acme_team/ha-{unique}/p{ix[0]}", ix[1], tag="1"),
                enumerate(images),
            )
        )
    victim = cluster.replicas[1]  # replica2
    done = threading.Event()
    lock = threading.Lock()
    completed: list[int] = []
    errors: list[str] = []
    retried: list[str] = []  # raw pulls cut mid-body and retried by the client

    def pull(i: int) -> None:
        repo = f"team/ha-{unique}/p{i}"
        if i % SKOPEO_EVERY == 0:
            out = tmp_path / f"pull-{i}"
            skopeo.copy(f"docker://{ha.host}/{repo}:1", f"oci:{out}:x", src_creds=ALICE)
            digest = (
                images[i].digest if images[i].digest in (out / "index.json").read_text() else "?"
            )
        else:
            try:
                digest, _ = pull_image(http_client(ha.url, ALICE), repo, "1")
            except (http.client.IncompleteRead, ConnectionError) as e:
                # A transfer cut after its answer had begun (the replica died mid-body):
                # HAProxy cannot replay it, and every real client retries it (docker 5
                # times, containerd and skopeo too): so does this one, once, counted.
                with lock:
                    retried.append(f"p{i}: {e!r}")
                digest, _ = pull_image(http_client(ha.url, ALICE), repo, "1")
        if digest != images[i].digest:
            raise AssertionError(f"p{i}: got {digest}, want {images[i].digest}")
        with lock:
            completed.append(i)
            if len(completed) >= KILL_AFTER:
                done.set()

    ha.mark()
    started = time.monotonic()
    with ThreadPoolExecutor(KILL_WORKERS) as pool:
        futures = {pool.submit(pull, i): i for i in range(KILL_PULLS)}
        assert done.wait(ROUND_TIMEOUT), "the first pulls never completed"
        victim.proc.kill()  # SIGKILL: no goodbye, connections reset mid-round
        killed_at = len(completed)
        for f in as_completed(futures, timeout=ROUND_TIMEOUT):
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(f"p{futures[f]}: {e}")
    elapsed = time.monotonic() - started
    victim.proc.wait(timeout=10)

    stats = ha.wait_states({"replica2": "DOWN", "replica1": "UP", "replica3": "UP"})
    entries = ha.entries(since_mark=True)
    counts = _replica_counts(entries)
    figures = {
        "pulls": KILL_PULLS,
        "completed": len(completed),
        "failures": len(errors),
        "client retries (cut mid-body)": len(retried),
        "killed after": killed_at,
        "requests": len(entries),
        **counts,
        "retries": stats["BACKEND"]["wretr"],
        "redispatches": stats["BACKEND"]["wredis"],
        "non-2xx": sum(1 for e in entries if not 200 <= e.status < 300 and e.status != 401),
        "seconds": round(elapsed, 1),
    }
    _print_figures("replica2 killed during concurrent pulls", figures)
    assert not errors, errors
    assert len(completed) == KILL_PULLS
    assert all(counts.values()), counts  # each replica served part of the round
    # What clients got: only answers, never a 5xx from HAProxy for the dead replica.
    assert not [e for e in entries if e.status >= 500 or e.status < 0], entries


def test_rules_edit_reaches_every_replica(cluster, registry, http_client, make_image, unique):
    ha = cluster.haproxy
    image = make_image(layers=1, layer_size=4096)
    push_image(http_client(registry.url, ALICE), f"acme_team/ha-{unique}/edit", image, tag="1")
    old, new = f"team/ha-{unique}/edit", f"renamed/ha-{unique}/edit"

    def status(replica, name: str) -> int | str:
        """200, or the registry error code the replica (or the upstream) answered."""
        client = http_client(replica.url, ALICE)
        r = client.request("GET", f"/v2/{name}/manifests/1", headers={"Accept": ACCEPT_MANIFESTS})
        return 200 if r.status == 200 else r.json()["errors"][0]["code"]

    assert [status(r, old) for r in cluster.replicas] == [200] * REPLICAS
    assert [status(r, new) for r in cluster.replicas] == ["NAME_UNKNOWN"] * REPLICAS

    cluster.rules.update({"rules.yaml": EDITED_RULES})  # the kubelet's ..data swap
    edited_at = time.monotonic()
    deadline = edited_at + 20
    pending = set(range(REPLICAS))
    while pending and time.monotonic() < deadline:
        pending = {i for i in pending if status(cluster.replicas[i], new) != 200}
        time.sleep(0.2)
    took = time.monotonic() - edited_at
    assert not pending, f"replicas {sorted(i + 1 for i in pending)} kept the old rules"
    assert [status(r, old) for r in cluster.replicas] == ["NAME_UNKNOWN"] * REPLICAS
    for r in cluster.replicas:
        assert "reloaded 1 rules" in r.log_text()
    # And through the load balancer, on every replica in turn.
    ha.mark()
    for _ in range(REPLICAS * 2):
        digest, _ = pull_image(http_client(ha.url, ALICE), new, "1")
        assert digest == image.digest
    counts = _replica_counts(ha.entries(since_mark=True))
    assert all(counts.values()), counts
    _print_figures("rules edit", {"replicas reloaded": REPLICAS, "seconds": round(took, 1)})
