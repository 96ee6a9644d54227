"""regrewrite.forwarded: trusted ranges and the origin forwarding headers describe."""

import logging

import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.test import taddons

from regrewrite.addons.trusted import TrustedProxies
from regrewrite.api import Origin
from regrewrite.forwarded import describe, forwarded_origin, is_trusted, parse_trusted_proxies
from tests.unit.test_addon import flow, respond

LOCAL = Origin("http", "10.1.2.3", 5000)  # the pod's own address, as the client reached it


def test_parse_trusted_proxies():
    nets = parse_trusted_proxies(" 10.0.0.0/8, 127.0.0.1 ,fd00::/8,")
    assert [str(n) for n in nets] == ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]
    assert parse_trusted_proxies("") == ()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "10.0.0.0/8;rm", "1.2.3"])
def test_parse_trusted_proxies_quotes_bad_entries(bad):
    with pytest.raises(ValueError, match=repr(bad.split(",")[0].strip())):
        parse_trusted_proxies(f"127.0.0.1,{bad}")


def test_is_trusted():
    nets = parse_trusted_proxies("10.0.0.0/8,::1")
    assert is_trusted("10.9.8.7", nets)
    assert is_trusted("::ffff:10.9.8.7", nets)  # IPv4 on a dual-stack socket
    assert is_trusted("::1", nets)
    assert not is_trusted("11.0.0.1", nets)
    assert not is_trusted("not-an-ip", nets)
    assert not is_trusted("10.9.8.7", ())


@pytest.mark.parametrize(
    "headers, expected",
    [
        (
            [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "reg.example.com")],
            Origin("https", "reg.example.com", 443),
        ),
        (
            [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "reg.example.com:8443")],
            Origin("https", "reg.example.com", 8443),
        ),
        (
            [
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "Reg.Example.com"),
                ("x-forwarded-port", "9443"),
            ],
            Origin("https", "reg.example.com", 9443),
        ),
        # Only the scheme: the balancer's default port, the connection's host.
        ([("X-Forwarded-Proto", "https")], Origin("https", "10.1.2.3", 443)),
        ([("X-Forwarded-Port", "8080")], Origin("http", "10.1.2.3", 8080)),
        # The last value is the one the trusted proxy added; earlier ones are the client's.
        (
            [
                ("X-Forwarded-Host", "evil.test, reg.example.com"),
                ("X-Forwarded-Proto", "http,https"),
            ],
            Origin("https", "reg.example.com", 443),
        ),
        (
            [("Forwarded", 'for=1.2.3.4;proto=https;host="reg.example.com:444"')],
            Origin("https", "reg.example.com", 444),
        ),
        (
            [("Forwarded", "host=evil.test, for=1.2.3.4;host=reg.example.com;proto=https")],
            Origin("https", "reg.example.com", 443),
        ),
        # Both families, describing the same origin: believed.
        (
            [
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "reg.example.com"),
                ("Forwarded", "proto=https;host=reg.example.com"),
            ],
            Origin("https", "reg.example.com", 443),
        ),
        (
            [("Forwarded", "proto=https;host=[2001:db8::1]:8443")],
            Origin("https", "2001:db8::1", 8443),
        ),
    ],
)
def test_forwarded_origin(headers, expected):
    assert forwarded_origin(headers, LOCAL) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Host", "reg.example.com")],
        [("X-Forwarded-For", "1.2.3.4")],
        [("X-Forwarded-Proto", "gopher")],
        [("X-Forwarded-Host", "evil.test/path")],
        [("X-Forwarded-Host", "user@evil.test")],
        [("X-Forwarded-Port", "99999")],
        [("Forwarded", "for=1.2.3.4")],
        # str.isdigit() digits that int() refuses (raised ValueError in the hook).
        [("X-Forwarded-Port", "\xb2")],
        [("X-Forwarded-Port", "\u0663")],
    ],
)
def test_forwarded_origin_without_usable_headers(headers):
    assert forwarded_origin(headers, LOCAL) is None


@pytest.mark.parametrize(
    "headers",
    [
        # A balancer that sets X-Forwarded-* passes a client's Forwarded on as it came
        # (nginx, HAProxy's forwardfor): Forwarded winning let the client pick the realm.
        [
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "reg.example.com"),
            ("Forwarded", "proto=https;host=evil.test"),
        ],
        [("X-Forwarded-Host", "other.test"), ("Forwarded", "proto=https;host=reg.example.com")],
        # ... and one that sets Forwarded passes on a client's X-Forwarded-Port, which
        # was applied to Forwarded's host.
        [("Forwarded", "proto=https;host=reg.example.com"), ("X-Forwarded-Port", "1")],
    ],
)
def test_the_two_header_families_disagreeing_are_not_believed(headers):
    assert forwarded_origin(headers, LOCAL) is None
    assert forwarded_origin(list(reversed(headers)), LOCAL) is None


def test_describe():
    assert "registry_public_url" in describe("https://reg.example.com", ())
    assert "10.0.0.0/8" in describe(None, parse_trusted_proxies("10.0.0.0/8"))
    assert "client connection" in describe(None, ())


# --- the TrustedProxies addon with the core ------------------------------------------


RULES = """
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
LB_HEADERS = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "reg.example.com"),
    ("Forwarded", "for=1.2.3.4;proto=https;host=reg.example.com"),
]


@pytest.fixture
def trusted(addon, rules_file):
    t = TrustedProxies()
    with taddons.context(t, addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        tctx.configure(t, registry_trusted_proxies="10.0.0.0/8")
        yield t


def through(trusted, addon, peer):
    f = flow("/v2/team/app/manifests/1", headers=LB_HEADERS)
    f.client_conn.peername = (peer, 40000)
    trusted.requestheaders(f)
    addon.requestheaders(f)
    # Whoever sent them, the upstream never sees forwarding headers.
    assert not [k for k in f.request.headers if "forward" in k.lower()]
    respond(
        f,
        401,
        headers=[
            ("WWW-Authenticate", 'Bearer realm="https://auth.test/t",service="s"'),
            ("Location", "/v2/acme_team/app/blobs/uploads/u1"),
        ],
    )
    f.response.headers["Location"] = "https://upstream.test/v2/acme_team/app/blobs/uploads/u1"
    addon.responseheaders(f)
    return f


def test_realm_and_location_follow_a_trusted_balancer(trusted, addon):
    f = through(trusted, addon, "10.0.0.5")
    assert 'realm="https://reg.example.com/auth"' in f.response.headers["WWW-Authenticate"]
    assert f.response.headers["Location"] == (
        "https://reg.example.com/v2/team/app/blobs/uploads/u1"
    )


def test_forwarding_headers_from_anyone_else_are_ignored(trusted, addon):
    f = through(trusted, addon, "192.0.2.7")
    assert 'realm="http://127.0.0.1:5000/auth"' in f.response.headers["WWW-Authenticate"]
    assert f.response.headers["Location"].startswith("http://127.0.0.1:5000/v2/team/app/")


def test_registry_public_url_wins_over_forwarded(trusted, addon):
    ctx.options.update(registry_public_url="https://fixed.example.com")
    f = through(trusted, addon, "10.0.0.5")
    assert 'realm="https://fixed.example.com/auth"' in f.response.headers["WWW-Authenticate"]


def test_bad_trusted_proxies_is_an_options_error(trusted):
    with pytest.raises(exceptions.OptionsError, match="'10.0.0.0/99'"):
        ctx.options.update(registry_trusted_proxies="127.0.0.1,10.0.0.0/99")


def test_startup_log_says_how_the_public_url_is_derived(trusted, caplog):
    with caplog.at_level(logging.INFO):
        trusted.running()
        trusted.running()
    lines = [r.message for r in caplog.records if "public URL" in r.message]
    assert lines == [
        "registry: public URL from X-Forwarded-Proto/-Host/-Port or Forwarded sent by "
        "10.0.0.0/8 (registry_trusted_proxies), else from the client connection"
    ]


def test_changed_ranges_forget_earlier_verdicts(trusted, addon):
    assert "reg.example.com" in through(trusted, addon, "10.0.0.5").response.headers["Location"]
    ctx.options.update(registry_trusted_proxies="192.168.0.0/16")
    assert "127.0.0.1:5000" in through(trusted, addon, "10.0.0.5").response.headers["Location"]
