"""The blob cache's pure parts (regrewrite.blobcache, blobserver) and the addon's options
and hooks in mitmproxy's test context (the upstream is faked; tests/e2e/test_cache.py
runs the real thing)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import threading
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from regrewrite import realm
from regrewrite.addons.cache import BlobCache, _manifest_type
from regrewrite.blobcache import (
    Digest,
    Grants,
    Signer,
    Store,
    WriteBehind,
    parse_digest,
    parse_size,
    shared_secret,
)
from regrewrite.blobserver import BlobServer

DATA = os.urandom(300_000)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())


@pytest.mark.parametrize(
    "text, size",
    [("1000", 1000), ("50G", 50 << 30), ("512MiB", 512 << 20), ("1.5k", 1536), ("2 T", 2 << 40)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "10 apples", "1e9"])
def test_parse_size_quotes_bad_input(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_parse_digest_only_verifiable_digests():
    assert parse_digest(str(DIGEST)) == DIGEST
    assert parse_digest("sha512:" + "a" * 128) == Digest("sha512", "a" * 128)
    for bad in ("latest", "sha256:" + "A" * 64, "sha256:abc", "md5:" + "a" * 32, "sha256:../x"):
        assert parse_digest(bad) is None, bad


def write(store: Store, chunks, length, *, max_queued=1 << 30) -> str:
    outcome = []
    done = threading.Event()

    def finished(result: str) -> None:
        outcome.append(result)
        done.set()

    w = WriteBehind(store, "up", DIGEST, max_queued=max_queued, done=finished)
    for chunk in chunks:
        w.feed(chunk)
    w.close(length)
    assert done.wait(10)
    return outcome[0]


def test_write_behind_stores_only_a_verified_complete_body(tmp_path):
    store = Store(str(tmp_path))
    half = len(DATA) // 2
    assert write(store, [DATA[:half]], len(DATA)) == "corrupt"  # truncated
    assert write(store, [DATA[:half], b"x" + DATA[half + 1 :]], len(DATA)) == "corrupt"
    assert store.size("up", DIGEST) is None
    assert write(store, [DATA[:half], DATA[half:]], len(DATA)) == "stored"
    assert store.size("up", DIGEST) == len(DATA)
    assert list(tmp_path.glob("up/tmp/*")) == []  # no temp file left either way


def test_write_behind_gives_up_instead_of_buffering(tmp_path):
    store = Store(str(tmp_path))
    chunks = [DATA[i : i + 1000] for i in range(0, len(DATA), 1000)]
    # The queue bound is far below the body: the writer must drop it, not grow.
    assert write(store, chunks, len(DATA), max_queued=2000) in ("overflow", "stored")
    outcome = write(store, [DATA], len(DATA), max_queued=1000)
    assert outcome == "overflow"


def test_write_behind_reports_an_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert write(Store(str(blocker)), [DATA], len(DATA)).startswith("error:")


def test_eviction_is_lru_by_mtime_and_spares_pinned(tmp_path):
    store = Store(str(tmp_path))
    paths = []
    for i in range(4):
        d = Digest("sha256", f"{i:064x}")
        path = store.path("up", d)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    os.utime(paths[0], (2000, 2000))  # served last
    removed, left = store.evict(200, pinned=lambda p: p == paths[1])
    assert (removed, left) == (2, 200)
    assert [os.path.exists(p) for p in paths] == [True, True, False, False]


def test_stale_temp_files_are_cleaned(tmp_path):
    store = Store(str(tmp_path))
    (tmp_path / "up" / "tmp").mkdir(parents=True)
    old, new = tmp_path / "up/tmp/old", tmp_path / "up/tmp/new"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert list(store.entries()) == []
    assert not old.exists() and new.exists()


def test_verify_removes_a_bad_file(tmp_path):
    store = Store(str(tmp_path))
    assert write(store, [DATA], len(DATA)) == "stored"
    assert store.verify("up", DIGEST)
    path = store.path("up", DIGEST)
    with open(path, "r+b") as f:
        f.write(b"!")
    assert not store.verify("up", DIGEST)
    assert not os.path.exists(path)


def test_store_resolve_rejects_paths_outside(tmp_path):
    store = Store(str(tmp_path))
    assert store.resolve(f"up/sha256/{DIGEST.hex}") == store.path("up", DIGEST)
    for bad in ("../sha256/" + DIGEST.hex, "up/tmp/x", "up/sha256/../../etc", "a/b"):
        assert store.resolve(bad) is None, bad


def test_signer_and_shared_secret(tmp_path):
    key = shared_secret(str(tmp_path))
    assert shared_secret(str(tmp_path)) == key and len(key) == 32
    signer = Signer(key)
    sig = signer.sign("up/sha256/x", 2000)
    assert signer.check("up/sha256/x", "2000", sig, now=1999)
    assert not signer.check("up/sha256/x", "2000", sig, now=2001)  # expired
    assert not signer.check("up/sha256/y", "2000", sig, now=1999)  # another blob
    assert not signer.check("up/sha256/x", "2001", sig, now=1999)  # extended
    assert not Signer(os.urandom(32)).check("up/sha256/x", "2000", sig, now=1999)


def test_grants_never_outlive_the_token():
    grants = Grants(ttl=30)
    key = Grants.key("Bearer abc", "up", "repo")
    assert key != Grants.key("Bearer abd", "up", "repo") != Grants.key("Bearer abc", "up", "r2")
    grants.remember(key, now=100, expires=110)
    assert grants.allowed(key, 109) and not grants.allowed(key, 110)
    grants.remember(key, now=100, expires=None)
    assert grants.allowed(key, 129) and not grants.allowed(key, 131)
    grants.remember(key, now=100, expires=90)  # already expired: not kept
    assert not grants.allowed(key, 100)


def test_blob_server_sends_signed_files_only(tmp_path):
    store = Store(str(tmp_path))
    assert write(store, [DATA], len(DATA)) == "stored"
    signer = Signer(b"k" * 32)
    served = []
    server = BlobServer(store, signer, "127.0.0.1", 0, served=served.append).start()
    try:
        rel = store.relpath("up", DIGEST)
        exp = int(time.time()) + 60

        def get(target: str, headers=None):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", target, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            conn.close()
            return r.status, body, r

        ok = f"/blobs/{rel}?e={exp}&s={signer.sign(rel, exp)}"
        status, body, r = get(ok)
        assert (status, body, r.getheader("Docker-Content-Digest")) == (200, DATA, str(DIGEST))
        deadline = time.monotonic() + 5
        while not served and time.monotonic() < deadline:
            time.sleep(0.01)  # counted once sendfile returned, maybe after our read
        assert served == [len(DATA)]
        status, body, r = get(ok, {"Range": "bytes=10-19"})
        assert (status, body, r.getheader("Content-Range")) == (
            206,
            DATA[10:20],
            f"bytes 10-19/{len(DATA)}",
        )
        assert get(f"/blobs/{rel}?e={exp}&s={'0' * 64}")[0] == 403
        assert get(f"/blobs/{rel}?e={exp - 120}&s={signer.sign(rel, exp - 120)}")[0] == 403
        assert get("/etc/passwd")[0] == 404
    finally:
        server.stop()


def test_manifest_type_from_the_manifest():
    assert _manifest_type(
        b'{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}'
    ) == ("application/vnd.docker.distribution.manifest.v2+json")
    assert _manifest_type(b'{"schemaVersion":2,"manifests":[]}') == (
        "application/vnd.oci.image.index.v1+json"
    )
    assert _manifest_type(b'{"schemaVersion":2,"config":{}}') == (
        "application/vnd.oci.image.manifest.v1+json"
    )


# --- the addon ---------------------------------------------------------------------


def test_options_are_checked(tmp_path):
    cache = BlobCache()
    with taddons.context(cache) as tctx:
        with pytest.raises(exceptions.OptionsError, match="'lots'"):
            tctx.configure(cache, registry_cache_max_bytes="lots")
        tctx.configure(cache, registry_cache_max_bytes="50G")
        assert cache.cap == 50 << 30
        assert cache.store is None  # off by default
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(exceptions.OptionsError, match="registry_cache_dir"):
            tctx.configure(cache, registry_cache_dir=str(blocker / "sub"))
        tctx.configure(cache, registry_cache_dir=str(tmp_path / "c"), listen_host="127.0.0.1")
        assert cache.server is not None and cache.server.port
        tctx.configure(cache, registry_cache_dir=None)
        assert cache.server is None


def _mapped_flow(path: str, method: str = "GET", auth: str | None = "Bearer t"):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    if auth:
        f.request.headers["Authorization"] = auth
    f.metadata["registry_decision"] = "mapped"
    return f


def test_only_gets_by_digest_of_mapped_flows_are_looked_at(tmp_path, monkeypatch):
    cache = BlobCache()
    with taddons.context(cache) as tctx:
        tctx.configure(cache, registry_cache_dir=str(tmp_path), listen_host="127.0.0.1")
        looked = []
        monkeypatch.setattr(cache.store, "size", lambda *a: looked.append(a) or None)
        blob = f"/v2/acme/x/blobs/{DIGEST}"
        flows = [
            _mapped_flow("/v2/acme/x/manifests/latest"),  # a tag: always upstream
            _mapped_flow(blob, "HEAD"),
            _mapped_flow("/v2/acme/x/blobs/md5:" + "a" * 32),
        ]
        refused = _mapped_flow(blob)
        refused.metadata["registry_decision"] = "denied"
        for f in [*flows, refused]:
            asyncio.run(cache.requestheaders(f))
            assert f.response is None and f.id not in cache.pending
        assert looked == []
        miss = _mapped_flow(blob)

        async def run():
            cache.loop = asyncio.get_running_loop()
            await cache.requestheaders(miss)
            assert miss.id in cache.pending  # noted as a miss once the upstream says 200
            cache.error(miss)  # the download failed: waiters are let go
            assert miss.id not in cache.pending and len(cache.flights) == 0

        asyncio.run(run())
        tctx.configure(cache, registry_cache_dir=None)


def test_anonymous_and_unauthorised_hits_go_upstream(tmp_path, monkeypatch):
    cache = BlobCache()
    with taddons.context(cache) as tctx:
        tctx.configure(cache, registry_cache_dir=str(tmp_path), listen_host="127.0.0.1")
        assert write(cache.store, [DATA], len(DATA)) == "stored"
        monkeypatch.setattr(
            "regrewrite.addons.cache.upstream_dirname", lambda scheme, host, port: "up"
        )
        asked = []

        def fetch(method, url, headers, body, tls, timeout):
            asked.append((method, dict(headers)))
            return realm.Reply(401, (), b"")

        monkeypatch.setattr("regrewrite.realm.fetch", fetch)
        blob = f"/v2/acme/x/blobs/{DIGEST}"
        anonymous, denied = _mapped_flow(blob, auth=None), _mapped_flow(blob, auth="Bearer no")
        for f in (anonymous, denied):
            asyncio.run(cache.requestheaders(f))
            assert f.response is None and "cache bypass" in f.comment
        assert asked == [("HEAD", {"Authorization": "Bearer no"})]
        tctx.configure(cache, registry_cache_dir=None)
