"""Attacks on the cache's warm-pull answers (the remembered ping, tags resolved by a
HEAD upstream, questions asked ahead), with the core and the cache composed as in
addon/registry_rewrite.py and the upstream faked (``realm.fetch``)."""

from __future__ import annotations

import asyncio
import time

import pytest
from mitmproxy.http import Response
from mitmproxy.test import taddons

import registry_rewrite
from regrewrite.addons import cache as cache_addon
from regrewrite.addons.cache import BlobCache
from tests.unit.test_addon import flow

RULES = """
token_path: /auth
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
UPSTREAM_CHALLENGE = 'Bearer realm="https://auth.upstream.test/token",service="registry"'


@pytest.fixture
def both(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    core, cache = registry_rewrite.RegistryRewrite(), BlobCache()
    with taddons.context(core, cache) as tctx:
        tctx.configure(core, registry_rules=str(rules))
        tctx.configure(cache, registry_cache_dir=str(tmp_path / "cache"), listen_host="127.0.0.1")
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
    monkeypatch.setattr(time, "monotonic", lambda: now + cache_addon.PING_SECONDS + 1)
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
