"""/livez and /readyz (the Health addon before the core); the upstream is a tiny local
HTTP server, or a closed port."""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mitmproxy.test import taddons

from regrewrite.addons import health
from regrewrite.addons.health import Health, reverse_target
from tests.unit.test_addon import flow

RULES = """
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""


class _Upstream(BaseHTTPRequestHandler):
    hits = 0
    delay = 0.0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        time.sleep(self.delay)
        body = b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        self.send_response(401)  # any status is an answer
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    _Upstream.hits = 0
    _Upstream.delay = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def health_ctx(addon, rules_file):
    h = Health()
    with taddons.context(h, addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        yield h, tctx


async def ask(h, addon, path, method="GET"):
    f = flow(path, method=method)
    pending = h.requestheaders(f)
    if pending is not None:
        await pending
    addon.requestheaders(f)  # the core comes next and must leave it alone
    return f


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_livez_contacts_nothing(health_ctx, addon, method):
    h, tctx = health_ctx
    tctx.options.update(mode=[f"reverse:{closed_port_url()}"])
    f = await ask(h, addon, "/livez", method)
    assert f.response.status_code == 200
    assert f.metadata["registry_decision"] == "answered"
    assert f.request.path == "/livez"  # not rewritten, not refused by deny
    assert h.probes == {}


async def test_readyz_when_the_upstream_answers(health_ctx, addon, upstream):
    h, tctx = health_ctx
    tctx.options.update(mode=[f"reverse:{upstream}"])
    f = await ask(h, addon, "/readyz")
    assert f.response.status_code == 200, f.response.content
    head = await ask(h, addon, "/readyz?verbose", "HEAD")
    assert head.response.status_code == 200 and head.response.content == b""
    assert _Upstream.hits == 1  # the second answer came from the cached probe


async def test_readyz_reprobes_after_ttl(health_ctx, addon, upstream, monkeypatch):
    h, tctx = health_ctx
    tctx.options.update(mode=[f"reverse:{upstream}"])
    await ask(h, addon, "/readyz")
    monkeypatch.setattr(health, "PROBE_TTL", 0.0)
    await ask(h, addon, "/readyz")
    assert _Upstream.hits == 2


async def test_readyz_503_when_the_upstream_is_unreachable(health_ctx, addon):
    h, tctx = health_ctx
    tctx.options.update(mode=[f"reverse:{closed_port_url()}"])
    f = await ask(h, addon, "/readyz")
    assert f.response.status_code == 503
    error = json.loads(f.response.content)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert error["detail"] == [{"upstream": "default", "problem": "unreachable"}]
    assert "127.0.0.1" not in f.response.text  # no upstream address in the answer


async def test_readyz_503_without_rules(addon, tmp_path, upstream):
    h = Health()
    with taddons.context(h, addon) as tctx:
        tctx.options.update(mode=[f"reverse:{upstream}"])
        (tmp_path / "bad.yaml").write_text("rules: [")
        tctx.configure(addon, registry_rules=str(tmp_path / "bad.yaml"))
        f = await ask(h, addon, "/readyz")
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["errors"][0]["detail"] == [{"rules": "not loaded"}]


async def test_other_methods_are_refused_not_forwarded(health_ctx, addon):
    h, _ = health_ctx
    f = await ask(h, addon, "/readyz", "POST")
    assert f.response.status_code == 405
    assert f.response.headers["Allow"] == "GET, HEAD"


async def test_other_paths_are_left_to_the_core(health_ctx, addon):
    h, _ = health_ctx
    f = await ask(h, addon, "/livez/x")
    assert f.response.status_code == 404  # the core's deny
    assert "registry_decision" not in f.metadata or f.metadata["registry_decision"] != "answered"


def test_reverse_target():
    assert reverse_target(["reverse:https://reg.test:5000"]) == "https://reg.test:5000"
    assert reverse_target(["reverse:http://reg.test"]) == "http://reg.test"
    assert reverse_target(["regular"]) is None


def test_other_requests_pay_no_coroutine(health_ctx):
    h, _ = health_ctx
    assert h.requestheaders(flow("/v2/team/app/manifests/1")) is None
    assert h.requestheaders(flow("/livez")) is None  # answered at once


async def test_readyz_fails_closed(health_ctx, addon, monkeypatch):
    h, _ = health_ctx

    async def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(h, "readiness", broken)
    f = await ask(h, addon, "/readyz")
    assert f.response.status_code == 503


async def test_answered_under_pass_too(addon, tmp_path):
    # Under `unmatched: pass` the core would forward any path outside /v2/ upstream.
    (tmp_path / "pass.yaml").write_text(RULES.replace("deny", "pass"))
    h = Health()
    with taddons.context(h, addon) as tctx:
        tctx.configure(addon, registry_rules=str(tmp_path / "pass.yaml"))
        tctx.options.update(mode=[f"reverse:{closed_port_url()}"])
        live = await ask(h, addon, "/livez")
        ready = await ask(h, addon, "/readyz")
        other = await ask(h, addon, "/metrics")
    assert live.response.status_code == 200
    assert ready.response.status_code == 503
    assert other.response is None and other.request.stream  # the core forwards it


async def test_a_slow_probe_blocks_nothing_and_is_shared(health_ctx, addon, upstream):
    h, tctx = health_ctx
    tctx.options.update(mode=[f"reverse:{upstream}"])
    _Upstream.delay = 0.5
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        first, second = await asyncio.gather(
            ask(h, addon, "/readyz"), ask(h, addon, "/readyz", "HEAD")
        )
    finally:
        task.cancel()
    assert first.response.status_code == second.response.status_code == 200
    assert _Upstream.hits == 1  # one probe round for both
    assert ticks >= 10  # the event loop ran on while the upstream took 0.5 s
