"""Addon bugs found by the end-to-end fault, load and no-open-proxy tests, pinned down
on prepared flows (see tests/e2e/test_faults.py, test_load.py, test_no_open_proxy.py)."""

import pytest
from mitmproxy.test import taddons, tflow, tutils

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""


def reverse_flow(path: str, *, authority: str = "", headers=(), http_version="HTTP/1.1"):
    req = tutils.treq(
        method=b"POST",
        scheme=b"https",
        host="upstream.test",
        port=443,
        authority=authority.encode(),
        path=path.encode(),
        http_version=http_version.encode(),
        headers=[(b"host", b"upstream.test")] + [(k.encode(), v.encode()) for k, v in headers],
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.sockname = ("127.0.0.1", 5000)
    return f


FORGED = [
    ("X-Forwarded-Host", "evil.test:1"),
    ("x-forwarded-proto", "http"),
    ("X-Forwarded-Port", "80"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Prefix", "/elsewhere"),
    ("Forwarded", "for=10.0.0.1;host=evil.test;proto=http"),
]


@pytest.mark.parametrize("path", ["/v2/team/app/blobs/uploads/", "/v2/", "/auth?scope=x"])
def test_absolute_form_target_and_forwarding_headers_never_reach_the_upstream(tctx, addon, path):
    # distribution builds upload Location URLs from the request's authority and from
    # these headers: forwarded as sent, they sent the client to a host of its choosing.
    f = reverse_flow(path, authority="evil.test:1", headers=FORGED + [("Accept", "*/*")])
    addon.requestheaders(f)
    assert f.request.authority == ""
    assert f.request.host == "upstream.test" and f.request.port == 443
    sent = {k.lower() for k in f.request.headers.keys()}
    assert not {k for k in sent if k.startswith("x-forwarded-") or k == "forwarded"}, sent
    assert f.request.headers["Accept"] == "*/*"
    assert f.request.headers["Host"] == "upstream.test"


def test_h2_authority_is_left_to_reverse_mode(tctx, addon):
    # For HTTP/2, :authority is the Host header, which reverse mode already points at
    # the upstream; it must stay.
    f = reverse_flow("/v2/team/app/tags/list", authority="upstream.test", http_version="HTTP/2.0")
    addon.requestheaders(f)
    assert f.request.authority == "upstream.test"


def test_token_timeout_can_be_set_like_any_option(addon):
    # As a float option, `--set registry_token_timeout=3` made mitmdump exit at start-up
    # ("unsupported option type"): mitmproxy parses only str, int, bool and sequences.
    with taddons.context(addon) as tctx:
        tctx.options.set("registry_token_timeout=3")
        assert tctx.options.registry_token_timeout == 3


def test_body_caps_hold_from_load_on(addon):
    # mitmdump listens before a script's running() hook: a flow accepted in between was
    # read without any cap (a 256 MiB PUT to a denied name read whole, seen end to end).
    from mitmproxy import addonmanager
    from mitmproxy.proxy.layers import http as layers_http

    from regrewrite.addons import patches

    with taddons.context() as tctx:
        patches.disable()
        original = layers_http.HttpStream.state_consume_request_body
        try:
            addon.load(addonmanager.Loader(tctx.master))
            assert layers_http.HttpStream.state_consume_request_body is not original
        finally:
            patches.disable()


def test_refusal_drops_expect_100_continue(tctx, addon):
    # mitmproxy sends "100 Continue" after requestheaders when the request still asks
    # for it; the client then sends its body and, past the cap, got no error at all
    # (mitmproxy only closes a connection that has had an interim answer).
    f = reverse_flow("/v2/secret/x/manifests/1", headers=[("Expect", "100-continue")])
    addon.requestheaders(f)
    assert f.response.status_code == 404
    assert "Expect" not in f.request.headers


def test_token_form_over_the_cap_is_refused_before_reading(tctx, addon):
    from regrewrite import decide

    size = decide.REQUEST_BODY_CAP + 1
    f = reverse_flow("/auth", headers=[("Content-Length", str(size)), ("Expect", "100-continue")])
    addon.requestheaders(f)
    assert f.response.status_code == 413
    assert b"SIZE_INVALID" in f.response.content
    assert "Expect" not in f.request.headers
    g = reverse_flow("/auth", headers=[("Content-Length", str(size - 1))])
    addon.requestheaders(g)
    assert g.response is None and g.metadata["registry_token"]


def test_token_request_is_never_streamed(tctx, addon):
    # mitmproxy's stream_large_bodies sets request.stream before requestheaders; a token
    # request left streaming went to the upstream's /auth with the client's credentials.
    f = reverse_flow("/auth", headers=[("Content-Length", "20000")])
    f.request.stream = True
    addon.requestheaders(f)
    assert f.response is None and f.metadata["registry_token"]
    assert f.request.stream is False
