"""Attacks on the cache's warm-pull answers (the remembered ping, tags resolved by a
HEAD upstream, questions asked ahead), with the core and the cache composed as in
addon/registry_rewrite.py and the upstream faked (``realm.fetch``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time

import pytest
from mitmproxy.http import Response
from mitmproxy.test import taddons

import registry_rewrite
from regrewrite import realm
from regrewrite.addons import cache as cache_addon
from regrewrite.addons.cache import BlobCache
from regrewrite.blobcache import Digest
from tests.unit.test_addon import flow
from tests.unit.test_blobcache import descriptor, manifest_naming, put

RULES = """
token_path: /auth
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
UPSTREAM_CHALLENGE = 'Bearer realm="https://auth.upstream.test/token",service="registry"'


@pytest.fixture
def both(tmp_path, monkeypatch):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    core, cache = registry_rewrite.RegistryRewrite(), BlobCache()
    with taddons.context(core, cache) as tctx:
        tctx.configure(core, registry_rules=str(rules))
        tctx.configure(cache, registry_cache_dir=str(tmp_path / "cache"), listen_host="127.0.0.1")
        # (what tests.unit.test_blobcache.put stores under)
        monkeypatch.setattr(cache_addon, "upstream_dirname", lambda scheme, host, port: "up")
        yield core, cache
        tctx.configure(cache, registry_cache_dir=None)


async def ping(core, cache, upstream_status: int | None = 401) -> Response:
    """A plain ping through the hooks in mitmproxy's order; `upstream_status` is what
    the upstream answers if the request gets there (None: it must not)."""
    f = flow("/v2/")
    core.requestheaders(f)
    await cache.requestheaders(f)
    if f.response is None:
        assert upstream_status is not None, "the ping went upstream"
        f.response = Response.make(
            upstream_status,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
            {"Content-Type": "application/json", "WWW-Authenticate": UPSTREAM_CHALLENGE},
        )
        core.responseheaders(f)
        await core.response(f)
    else:
        assert upstream_status is None, "the ping was answered by the cache"
    cache.response(f)
    return f.response


def test_a_remembered_ping_is_not_remembered_again_from_its_own_answer(both, monkeypatch):
    """The 30 s are counted from the upstream's answer: a ping answered from memory
    must not renew it, or steady traffic keeps a challenge forever."""
    core, cache = both
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now)
    asyncio.run(ping(core, cache))
    for later in (10, 20, 29):  # answered from memory, a client every 10 s
        monkeypatch.setattr(time, "monotonic", lambda later=later: now + later)
        asyncio.run(ping(core, cache, None))
    monkeypatch.setattr(time, "monotonic", lambda: now + cache_addon.PLAIN_SECONDS + 1)
    asyncio.run(ping(core, cache))  # the upstream is asked again


def test_a_remembered_ping_does_not_outlive_the_rules_it_was_made_with(both, tmp_path, monkeypatch):
    """The remembered answer carries the challenge of the rules then in force (token
    path, service): a reload that changes them must not be hidden behind it."""
    core, cache = both
    first = asyncio.run(ping(core, cache))
    assert 'realm="http://127.0.0.1:5000/auth"' in first.headers["WWW-Authenticate"]

    async def reload_and_ping():
        await core.reload_rules(RULES.replace("/auth", "/token2").encode())
        return await ping(core, cache)

    second = asyncio.run(reload_and_ping())
    assert 'realm="http://127.0.0.1:5000/token2"' in second.headers["WWW-Authenticate"]


def test_questions_to_a_stalled_upstream_leave_the_default_executor_free(both, monkeypatch):
    """HEADs upstream block a thread each for up to AUTH_TIMEOUT. Asked ahead, a
    manifest makes up to 16 of them at once: in asyncio's default executor they would
    hold every worker, and with them the DNS lookups of mitmproxy's upstream
    connections and the cache's own file looks (to_thread)."""
    _, cache = both
    layers = [put(cache.store, f"layer {i}".encode()) for i in range(16)]
    manifest = manifest_naming(*(descriptor(d) for d in layers))
    digest = put(cache.store, manifest)
    release = threading.Event()

    def stalled(method, url, headers, body, tls, timeout):
        if "/blobs/" in url:
            release.wait(30)
            return realm.Reply(404, (), b"")
        return realm.Reply(200, (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", stalled)

    async def run():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(4))
        cache.loop = loop
        f = flow(f"/v2/acme_team/x/manifests/{digest}", headers=[("Authorization", "Bearer t")])
        f.metadata["registry_decision"] = "mapped"
        await cache.requestheaders(f)
        assert f.response is not None and f.response.status_code == 200
        for _ in range(200):
            if cache.ahead == len(layers):
                break
            await asyncio.sleep(0.01)
        assert cache.ahead == len(layers)
        try:
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 10)
        finally:
            release.set()

    try:
        asyncio.run(run())
    finally:
        release.set()


class Injected(Exception):
    pass


FAULTS = [
    "_public_origin",
    "_rules_of",
    "_plain_key",
    "_origin_of",
    "_tls_for_upstreams",
    "referenced_digests",
    "bearer_info",
    "parse_digest",
    "_comment",
    "_redact",
    "BlobCache._answer",
    "BlobCache._answer_plain",
    "BlobCache._keep_plain",
    "BlobCache._by_tag",
    "BlobCache._ask_ahead",
    "BlobCache._question",
    "BlobCache._ask_upstream",
    "BlobCache._remember_grant",
    "BlobCache._serve",
    "patches.hold_request_body",
]


def _inject(monkeypatch, name: str) -> list:
    hits = []

    def boom(*args, **kwargs):
        hits.append(name)
        raise Injected(name)

    owner, _, attr = name.rpartition(".")
    target = {"": cache_addon, "BlobCache": BlobCache, "patches": cache_addon.patches}[owner]
    monkeypatch.setattr(target, attr, boom)
    return hits


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_in_a_warm_answer_leaves_the_flow_whole(both, monkeypatch, fault):
    """Whatever raises, each hook returns, and each flow is either answered in full
    (status, body, credential redacted) or goes upstream exactly as without the cache."""
    core, cache = both
    layer = put(cache.store, b"a layer")
    manifest = manifest_naming(descriptor(layer))
    digest = put(cache.store, manifest)
    tag_answer = {
        "Docker-Content-Digest": str(digest),
        "Content-Length": str(len(manifest)),
        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
    }

    def fetch(method, url, headers, body, tls, timeout):
        return realm.Reply(200, tuple(tag_answer.items()) if "/manifests/" in url else (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", fetch)
    auth = [("Authorization", "Bearer t")]
    flows = [
        lambda: flow("/v2/"),
        lambda: flow("/v2/team/x/manifests/v1", headers=auth),
        lambda: flow("/v2/team/x/manifests/v1", "HEAD", headers=auth),
        lambda: flow(f"/v2/team/x/blobs/{layer}", headers=auth),
    ]

    async def through(f, hits):
        core.requestheaders(f)
        sent = (f.request.method, f.request.url, f.request.headers.get("Authorization"))
        await cache.requestheaders(f)
        for _ in range(20):  # questions asked ahead settle
            await asyncio.sleep(0)
        if f.response is None:
            assert (
                f.request.method,
                f.request.url,
                f.request.headers.get("Authorization"),
            ) == sent or f.request.host == "127.0.0.1"  # relayed from the blob server
            f.response = Response.make(
                401, b"{}", {"WWW-Authenticate": UPSTREAM_CHALLENGE, "Content-Type": "x"}
            )
            core.responseheaders(f)
            await core.response(f)
        else:
            assert f.metadata.get("registry_answered")
            assert f.request.headers.get("Authorization") in (None, "Bearer <redacted>")
            assert f.response.status_code in (200, 307, 401)
        cache.response(f)

    async def run():
        cache.loop = asyncio.get_running_loop()
        for make in flows:  # fault-free first: a ping kept, grants remembered
            await through(make(), [])
        cache.grants.clear()
        hits = _inject(monkeypatch, fault)
        for make in flows:
            await through(make(), hits)
        for _ in range(200):
            if not cache.asking and not cache.tasks:
                break
            await asyncio.sleep(0.01)
        assert cache.ahead == 0  # every question asked ahead was counted down
        return hits

    errors = []
    loop_errors = lambda loop, context: errors.append(context)  # noqa: E731

    async def main():
        asyncio.get_running_loop().set_exception_handler(loop_errors)
        return await run()

    hits = asyncio.run(main())
    assert hits, f"{fault} was not reached"
    assert not errors


def _by_digest(digest, kind="blobs"):
    """A mapped request by digest with a token, as the core leaves it for the cache."""
    f = flow(f"/v2/acme_team/x/{kind}/{digest}", headers=[("Authorization", "Bearer t")])
    f.metadata["registry_decision"] = "mapped"
    return f


def _serve_by_digest(cache, digest, auth="Bearer t"):
    f = flow(f"/v2/acme_team/x/manifests/{digest}", headers=[("Authorization", auth)])
    f.metadata["registry_decision"] = "mapped"
    return f


def test_a_cached_manifest_is_not_parsed_on_the_event_loop(both, monkeypatch):
    """A manifest by digest is labelled by what it says it is: up to 4 MiB of JSON,
    parsed in a thread (a hostile 4 MiB one took 0.35 s and 94 MB to parse)."""
    _, cache = both
    digest = put(cache.store, manifest_naming(descriptor(put(cache.store, b"layer"))))
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, (), b""))
    parsed_on = []
    original = cache_addon._manifest_type

    def recording(content):
        parsed_on.append(threading.current_thread() is threading.main_thread())
        return original(content)

    monkeypatch.setattr(cache_addon, "_manifest_type", recording)

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = _serve_by_digest(cache, digest)
        await cache.requestheaders(f)
        assert f.response.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"

    asyncio.run(run())
    assert parsed_on == [False]


def test_asking_ahead_parses_small_manifests_only_and_boundedly(both, monkeypatch):
    """Each manifest served is parsed again to ask ahead, in a background task that
    outlives the flow: a big one (image manifests are a few KiB) is not parsed for it,
    and no more than MAX_AHEAD such tasks wait at once, whatever many pulls there are."""
    _, cache = both
    layer = put(cache.store, b"layer")
    small = put(cache.store, manifest_naming(descriptor(layer)))
    padded = json.loads(manifest_naming(descriptor(layer)))
    padded["annotations"] = {"x": "y" * (cache_addon.AHEAD_MANIFEST_LIMIT + 1)}
    big = put(cache.store, json.dumps(padded).encode())
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, (), b""))
    parsed = []
    release = threading.Event()

    def slow_references(manifest):  # asking ahead is slow (a busy executor)
        release.wait(10)
        parsed.append(len(manifest))
        return ()

    monkeypatch.setattr(cache_addon, "referenced_digests", slow_references)

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = _serve_by_digest(cache, big)
        await cache.requestheaders(f)
        assert f.response.status_code == 200
        assert not cache.tasks  # too big to ask ahead for
        for i in range(cache_addon.MAX_AHEAD + 10):  # many pulls while asking is slow
            f = _serve_by_digest(cache, small, auth=f"Bearer {i}")
            grant = cache_addon.Grants.key(f"Bearer {i}", "up", f"acme_team/x@{small}")
            cache.grants.remember(grant, time.time(), None)  # (no question: no thread)
            await cache.requestheaders(f)
            assert f.response.status_code == 200
        assert len(cache.tasks) <= cache_addon.MAX_AHEAD
        release.set()
        for _ in range(500):
            if not cache.tasks:
                break
            await asyncio.sleep(0.01)
        assert not cache.tasks and 0 < len(parsed) <= cache_addon.MAX_AHEAD
        assert all(n <= cache_addon.AHEAD_MANIFEST_LIMIT for n in parsed)

    try:
        asyncio.run(run())
    finally:
        release.set()


@pytest.mark.parametrize(
    "fields",
    [
        {"Content-Length": "LEN"},  # no digest
        {"Docker-Content-Digest": "DIGEST_UPPER", "Content-Length": "LEN"},
        {"Docker-Content-Digest": "sha256:zz", "Content-Length": "LEN"},
        {"Docker-Content-Digest": "DIGEST"},  # no length
        {"Docker-Content-Digest": "DIGEST", "Content-Length": "ten"},
        {"Docker-Content-Digest": "DIGEST", "Content-Length": "\u00b2"},  # a digit to isdigit
        {"Docker-Content-Digest": "DIGEST", "Content-Length": "-1"},
        [("Docker-Content-Digest", "DIGEST"), ("Docker-Content-Digest", "OTHER")]
        + [("Content-Length", "LEN")],
        [("Docker-Content-Digest", "DIGEST"), ("Content-Length", "LEN")]
        + [("Content-Length", "1")],
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_hostile_answer_to_the_tag_head_sends_the_request_upstream(
    both, monkeypatch, caplog, fields, method
):
    """Only one well-formed digest and length resolve a tag; anything else (missing,
    garbage, conflicting) is the upstream's to answer, with nothing remembered."""
    _, cache = both
    manifest = manifest_naming(descriptor(put(cache.store, b"layer")))
    digest = put(cache.store, manifest)
    other = put(cache.store, b"other")
    values = {
        "DIGEST": str(digest),
        "DIGEST_UPPER": str(digest).upper(),
        "OTHER": str(other),
        "LEN": str(len(manifest)),
    }
    items = fields.items() if isinstance(fields, dict) else fields
    answer = tuple((k, values.get(v, v)) for k, v in items)
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, answer, b""))

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = flow("/v2/acme_team/x/manifests/v1", method, headers=[("Authorization", "Bearer t")])
        f.metadata["registry_decision"] = "mapped"
        await cache.requestheaders(f)
        return f

    f = asyncio.run(run())
    assert f.response is None and f.request.headers["Authorization"] == "Bearer t"
    assert f.id not in cache.pending
    assert not cache.grants._until
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_tag_answer_with_repeated_unrelated_fields_still_resolves():
    digest = "sha256:" + "a" * 64
    reply = realm.Reply(
        200,
        (
            ("Docker-Content-Digest", digest),
            ("Content-Length", "12"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),  # (CDNs repeat fields like these)
            ("docker-content-digest", digest),  # repeated, agreeing
        ),
        b"",
    )
    resolved = cache_addon.parse_tag_answer(reply)
    assert resolved is not None and str(resolved[0]) == digest and resolved[1] == 12
    assert resolved[2] == {"docker-content-digest": digest, "content-length": "12"}


def test_a_waiter_that_goes_away_does_not_cancel_a_shared_question(both, monkeypatch):
    """Two requests of one client for one cached blob share one HEAD upstream; the
    first one's task cancelled (its client gone) leaves the second its answer."""
    _, cache = both
    layer = put(cache.store, b"a layer")
    release = threading.Event()
    asked = []

    def slow(method, url, headers, body, tls, timeout):
        asked.append(url)
        release.wait(10)
        return realm.Reply(200, (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", slow)

    def blob():
        f = flow(f"/v2/acme_team/x/blobs/{layer}", headers=[("Authorization", "Bearer t")])
        f.metadata["registry_decision"] = "mapped"
        return f

    async def run():
        cache.loop = asyncio.get_running_loop()
        first, second = blob(), blob()
        gone = asyncio.ensure_future(cache.requestheaders(first))
        stays = asyncio.ensure_future(cache.requestheaders(second))
        for _ in range(200):
            if cache.asking and asked:
                break
            await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.05)
        release.set()
        await stays
        assert second.metadata.get("registry_cache") == "hit"
        assert first.response is None

    try:
        asyncio.run(run())
    finally:
        release.set()
    assert len(asked) == 1


@pytest.mark.parametrize(
    "auth, path",
    [
        # Bytes no upstream question can carry (http.client sends latin-1 only).
        (b"Bearer tok\xe2\x82\xacn-SECRET", "/v2/acme_team/x/manifests/v1"),
        (b"Bearer tok\xffn-SECRET", f"/v2/acme_team/x/blobs/sha256:{'a' * 64}"),
        # A query that may carry a secret (the core never logs one either).
        (b"Bearer t", "/v2/acme_team/x/manifests/v1?access_token=SECRET"),
        (b"Bearer t", "/v2/acme_team/x/manifests/v1?x=SECRET%20&y=\x7f"),
    ],
)
def test_a_question_the_client_makes_unaskable_goes_upstream_quietly(
    both, monkeypatch, caplog, auth, path
):
    """A client's odd bytes make the upstream question fail: the request goes
    upstream as it is, logged without a traceback and without the secret."""
    _, cache = both
    caplog.set_level("DEBUG")
    put(cache.store, b"a" * 10)
    digest = put(cache.store, b"x")
    real_fetch = realm.fetch

    def fetch(method, url, headers, body, tls, timeout):  # the real one, to no server
        return real_fetch(
            method, url.replace("upstream.test", "127.0.0.1:9"), headers, body, tls, timeout
        )

    monkeypatch.setattr("regrewrite.realm.fetch", fetch)
    if "/blobs/" in path:
        path = path.replace("a" * 64, digest.hex)

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = flow(path)
        f.request.headers[b"Authorization"] = auth
        f.metadata["registry_decision"] = "mapped"
        await cache.requestheaders(f)
        return f

    f = asyncio.run(run())
    assert f.response is None and dict(f.request.headers.fields)[b"Authorization"] == auth
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert "SECRET" not in caplog.text and "Traceback" not in caplog.text


def test_a_tag_that_moves_between_head_and_get_is_no_corrupt_upstream(both, monkeypatch, caplog):
    """The GET by tag brings the manifest the tag names by then: when the tag moved
    after the HEAD it has another digest. Not cached, and not reported as an upstream
    sending corrupt data (a warning and the rejected counter are for that)."""
    _, cache = both
    old = Digest("sha256", "0" * 64)  # what the HEAD named, not cached
    new_manifest = manifest_naming(descriptor(put(cache.store, b"layer")))
    answer = (("Docker-Content-Digest", str(old)), ("Content-Length", str(len(new_manifest))))
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, answer, b""))

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = flow("/v2/acme_team/x/manifests/v1", headers=[("Authorization", "Bearer t")])
        f.metadata["registry_decision"] = "mapped"
        await cache.requestheaders(f)
        assert f.response is None and f.id in cache.pending
        f.response = Response.make(200, new_manifest, {"Content-Type": "x"})
        f.response.stream = True
        cache.responseheaders(f)
        f.response.stream(new_manifest)
        f.response.stream(b"")
        cache.response(f)
        for _ in range(500):
            if f.id not in cache.pending:
                break
            await asyncio.sleep(0.01)
        assert f.id not in cache.pending and len(cache.flights) == 0

    asyncio.run(run())
    assert cache.store.size("up", old) is None
    assert cache.counts["rejected"] == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]


def test_forwarding_headers_of_an_untrusted_client_do_not_poison_a_remembered_answer(
    tmp_path, monkeypatch
):
    """Only a trusted balancer's X-Forwarded-* set the public address, which keys the
    remembered answer and names its realm: a client sending its own gets (and leaves)
    the answer for the address it really came in on."""
    from regrewrite.addons.trusted import TrustedProxies

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    trusted, core, cache = TrustedProxies(), registry_rewrite.RegistryRewrite(), BlobCache()
    with taddons.context(trusted, core, cache) as tctx:
        tctx.configure(trusted, registry_trusted_proxies="10.0.0.1")
        tctx.configure(core, registry_rules=str(rules))
        tctx.configure(cache, registry_cache_dir=str(tmp_path / "cache"), listen_host="127.0.0.1")

        async def ping(forwarded: bool, peer: str) -> Response:
            headers = [("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https")]
            f = flow("/v2/", headers=headers if forwarded else [])
            f.client_conn.peername = (peer, 40000)
            trusted.requestheaders(f)
            core.requestheaders(f)
            await cache.requestheaders(f)
            if f.response is None:
                f.response = Response.make(
                    401,
                    b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                    {"Content-Type": "application/json", "WWW-Authenticate": UPSTREAM_CHALLENGE},
                )
                core.responseheaders(f)
                await core.response(f)
            cache.response(f)
            return f.response

        first = asyncio.run(ping(True, "192.0.2.7"))  # untrusted, with its own headers
        again = asyncio.run(ping(False, "192.0.2.8"))
        for answer in (first, again):
            assert 'realm="http://127.0.0.1:5000/auth"' in answer.headers["WWW-Authenticate"]
        behind = asyncio.run(ping(True, "10.0.0.1"))  # the balancer's own: its address
        assert 'realm="https://evil.example/auth"' in behind.headers["WWW-Authenticate"]
        assert len(cache.plain) == 2
        tctx.configure(cache, registry_cache_dir=None)


def test_a_clients_own_question_is_not_queued_behind_questions_asked_ahead(both, monkeypatch):
    """MAX_AHEAD questions asked ahead of a stalled upstream must leave threads for
    the questions a client is waiting on (a tag resolved, a blob authorised): those
    wait for no one else's speed-up."""
    _, cache = both
    manifests = []
    for m in range(2):
        layers = [put(cache.store, f"layer {m} {i}".encode()) for i in range(16)]
        manifests.append(put(cache.store, manifest_naming(*(descriptor(d) for d in layers))))
    release = threading.Event()

    def fetch(method, url, headers, body, tls, timeout):
        if "/blobs/" in url:
            release.wait(30)  # the questions asked ahead stall
            return realm.Reply(404, (), b"")
        return realm.Reply(200, (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", fetch)

    async def run():
        cache.loop = asyncio.get_running_loop()
        for i, digest in enumerate(manifests):
            f = flow(
                f"/v2/acme_team/x/manifests/{digest}",
                headers=[("Authorization", f"Bearer {i}")],
            )
            f.metadata["registry_decision"] = "mapped"
            await asyncio.wait_for(cache.requestheaders(f), 10)  # (the 2nd after 16 ahead)
            assert f.response.status_code == 200
            for _ in range(300):
                if cache.ahead == 16 * (i + 1):
                    break
                await asyncio.sleep(0.01)
        assert cache.ahead == cache_addon.MAX_AHEAD
        other = flow(
            f"/v2/acme_team/x/manifests/{manifests[0]}", headers=[("Authorization", "Bearer o")]
        )
        other.metadata["registry_decision"] = "mapped"
        try:
            await asyncio.wait_for(cache.requestheaders(other), 10)
        finally:
            release.set()
        assert other.response is not None and other.response.status_code == 200

    try:
        asyncio.run(run())
    finally:
        release.set()


def test_nothing_is_asked_ahead_when_no_answer_is_remembered(both, monkeypatch):
    """With registry_cache_grant_seconds=0 every hit asks for itself: an answer asked
    ahead would be thrown away, one more HEAD upstream per blob of every pull."""
    _, cache = both
    ctx_options = cache_addon.ctx.options
    ctx_options.update(registry_cache_grant_seconds=0)
    layer = put(cache.store, b"a layer")
    digest = put(cache.store, manifest_naming(descriptor(layer)))
    asked = []

    def fetch(method, url, headers, body, tls, timeout):
        asked.append(url.split("/v2/", 1)[1])
        return realm.Reply(200, (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", fetch)

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = _serve_by_digest(cache, digest)
        await cache.requestheaders(f)
        assert f.response.status_code == 200
        for _ in range(50):
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert asked == [f"acme_team/x/manifests/{digest}"]


def test_an_upstream_that_answers_a_question_forever_does_not_hold_the_flow(both, monkeypatch):
    """realm.fetch's timeout is per socket operation: an upstream trickling its answer a
    byte at a time holds a question far past it. The flow waits no longer than the
    question's deadline, then goes upstream as it is."""
    _, cache = both
    monkeypatch.setattr(cache_addon, "AUTH_TIMEOUT", 0.2)
    release = threading.Event()

    def trickling(method, url, headers, body, tls, timeout):
        release.wait(30)
        return realm.Reply(200, (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", trickling)

    async def run():
        cache.loop = asyncio.get_running_loop()
        f = flow("/v2/acme_team/x/manifests/v1", headers=[("Authorization", "Bearer t")])
        f.metadata["registry_decision"] = "mapped"
        try:
            await asyncio.wait_for(cache.requestheaders(f), 10)
        finally:
            release.set()
        assert f.response is None and f.request.headers["Authorization"] == "Bearer t"

    try:
        asyncio.run(run())
    finally:
        release.set()


def test_hashes_after_a_restart_leave_the_caches_disk_looks_free(both, monkeypatch):
    """After a restart every cached blob is hashed once before it is served (minutes for
    a few GB). Four of them held all the cache's disk threads: every other pull's stat
    of the cache, even a miss that needs nothing more, waited behind the hashes."""
    _, cache = both
    blobs = [put(cache.store, f"layer {i}".encode()) for i in range(cache_addon.FILE_WORKERS)]
    release = threading.Event()
    verifying = threading.Semaphore(0)

    def slow_verify(upstream, digest):
        verifying.release()
        release.wait(30)
        return True

    monkeypatch.setattr(cache.store, "verify", slow_verify)
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, (), b""))

    async def run():
        cache.loop = asyncio.get_running_loop()
        hits = [asyncio.ensure_future(cache.requestheaders(_by_digest(d))) for d in blobs]
        for _ in blobs:
            assert await asyncio.to_thread(verifying.acquire, True, 10)
        try:
            absent = Digest("sha256", "f" * 64)
            miss = _by_digest(absent)
            await asyncio.wait_for(cache.requestheaders(miss), 10)
            assert miss.response is None and miss.id in cache.pending
        finally:
            release.set()
            await asyncio.gather(*hits)
            cache._land(miss.id, "failed")

    try:
        asyncio.run(run())
    finally:
        release.set()


def test_a_hit_looks_at_the_disk_once_and_does_not_wait_for_its_touch(both, monkeypatch):
    """Each look at the disk is a hop to a thread and back, and while mitmproxy's loop is
    busy each hop waits up to the GIL's switch interval (measured: 5 ms per hop for the
    four parallel blob requests of a warm pull, three hops each). A hit stats its file
    once; the touch that keeps eviction's order runs behind the answer."""
    _, cache = both
    digest = put(cache.store, b"x" * (cache_addon.INLINE_BLOB + 1))  # (redirected)
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, (), b""))
    looks = []
    on_disk = cache._on_disk

    def counting(fn, *args):
        looks.append(getattr(fn, "__name__", repr(fn)))
        return on_disk(fn, *args)

    touching = threading.Event()
    release = threading.Event()

    def stuck_touch(path):
        touching.set()
        release.wait(10)

    monkeypatch.setattr(cache, "_on_disk", counting)
    monkeypatch.setattr(cache.store, "touch", stuck_touch)

    async def run():
        cache.loop = asyncio.get_running_loop()
        first = _by_digest(digest)
        await asyncio.wait_for(cache.requestheaders(first), 5)  # answered, touch stuck
        assert first.response is not None and first.response.status_code == 307
        assert await asyncio.to_thread(touching.wait, 5)
        assert looks == ["_ident", "stuck_touch"]
        looks.clear()
        second = _by_digest(digest)
        await asyncio.wait_for(cache.requestheaders(second), 5)
        assert second.response is not None and second.response.status_code == 307
        assert looks == ["_ident", "stuck_touch"]

    try:
        asyncio.run(run())
    finally:
        release.set()


def _hit_while_asked(cache, monkeypatch, f, meanwhile) -> None:
    """`f` through the cache's requestheaders with a fake upstream whose answer (a yes)
    waits until `meanwhile()` has run, once the question is being asked."""
    asked, release = threading.Event(), threading.Event()

    def fetch(method, url, headers, body, tls, timeout):
        asked.set()
        release.wait(10)
        return realm.Reply(200, (), b"")

    monkeypatch.setattr("regrewrite.realm.fetch", fetch)

    async def run():
        cache.loop = asyncio.get_running_loop()
        hit = asyncio.ensure_future(cache.requestheaders(f))
        assert await asyncio.to_thread(asked.wait, 5)
        meanwhile()
        release.set()
        await asyncio.wait_for(hit, 5)
        cache._land(f.id, "failed")

    try:
        asyncio.run(run())
    finally:
        release.set()


@pytest.mark.parametrize("there", ["corrupt", "absent"])
def test_a_hit_whose_cache_directory_is_reloaded_meanwhile_serves_only_the_new_ones_checked_file(
    both, tmp_path, monkeypatch, there
):
    """A hit looks at its file once, then asks the upstream (seconds): a reload of
    registry_cache_dir meanwhile must not let the file found in the old directory (and
    checked there) vouch for the new directory's, which is what the redirect names: the
    new one's file is hashed first, and a missing one is no redirect to a 404."""
    _, cache = both
    data = b"x" * (cache_addon.INLINE_BLOB + 1)  # (redirected)
    digest = put(cache.store, data)
    cache.verified.add(cache_addon._ident(cache.store.path("up", digest)))
    other = tmp_path / "other"
    if there == "corrupt":  # (as another replica's broken disk would hold it)
        target = other / "up" / "sha256" / digest.hex
        target.parent.mkdir(parents=True)
        target.write_bytes(b"y" * len(data))
    f = _by_digest(digest)
    _hit_while_asked(
        cache,
        monkeypatch,
        f,
        lambda: cache_addon.ctx.options.update(registry_cache_dir=str(other)),
    )
    # Not answered from the new directory: it holds no good copy (the corrupt one is gone).
    assert f.response is None
    assert not (other / "up" / "sha256" / digest.hex).exists()


@pytest.mark.parametrize("kind", ["manifests", "blobs"])
def test_a_checked_file_replaced_while_the_upstream_is_asked_is_not_served_unchecked(
    both, monkeypatch, kind
):
    """The one look at the disk comes before the upstream's yes (seconds): a file put
    in its place meanwhile (another inode, not checked by this process) must not be
    read out as the one that was checked."""
    _, cache = both
    data = manifest_naming(descriptor(put(cache.store, b"layer"))) if kind == "manifests" else b"z"
    digest = put(cache.store, data)
    path = cache.store.path("up", digest)
    cache.verified.add(cache_addon._ident(path))

    def replace() -> None:
        with open(path + ".new", "wb") as new:  # same size, other bytes, other inode
            new.write(bytes(len(data)))
        os.rename(path + ".new", path)

    f = _by_digest(digest, kind)
    _hit_while_asked(cache, monkeypatch, f, replace)
    assert f.response is None or f.response.content == data


def test_a_blob_served_again_within_the_second_is_not_evicted_before_one_served_between(
    both, monkeypatch
):
    """A blob served again soon after (another was served between) is the more
    recently served one, and a download that lands then must not evict it first. (A
    hit touched its file at most once a second for a while: this evicted it.)"""
    _, cache = both
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, (), b""))
    again, between = put(cache.store, b"a" * 100), put(cache.store, b"b" * 100)
    cache.cap = 200  # (two blobs of three)

    async def serve(digest):
        path = cache.store.path("up", digest)
        before = os.stat(path).st_mtime_ns
        f = _by_digest(digest)
        await cache.requestheaders(f)
        assert f.response.status_code == 200
        for _ in range(100):  # (the touch is not awaited)
            if os.stat(path).st_mtime_ns != before:
                break
            await asyncio.sleep(0.01)

    async def run():
        cache.loop = asyncio.get_running_loop()
        await serve(again)
        await serve(between)
        await serve(again)  # (within a second of its touch)
        new = await asyncio.to_thread(put, cache.store, b"n" * 100)  # a download lands
        key = ("up", new)
        pending = cache_addon._Pending(key, "blobs", cache.flights.start(key))
        cache.pending["landing"] = pending
        cache._written("landing", pending, "stored")
        await asyncio.wait_for(pending.flight, 5)

    asyncio.run(run())
    assert os.path.exists(cache.store.path("up", again))
    assert not os.path.exists(cache.store.path("up", between))


def test_files_remembered_as_checked_stay_bounded(both, monkeypatch):
    """Every checked file was remembered for good, evicted or not: a long-running
    replica's memory grew with every blob it ever cached. Past MAX_VERIFIED the files no
    longer on disk are forgotten, and if that is not enough, all are (hashed again when
    next served)."""
    _, cache = both
    monkeypatch.setattr(cache_addon, "MAX_VERIFIED", 4)
    cache.cap = 1 << 30  # (nothing evicted)
    kept = [put(cache.store, f"blob {i}".encode()) for i in range(3)]
    for digest in kept:
        cache.verified.add(cache_addon._ident(cache.store.path("up", digest)))
    for i in range(10):  # evicted long ago
        cache.verified.add((cache.store.path("up", Digest("sha256", f"{i:064x}")), 1, i))
    cache._stored(None)
    assert cache.verified == {cache_addon._ident(cache.store.path("up", d)) for d in kept}
    more = [put(cache.store, f"more {i}".encode()) for i in range(3)]
    for digest in more:
        cache.verified.add(cache_addon._ident(cache.store.path("up", digest)))
    cache._stored(None)
    assert cache.verified == set()  # (six on disk: over the bound, all forgotten)


def test_an_upstream_directory_gone_mid_scan_does_not_stop_eviction(tmp_path, monkeypatch):
    from regrewrite.blobcache import Store

    store = Store(str(tmp_path))
    for name in ("a", "b"):
        (tmp_path / name / "sha256").mkdir(parents=True)
        (tmp_path / name / "sha256" / ("0" * 64)).write_bytes(b"x" * 10)
    real = os.scandir

    def vanishing(path):
        if str(path).endswith("/a"):  # removed between the listing and its scan
            raise FileNotFoundError(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert [p for p, _, _ in store.entries()] == [str(tmp_path / "b" / "sha256" / ("0" * 64))]


def test_public_mode_redirects_to_the_proxys_public_address(tmp_path, monkeypatch):
    """Behind a TLS-terminating balancer (serve=public) a hit is a 307 to the address
    clients know, under /blobs/: the balancer routes that path to the blob servers. The
    URL is one the blob server honours (its signature), never the replica's own port."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    core, cache = registry_rewrite.RegistryRewrite(), BlobCache()
    monkeypatch.setattr(cache_addon, "upstream_dirname", lambda scheme, host, port: "up")
    monkeypatch.setattr("regrewrite.realm.fetch", lambda *a: realm.Reply(200, (), b""))
    with taddons.context(core, cache) as tctx:
        tctx.configure(
            core, registry_rules=str(rules), registry_public_url="https://registry.example.com"
        )
        tctx.configure(
            cache,
            registry_cache_dir=str(tmp_path / "cache"),
            listen_host="127.0.0.1",
            registry_cache_serve="public",
        )
        try:
            digest = put(cache.store, b"x" * (cache_addon.INLINE_BLOB + 1))
            f = _by_digest(digest)

            async def run():
                cache.loop = asyncio.get_running_loop()
                await cache.requestheaders(f)

            asyncio.run(run())
            assert f.response is not None and f.response.status_code == 307
            location = f.response.headers["Location"]
            prefix = f"https://registry.example.com/blobs/up/sha256/{digest.hex}?e="
            assert location.startswith(prefix), location
            query = dict(part.split("=", 1) for part in location.partition("?")[2].split("&"))
            relpath = f"up/sha256/{digest.hex}"
            assert cache.signer.check(relpath, query["e"], query["s"], time.time())

            # A client that came straight to this replica (no public URL, no balancer's
            # headers) is sent to the blob server's own port: /blobs/ here is the proxy.
            tctx.configure(core, registry_public_url="")
            direct = flow(
                f"/v2/acme_team/x/blobs/{digest}", headers=[("Authorization", "Bearer t")]
            )
            direct.metadata["registry_decision"] = "mapped"
            f = direct
            asyncio.run(run())
            location = direct.response.headers["Location"]
            assert location.startswith(f"http://127.0.0.1:{cache.server.port}/blobs/"), location
        finally:
            tctx.configure(cache, registry_cache_dir=None)


@pytest.mark.parametrize("unmatched", ["deny", "pass"])
def test_a_signed_blob_url_reaching_the_proxy_is_relayed_not_refused_or_sent_upstream(
    tmp_path, monkeypatch, unmatched
):
    """serve=public sends hits to /blobs/ on the public address; a balancer that does not
    route that path (deploy/haproxy.cfg without RR_BLOBS1, an ingress without the path)
    brings it to the proxy itself. Refused there (deny), every warm pull failed; under
    `unmatched: pass` the signed URL went upstream with the client's Authorization (and
    failed too). A URL this cache signed is relayed from the local blob server instead
    (found by attack6); anything else under /blobs/ is the core's as before."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("rules:", f"unmatched: {unmatched}\nrules:"))
    core, cache = registry_rewrite.RegistryRewrite(), BlobCache()
    with taddons.context(core, cache) as tctx:
        tctx.configure(core, registry_rules=str(rules))
        tctx.configure(
            cache,
            registry_cache_dir=str(tmp_path / "cache"),
            listen_host="127.0.0.1",
            registry_cache_serve="public",
        )
        try:
            digest = put(cache.store, b"x" * (cache_addon.INLINE_BLOB + 1))
            relpath = cache.store.relpath("up", digest)
            expires = int(time.time()) + 60
            signed = f"/blobs/{relpath}?e={expires}&s={cache.signer.sign(relpath, expires)}"
            f = flow(signed, headers=[("Authorization", "Bearer secret")])

            async def run(f):
                cache.loop = asyncio.get_running_loop()
                core.requestheaders(f)
                await cache.requestheaders(f)

            asyncio.run(run(f))
            req = f.request
            assert f.response is None, f.response and f.response.content
            assert (req.scheme, req.host, req.port) == ("http", "127.0.0.1", cache.server.port)
            assert req.path == signed
            assert "Bearer secret" not in str(req.headers)
            f.response = Response.make(200, b"", {"Content-Length": str(1 << 30)})
            core.responseheaders(f)
            cache.responseheaders(f)
            assert f.response.stream  # (a blob: never held in memory)

            forged = flow(signed[:-1] + "0", headers=[("Authorization", "Bearer secret")])
            asyncio.run(run(forged))
            assert forged.request.host == "upstream.test"  # (the core's, as before)
            if unmatched == "deny":
                assert forged.response.status_code == 404
        finally:
            tctx.configure(cache, registry_cache_dir=None)
