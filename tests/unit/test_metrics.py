"""The Metrics addon with the core: real prometheus_client, scraped over HTTP from its own
listener. The core's metadata (registry_endpoint, ...) is set by hand where the core of
this branch does not set it yet."""

import urllib.request

import pytest
from mitmproxy import exceptions
from mitmproxy.http import Response
from mitmproxy.test import taddons
from prometheus_client.parser import text_string_to_metric_families

from regrewrite.addons.metrics import Metrics, parse_address
from tests.unit.test_addon import flow

RULES = """
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
  - client: "{name}"
    upstream: "library/{name}"
"""
SECRET_NAMES = ("team/app", "acme_team", "library/nginx", "nginx", "1.25", "sha256", "alice")


@pytest.fixture
def metrics(addon, rules_file):
    m = Metrics()
    with taddons.context(m, addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        tctx.configure(m, registry_metrics="127.0.0.1:0")
        m.running()
        yield m
        m.done()


def scrape(m) -> dict:
    """{(name, frozenset(labels.items())): value} of one real scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def finish(m, addon, f, status=200, body=b"", metadata=None, stream=False):
    addon.requestheaders(f)
    f.metadata.update(metadata or {})
    m.requestheaders(f)
    f.response = Response.make(status, body)
    f.response.timestamp_start = f.request.timestamp_start + 0.2
    f.response.stream = stream
    m.responseheaders(f)
    return f


def labels(**kw):
    return frozenset(kw.items())


def test_requests_bytes_and_latency(metrics, addon):
    md = {
        "registry_endpoint": "manifests",
        "registry_decision": "mapped",
        "registry_upstream_key": "default",
        "registry_client_name": "team/app",
        "registry_user": "alice",
    }
    f = finish(metrics, addon, flow("/v2/team/app/manifests/1.25"), 200, b"x" * 10, md)
    metrics.response(f)
    # A streamed blob: counted chunk by chunk as it passes, never buffered.
    b = finish(
        metrics,
        addon,
        flow("/v2/team/app/blobs/sha256:" + "a" * 64),
        200,
        metadata=dict(md, registry_endpoint="blobs"),
        stream=True,
    )
    assert callable(b.response.stream)
    for chunk in (b"a" * 1000, b"b" * 24, b""):
        assert b.response.stream(chunk) == chunk
    assert b.response.raw_content == b""  # nothing was kept
    metrics.response(b)
    got = scrape(metrics)
    key = labels(upstream="default", endpoint="manifests", method="GET", code="200")
    assert got[("registry_rewrite_requests_total", key)] == 1
    key = labels(upstream="default", direction="response")
    assert got[("registry_rewrite_bytes_total", key)] == 10 + 1024
    key = labels(upstream="default", endpoint="manifests", le="0.25")
    assert got[("registry_rewrite_upstream_seconds_bucket", key)] == 1
    key = labels(upstream="default", endpoint="manifests", le="0.1")
    assert got[("registry_rewrite_upstream_seconds_bucket", key)] == 0


def test_streamed_request_bytes(metrics, addon):
    f = flow("/v2/team/app/blobs/uploads/u1", method="PUT")
    addon.requestheaders(f)
    f.metadata.update(registry_upstream_key="default", registry_decision="mapped")
    metrics.requestheaders(f)
    assert callable(f.request.stream)
    f.request.stream(b"z" * 500)
    f.request.stream(b"")
    f.response = Response.make(201)
    metrics.responseheaders(f)
    metrics.response(f)
    key = labels(upstream="default", direction="request")
    assert scrape(metrics)[("registry_rewrite_bytes_total", key)] == 500


def test_denied_token_and_bounded_labels(metrics, addon):
    f = finish(
        metrics,
        addon,
        flow("/v2/nothing/here/manifests/x"),
        404,
        metadata={"registry_decision": "denied", "registry_error_code": "NAME_UNKNOWN"},
    )
    metrics.response(f)
    f = finish(
        metrics,
        addon,
        flow("/v2/x/manifests/y", method="BREW"),
        418,
        metadata={
            "registry_endpoint": "team/app",
            "registry_decision": "denied",
            "registry_error_code": "repository team/app is secret",
        },
    )
    metrics.response(f)
    t = finish(
        metrics,
        addon,
        flow("/auth?scope=repository:team/app:pull"),
        200,
        metadata={
            "registry_endpoint": "token",
            "registry_upstream_key": "default",
            "registry_decision": "answered",
        },
    )
    metrics.response(t)
    got = scrape(metrics)
    assert got[("registry_rewrite_denied_total", labels(reason="NAME_UNKNOWN"))] == 1
    assert got[("registry_rewrite_denied_total", labels(reason="other"))] == 1
    assert got[("registry_rewrite_token_requests_total", labels(upstream="default", code="200"))]
    # (x maps through the {name} rule: the core sends it upstream, whatever the method.)
    key = labels(upstream="default", endpoint="other", method="other", code="418")
    assert got[("registry_rewrite_requests_total", key)] == 1
    for name, lbls in got:
        for _, value in lbls:
            assert not any(s in value for s in SECRET_NAMES), (name, value)


def test_error_without_response(metrics, addon):
    from mitmproxy.flow import Error

    f = flow("/v2/team/app/manifests/1")
    addon.requestheaders(f)
    f.metadata.update(registry_endpoint="manifests", registry_upstream_key="default")
    f.error = Error("server disconnected")
    metrics.error(f)
    metrics.error(f)  # counted once
    key = labels(upstream="default", endpoint="manifests", method="GET", code="none")
    assert scrape(metrics)[("registry_rewrite_requests_total", key)] == 1


async def test_rules_gauge_and_reloads(metrics, addon, rules_file):
    got = scrape(metrics)
    assert got[("registry_rewrite_rules", frozenset())] == 2
    assert got[("registry_rewrite_rules_reloads_total", labels(result="ok"))] == 0
    rules_file.write_text(RULES + '  - client: "x/{n}"\n    upstream: "y/{n}"\n')
    await addon.reload_rules()
    rules_file.write_text("rules: [")
    await addon.reload_rules()
    got = scrape(metrics)
    assert got[("registry_rewrite_rules", frozenset())] == 3
    assert got[("registry_rewrite_rules_reloads_total", labels(result="ok"))] == 1
    assert got[("registry_rewrite_rules_reloads_total", labels(result="error"))] == 1


def test_off_by_default_costs_nothing(addon, rules_file):
    m = Metrics()
    with taddons.context(m, addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        m.running()
        assert m.server is None
        f = flow("/v2/team/app/blobs/sha256:" + "a" * 64)
        addon.requestheaders(f)
        m.requestheaders(f)
        assert f.request.stream is True  # not wrapped


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("", None),
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        (":9090", ("0.0.0.0", 9090)),
        ("[::1]:9090", ("::1", 9090)),
    ],
)
def test_parse_address(spec, expected):
    assert parse_address(spec) == expected


@pytest.mark.parametrize("spec", ["9090", "host:", "host:http", "::1:9090", "h:70000"])
def test_parse_address_quotes_bad_input(spec):
    with pytest.raises(ValueError, match=repr(spec)):
        parse_address(spec)


def test_bad_address_is_an_options_error(metrics):
    from mitmproxy import ctx

    with pytest.raises(exceptions.OptionsError, match="registry_metrics"):
        ctx.options.update(registry_metrics="nope")
