"""The registry contentview: JWT claims, manifest summaries, listings, errors; that it
wins mitmproxy's automatic choice for registry messages and never shows a secret; and
the addon's wiring (registration, ``registry.rules``, auth comments and marks)."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews
from mitmproxy.http import Response
from mitmproxy.test import taddons, tflow, tutils

from regrewrite import contentview as cv
from regrewrite import realm
from regrewrite.contentview import Message, RegistryContentview, render
from regrewrite.rules import parse_rules
from tests.unit.test_addon import flow

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
  - client: "{name}"
    upstream: "library/{name}"
"""
NOW = 1_750_000_000.0
SIGNATURE = "c2lnbmF0dXJlLW5ldmVyLXNob3du"  # base64url, never to appear in any rendering


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict, header: dict | None = None, signature: str = SIGNATURE) -> str:
    header = header or {"typ": "JWT", "alg": "RS256", "kid": "ABCD:EFGH"}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{signature}"


def claims(access=None, **extra) -> dict:
    out = {
        "iss": "test-token-issuer",
        "sub": "alice",
        "aud": "test-registry",
        "iat": NOW - 5,
        "nbf": NOW - 15,
        "exp": NOW + 295,
        "jti": "j1",
        "access": access
        if access is not None
        else [{"type": "repository", "name": "acme_team/app", "actions": ["pull", "push"]}],
    }
    out.update(extra)
    return out


@pytest.fixture
def rules():
    return parse_rules(RULES)


def response(**kw) -> Message:
    return Message(is_request=False, **kw)


def request(**kw) -> Message:
    return Message(is_request=True, **kw)


# --- JWT --------------------------------------------------------------------------------


def test_decode_jwt_header_and_claims_not_the_signature():
    jwt = cv.decode_jwt(make_jwt(claims()))
    assert jwt.header["alg"] == "RS256" and jwt.claims["sub"] == "alice"
    assert SIGNATURE not in repr(jwt)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "a.b", "a.b.c", "!!.??.xx", make_jwt(claims()) + ".x", b64(b"[1]") + ".e30.x"],
)
def test_decode_jwt_rejects_non_jwts(text):
    assert cv.decode_jwt(text) is None


@given(st.text(max_size=300))
def test_decode_jwt_never_raises(text):
    cv.decode_jwt(text)


def test_decode_real_rs256_token_from_the_token_server():
    from tests.e2e.upstream import TokenServer

    token, access = TokenServer(None).issue(
        "alice", "test-registry", ["repository:acme_team/app:pull,push"]
    )
    jwt = cv.decode_jwt(token)
    assert jwt.claims["access"] == access
    assert jwt.claims["aud"] == "test-registry" and jwt.header["alg"] == "RS256"


def test_bearer_info_keeps_claims_only():
    token = make_jwt(claims(), {"alg": "RS256", "kid": "K", "x5c": ["big"]})
    info = cv.bearer_info(f"Bearer {token}")
    assert info == {"header": {"alg": "RS256", "kid": "K"}, "claims": claims()}
    assert token not in json.dumps(info) and SIGNATURE not in json.dumps(info)
    for value in (None, "", "Basic YWxpY2U6cHc=", "Bearer <redacted>", "Bearer opaque"):
        assert cv.bearer_info(value) is None


# --- formatting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (NOW + 299, "(in 4m 59s)"),
        (NOW - 3600 * 25 - 1, "(1d 1h 1s ago)"),
        (NOW, "(now)"),
        (0, "1970-01-01 00:00:00 UTC"),
        ("soon", "'soon'"),
        (True, "True"),
        (1e300, "1e+300"),
    ],
)
def test_format_time(value, text):
    assert text in cv.format_time(value, NOW)


@pytest.mark.parametrize(
    "size, text",
    [(0, "0 B"), (1023, "1023 B"), (20480, "20.0 KiB (20480 B)"), (3 << 30, "3.0 GiB")],
)
def test_format_size(size, text):
    assert cv.format_size(size).startswith(text)


# --- token responses ----------------------------------------------------------------------


def test_token_response_shows_claims_and_withholds_secrets(rules):
    token = make_jwt(claims())
    body = json.dumps(
        {
            "token": token,
            "access_token": token,
            "refresh_token": "refresh-SECRET-1",
            "expires_in": 300,
            "issued_at": "2025-06-15T15:06:35Z",
        }
    ).encode()
    text = render(body, response(path="/auth", status=200, token_flow=True), rules, NOW)
    assert "issuer: test-token-issuer" in text
    assert "subject: alice" in text
    assert "audience: test-registry" in text
    assert "expires: 2025-06-15 15:11:35 UTC (in 4m 55s)" in text
    assert "- repository acme_team/app: pull, push  # client name team/app" in text
    assert "access_token: (same as token)" in text
    assert "refresh_token: <withheld> (16 characters)" in text
    assert "expires_in: 300 (5m)" in text
    assert token not in text and SIGNATURE not in text and "refresh-SECRET-1" not in text
    assert "eyJ" not in text


def test_token_response_details(rules):
    expired = make_jwt(claims(exp=NOW - 1, aud=["a", "b"], custom={"x": 1}, access=[]))
    opaque = "opaque-SECRET-token-value"
    body = json.dumps({"token": expired, "access_token": opaque}).encode()
    text = render(body, response(status=200), rules, NOW)
    assert "EXPIRED" in text and "audience: a, b" in text and 'custom: {"x": 1}' in text
    assert "access: [] (nothing granted)" in text
    assert f"access_token: opaque, {len(opaque)} characters <withheld>" in text
    assert opaque not in text


def test_access_names_without_client_name(rules):
    access = [
        {"type": "repository", "name": "elsewhere/x", "actions": ["pull"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
        {"type": "repository", "class": "plugin", "name": "library/tool", "actions": ["pull"]},
    ]
    text = "\n".join(cv.describe_access(access, rules.client_name))
    assert "- repository elsewhere/x: pull  # no client name maps here" in text
    assert "- registry catalog: *\n" in text + "\n"
    assert "- repository(plugin) library/tool: pull  # client name tool" in text


def test_token_service_error_is_an_error_not_a_token(rules):
    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
    msg = response(status=401, token_flow=True, authorization="Basic <redacted>")
    text = render(body, msg, rules, NOW)
    assert "# registry error (401)" in text and "UNAUTHORIZED: authentication required" in text
    assert "# Authorization: Basic credentials presented <withheld>" in text


def test_token_request_form_withholds_secrets(rules):
    form = b"grant_type=password&username=alice&password=pw-SECRET&refresh_token=r-SECRET"
    text = render(form, request(path="/auth", method="POST"), rules, NOW)
    assert "grant_type: password" in text and "username: alice" in text
    assert "pw-SECRET" not in text and "r-SECRET" not in text


_secret = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=12).map(
    lambda s: "SECRET" + s
)
_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="abcxyz :/,{}[]\"'\\\n\t\x00"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@settings(max_examples=200)
@given(
    extra_claims=st.dictionaries(st.text(max_size=8), _value, max_size=5),
    secrets=st.dictionaries(st.sampled_from(sorted(cv.SECRET_KEYS)), _secret, min_size=1),
    other=st.dictionaries(st.text(max_size=8), _value, max_size=4),
    signature=_secret,
)
def test_no_secret_ever_rendered(extra_claims, secrets, other, signature):
    token = make_jwt({**claims(), **extra_claims}, signature=signature)
    doc = {**other, **secrets}
    doc["token"] = token
    msg = response(status=200, token_flow=True)
    text = render(json.dumps(doc).encode(), msg, parse_rules(RULES), NOW)
    assert text is not None
    for secret in [token, signature, *secrets.values()]:
        assert secret not in text
    # Bearer requests and error responses with the same token presented.
    header = f"Bearer {token}"
    for data, msg in [
        (b"", request(authorization=header)),
        (b"", request(bearer=cv.bearer_info(header), authorization="Bearer <redacted>")),
        (b'{"errors":[]}', response(status=401, authorization=header)),
    ]:
        text = render(data, msg, None, NOW)
        assert token not in text and signature not in text


@given(st.text())
def test_scrub_removes_anything_jwt_shaped(prefix):
    token = make_jwt(claims())
    assert token not in cv.scrub(prefix + token + prefix)


# --- bearer requests and auth failures ------------------------------------------------------


def test_bearer_request_shows_claims_kept_by_the_addon(rules):
    info = cv.bearer_info("Bearer " + make_jwt(claims()))
    msg = request(
        path="/v2/acme_team/app/manifests/1", authorization="Bearer <redacted>", bearer=info
    )
    text = render(b"", msg, rules, NOW)
    assert text.startswith("# Authorization: Bearer token presented")
    assert "- repository acme_team/app: pull, push  # client name team/app" in text


def test_request_without_credentials_is_not_ours(rules):
    assert render(b"", request(path="/v2/acme_team/app/manifests/1"), rules) is None
    assert render(b"", request(authorization="Basic YWxpY2U6cHc="), rules) is None


def test_insufficient_scope_shows_errors_challenge_and_the_token(rules):
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "UNAUTHORIZED",
                    "message": "authentication required",
                    "detail": [{"Type": "repository", "Name": "team/app", "Action": "push"}],
                }
            ]
        }
    ).encode()
    challenge = (
        'Bearer realm="http://127.0.0.1:1/auth",service="test-registry",'
        'scope="repository:team/app:pull,push",error="insufficient_scope"'
    )
    token = make_jwt(claims([{"type": "repository", "name": "acme_team/app", "actions": ["pull"]}]))
    msg = response(
        path="/v2/acme_team/app/blobs/uploads/",
        status=401,
        authorization="Bearer <redacted>",
        bearer=cv.bearer_info("Bearer " + token),
        challenges=(challenge,),
    )
    text = render(body, msg, rules, NOW)
    assert "- UNAUTHORIZED: authentication required" in text
    assert "    detail: repository team/app: push\n" in text
    assert "  scope: repository:team/app:pull,push\n  error: insufficient_scope\n" in text
    assert "- repository acme_team/app: pull  # client name team/app" in text


def test_access_denied_detail_grouped():
    detail = [
        {"Type": "repository", "Class": "", "Name": "team/a", "Action": "pull"},
        {"Type": "repository", "Class": "", "Name": "team/a", "Action": "push"},
        {"Type": "repository", "Class": "plugin", "Name": "team/b", "Action": "pull"},
    ]
    assert cv._describe_detail(detail) == (
        "repository team/a: pull, push; repository(plugin) team/b: pull"
    )
    assert cv._describe_detail([{"x": 1}]) == '[{"x": 1}]'
    assert cv._describe_detail({"name": "n"}) == '{"name": "n"}'


def test_empty_401_still_described(rules):
    text = render(b"", response(status=401, challenges=('Bearer realm="r"',)), rules, NOW)
    assert "# registry error (401)" in text and "challenge: Bearer\n  realm: r\n" in text


@pytest.mark.parametrize(
    "status, challenge, authorization, comment, failed",
    [
        (
            401,
            'Bearer realm="r",scope="repository:team/app:pull"',
            None,
            "auth: 401 challenge for repository:team/app:pull",
            False,
        ),
        (
            401,
            'Bearer realm="r",scope="repository:team/app:pull,push",error="insufficient_scope"',
            "Bearer <redacted>",
            "auth: 401 insufficient_scope for repository:team/app:pull,push",
            True,
        ),
        (
            401,
            'Bearer realm="r",error="invalid_token"',
            "Bearer x",
            "auth: 401 invalid_token",
            True,
        ),
        (401, "Basic realm=x", "Basic <redacted>", "auth: 401 Basic credentials refused", True),
        (403, None, "Bearer x", "auth: 403 Bearer credentials refused", True),
        (403, None, None, "auth: 403", True),
        (401, "Bearer ,,,=", None, "auth: 401 challenge", False),
        (
            401,
            'Bearer scope="repository:team/a:push,pull repository:team/b:pull",error="x"',
            "Bearer y",
            "auth: 401 x for repository:team/a:pull,push repository:team/b:pull",
            True,
        ),
    ],
)
def test_auth_note(status, challenge, authorization, comment, failed):
    note = cv.auth_note(status, [challenge] if challenge else [], authorization)
    assert (note.comment, note.failed) == (comment, failed)


def test_token_shortfall():
    requested = [
        ("repository:team/app:pull,push", "repository:acme_team/app:pull,push"),
        ("repository:team/base:pull", "repository:acme_team/base:pull"),
        ("registry:catalog:*", "registry:catalog:*"),
    ]
    access = [
        {"type": "repository", "name": "acme_team/app", "actions": ["pull"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]
    body = json.dumps({"token": make_jwt(claims(access))}).encode()
    assert cv.token_shortfall(body, requested) == [
        "repository:team/app:push",
        "repository:team/base:pull",
    ]
    assert cv.token_shortfall(b'{"token":"opaque"}', requested) == []
    assert cv.token_shortfall(b"not json", requested) == []


# --- manifests --------------------------------------------------------------------------

CONFIG = {
    "mediaType": "application/vnd.oci.image.config.v1+json",
    "digest": "sha256:c0",
    "size": 512,
}
LAYERS = [
    {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": "sha256:l1",
        "size": 20480,
    },
    {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": "sha256:l2",
        "size": 1000,
    },
]


def test_oci_manifest_summary(rules):
    doc = {"schemaVersion": 2, "mediaType": cv.OCI_MANIFEST, "config": CONFIG, "layers": LAYERS}
    data = json.dumps(doc).encode()
    msg = response(path="/v2/acme_team/app/manifests/1", status=200, content_type=cv.OCI_MANIFEST)
    text = render(data, msg, rules, NOW)
    assert text.startswith("# OCI image manifest\nmedia type: " + cv.OCI_MANIFEST)
    assert "config: sha256:c0  512 B  application/vnd.oci.image.config.v1+json" in text
    assert "layers: 2, 21.0 KiB (21480 B) in all" in text
    assert "  - sha256:l1  20.0 KiB (20480 B)  application/vnd.oci.image.layer.v1.tar+gzip" in text
    import hashlib

    assert f"digest: sha256:{hashlib.sha256(data).hexdigest()} (of this body)" in text


def test_docker_manifest_by_content_type_and_pushed_manifest_with_bearer(rules):
    doc = {"schemaVersion": 2, "config": CONFIG, "layers": LAYERS[:1]}
    data = json.dumps(doc).encode()
    info = cv.bearer_info("Bearer " + make_jwt(claims()))
    msg = request(
        path="/v2/acme_team/app/manifests/1",
        method="PUT",
        content_type=cv.DOCKER_MANIFEST,
        authorization="Bearer <redacted>",
        bearer=info,
    )
    text = render(data, msg, rules, NOW)
    assert text.startswith("# Docker image manifest (schema 2)")
    assert "layers: 1, 20.0 KiB (20480 B) in all" in text
    assert "bearer token:" in text and "subject: alice" in text


def test_index_summary_lists_platforms(rules):
    manifests = [
        {"mediaType": cv.OCI_MANIFEST, "digest": "sha256:a", "size": 400,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": cv.OCI_MANIFEST, "digest": "sha256:b", "size": 401,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": cv.OCI_MANIFEST, "digest": "sha256:c", "size": 402,
         "artifactType": "application/vnd.example+json"},
    ]  # fmt: skip
    doc = {"schemaVersion": 2, "manifests": manifests, "annotations": {"k": "v"}}
    text = render(json.dumps(doc).encode(), response(status=200, content_type=cv.DOCKER_LIST))
    assert text.startswith("# Docker manifest list")
    assert "manifests: 3" in text
    assert f"  - linux/amd64: sha256:a  400 B  {cv.OCI_MANIFEST}" in text
    assert "  - linux/arm64/v8: sha256:b" in text
    assert "  - (no platform): sha256:c  402 B" in text and "artifact application/vnd" in text
    assert "annotations:\n  k: v" in text


def test_oci_index_by_shape_and_subject():
    doc = {"schemaVersion": 2, "manifests": [], "subject": {"digest": "sha256:s", "size": 9}}
    text = render(json.dumps(doc).encode(), response(status=200, content_type="application/json"))
    assert text.startswith("# OCI image index") and "subject: sha256:s  9 B" in text


def test_schema1_manifest():
    doc = {
        "schemaVersion": 1,
        "name": "acme_team/app",
        "tag": "1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": "sha256:x"}, {"blobSum": "sha256:y"}],
        "signatures": [],
    }
    text = render(json.dumps(doc).encode(), response(status=200))
    assert text.startswith("# Docker image manifest (schema 1, signed)")
    assert "layers: 2" in text and "  - sha256:y" in text and "tag: 1" in text


# --- listings ---------------------------------------------------------------------------


def test_tags_list_shows_both_names(rules):
    body = b'{"name":"team/app","tags":["1.0","1.1"]}'
    text = render(body, response(path="/v2/acme_team/app/tags/list?n=10", status=200), rules)
    assert "repository: team/app → acme_team/app (client → upstream)" in text
    assert "tags: 2\n  - 1.0\n  - 1.1" in text
    # Without the path (another tool's flow), the rules still know the upstream name.
    text = render(body, response(status=200), rules)
    assert "repository: team/app → acme_team/app" in text


def test_catalog_shows_both_names(rules):
    body = b'{"repositories":["team/a","tool","x/unmapped"]}'
    text = render(body, response(path="/v2/_catalog?n=3", status=200), rules)
    assert "_catalog: 3 repositories" in text
    assert "  - team/a → acme_team/a\n  - tool → library/tool\n  - x/unmapped → ?" in text
    assert "  - team/a → ?" in render(body, response(path="/v2/_catalog", status=200))


def test_other_messages_are_not_ours(rules):
    for data, msg in [
        (b"\x1f\x8b\x08binary-layer", response(path="/v2/acme_team/a/blobs/sha256:x", status=200)),
        (b'{"architecture":"amd64","os":"linux"}', response(status=200)),
        (b'{"a":1}', response(path="/v2/", status=200)),
        (b"[1,2]", response(status=200)),
        (b"{not json", response(status=200)),
        (b"x" * (cv.MAX_JSON + 1), response(status=200)),
    ]:
        assert render(data, msg, rules) is None
        assert cv.classify(data, msg) is None


# --- mitmproxy integration ----------------------------------------------------------------


@pytest.fixture
def view():
    v = RegistryContentview(lambda: parse_rules(RULES), clock=lambda: NOW)
    with taddons.context():  # prettify_message reads ctx.options
        contentviews.add(v)
        yield v
    contentviews.registry._by_name.pop("registry", None)


def tflow_with(
    path="/v2/acme_team/app/manifests/1", status=200, body=b"", ctype=None, req_headers=()
):
    req = tutils.treq(
        path=path.encode(), headers=[(k.encode(), v.encode()) for k, v in req_headers], content=b""
    )
    f = tflow.tflow(req=req)
    headers = {"Content-Type": ctype} if ctype else {}
    f.response = Response.make(status, body, headers)
    return f


def test_is_a_mitmproxy_contentview(view):
    assert isinstance(view, contentviews.Contentview)
    assert contentviews.registry["registry"] is view


@pytest.mark.parametrize(
    "body, ctype",
    [
        (json.dumps({"token": make_jwt(claims()), "expires_in": 60}).encode(), "application/json"),
        (json.dumps({"token": make_jwt(claims())}).encode(), "text/plain"),
        (json.dumps({"config": CONFIG, "layers": LAYERS}).encode(), cv.OCI_MANIFEST),
        (b'{"errors":[{"code":"DENIED","message":"no"}]}', "application/json; charset=utf-8"),
        (b'{"name":"team/app","tags":["1"]}', "application/json"),
    ],
)  # fmt: skip
def test_automatic_choice_beats_json(view, body, ctype):
    f = tflow_with(body=body, ctype=ctype)
    pretty = contentviews.prettify_message(f.response, f)
    assert pretty.view_name == "Registry", pretty.text
    assert "eyJ" not in pretty.text


def test_unrelated_json_stays_json(view):
    f = tflow_with(path="/other", body=b'{"a": 1}', ctype="application/json")
    assert contentviews.prettify_message(f.response, f).view_name == "JSON"
    # Chosen explicitly, the view says why it cannot show this.
    pretty = contentviews.prettify_message(f.response, f, "registry")
    assert pretty.syntax_highlight == "error" and "not a registry" in pretty.text


def test_request_with_bearer_claims_from_metadata(view):
    f = tflow_with(req_headers=[("Authorization", "Bearer <redacted>")])
    f.metadata["registry_bearer"] = cv.bearer_info("Bearer " + make_jwt(claims()))
    pretty = contentviews.prettify_message(f.request, f)
    assert pretty.view_name == "Registry"
    assert "subject: alice" in pretty.text


def test_live_request_with_raw_bearer_header(view):
    token = make_jwt(claims())
    f = tflow_with(req_headers=[("Authorization", f"Bearer {token}")])
    pretty = contentviews.prettify_message(f.request, f)
    assert pretty.view_name == "Registry" and token not in pretty.text


# --- the addon's wiring -----------------------------------------------------------------


def addon_flow(path, method="GET", headers=()):
    return flow(path, method, headers=headers)


def test_load_registers_the_view_and_done_removes_it(tctx, addon):
    assert contentviews.registry["registry"] is addon.contentview
    addon.done()
    assert "registry" not in contentviews.registry
    addon.done()  # twice is harmless


def test_registry_rules_command(tctx, addon, rules_file):
    text = tctx.master.commands.call("registry.rules")
    assert f"rules file: {rules_file} (2 rules)" in text
    assert "unmatched: deny" in text and "token_path: /auth" in text
    assert "upstream realm: not known yet" in text
    assert "  1. team/{r:path} → acme_team/{r:path}\n  2. {name} → library/{name}" in text
    addon._learn_realm("default", "https://auth.upstream.test/token", "svc")
    text = tctx.master.commands.execute("registry.rules")
    assert "upstream realm: https://auth.upstream.test/token (learned" in text
    assert "upstream service: svc (learned" in text


MULTI = (
    RULES
    + """
upstreams:
  hub:
    url: https://hub.test
    mirror_of: docker.io
    rules:
      - client: "hub/{name}"
        upstream: "library/{name}"
  ghcr:
    url: https://ghcr.test:8443
    realm: https://ghcr.test:8443/token
    credentials:
      username: robot
      password_env: CONTENTVIEW_TEST_TOKEN
    rules:
      - client: "ghcr/{r:path}"
        upstream: "{r:path}"
"""
)


def test_registry_rules_with_several_upstreams(monkeypatch):
    monkeypatch.setenv("CONTENTVIEW_TEST_TOKEN", "pw-SECRET")
    rules = parse_rules(MULTI)
    learned = {"hub": ("https://auth.hub.test/token", "hub-service")}
    text = cv.describe_rules(rules, "r.yaml", None, None, None, learned)
    assert "upstream default: the reverse-mode target" in text
    assert "upstream default realm: not known yet" in text
    assert "upstream hub: https://hub.test\nupstream hub mirror of: docker.io" in text
    assert "upstream hub realm: https://auth.hub.test/token (learned" in text
    assert "upstream ghcr realm: https://ghcr.test:8443/token (from the rules file)" in text
    assert "upstream ghcr credentials: the proxy's account robot (password hidden)" in text
    assert "pw-SECRET" not in text
    assert "upstream hub credentials: none (anonymous)" in text
    # The robot account's rules are read-only unless they say otherwise: shown as such.
    assert (
        "  3. hub/{name} → library/{name} @hub\n  4. ghcr/{r:path} → {r:path} @ghcr (only pull)"
        in text
    )
    # Views name the right repository on either side, whichever upstream holds it.
    assert cv.client_namer(rules)("library/x") == "x"
    assert cv.upstream_namer(rules)("hub/nginx") == "library/nginx @hub"
    assert cv.upstream_namer(rules)("team/a") == "acme_team/a"


def test_registry_rules_command_configured_realm(tmp_path):
    rules = parse_rules("upstream:\n  realm: https://a.test/auth\n  service: s\n" + RULES)
    text = cv.describe_rules(rules, "r.yaml", "https://b.test/auth", "t", "https://proxy.test")
    assert "upstream realm: https://a.test/auth (from the rules file)" in text
    assert "the upstream advertises https://b.test/auth, which is ignored" in text
    assert "upstream service: s (from the rules file)" in text
    assert "public url: https://proxy.test" in text
    assert "(none)" in cv.describe_rules(parse_rules("rules: []"), None, None, None)


def challenge_response(f, status, challenge=None):
    headers = [(b"WWW-Authenticate", challenge.encode())] if challenge else []
    f.response = Response.make(
        status, b'{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}',
        headers + [(b"Content-Type", b"application/json")],
    )  # fmt: skip


def test_insufficient_scope_is_commented_and_marked(tctx, addon):
    token = make_jwt(claims([{"type": "repository", "name": "acme_team/app", "actions": ["pull"]}]))
    f = addon_flow("/v2/team/app/blobs/uploads/", "POST", [("Authorization", f"Bearer {token}")])
    addon.requestheaders(f)
    challenge_response(
        f,
        401,
        'Bearer realm="https://auth.upstream.test/token",service="svc",'
        'scope="repository:acme_team/app:pull,push",error="insufficient_scope"',
    )
    addon.responseheaders(f)
    assert f.comment == (
        "team/app → acme_team/app · blobs/uploads POST · "
        "auth: 401 insufficient_scope for repository:team/app:pull,push"
    )
    assert f.marked == ":lock:"
    assert f.request.headers["Authorization"] == "Bearer <redacted>"
    assert f.metadata["registry_bearer"]["claims"]["access"][0]["actions"] == ["pull"]
    assert token not in json.dumps(f.metadata["registry_bearer"])


def test_first_challenge_is_commented_not_marked(tctx, addon):
    f = addon_flow("/v2/")
    addon.requestheaders(f)
    challenge_response(f, 401, 'Bearer realm="https://auth.upstream.test/token",service="svc"')
    addon.responseheaders(f)
    assert f.comment == "auth: 401 challenge"
    assert not f.marked


def test_403_is_marked(tctx, addon):
    f = addon_flow("/v2/team/app/manifests/1", headers=[("Authorization", "Bearer x.y.z")])
    addon.requestheaders(f)
    challenge_response(f, 403)
    addon.responseheaders(f)
    assert f.marked == ":lock:" and "auth: 403" in f.comment


def test_refused_flow_keeps_client_path_and_is_marked(tctx, addon):
    f = addon_flow("/v2/other/x/manifests/1")
    addon.requestheaders(f)
    assert f.request.path == "/v2/other/x/manifests/1"
    assert f.marked == ":no_entry:" and f.comment == "denied: no rule for other/x"


async def test_token_comment_names_what_was_not_granted(tctx, addon, monkeypatch):
    access = [{"type": "repository", "name": "acme_team/app", "actions": ["pull"]}]
    body = json.dumps({"token": make_jwt(claims(access))}).encode()

    def fetch(method, url, headers, data, tls, timeout):
        return realm.Reply(200, (("Content-Type", "application/json"),), body)

    monkeypatch.setattr(realm, "fetch", fetch)
    addon.learned["default"] = ("https://auth.upstream.test/token", None)
    f = addon_flow("/auth?scope=repository:team/app:pull,push")
    addon.requestheaders(f)
    await addon.request(f)
    assert f.comment.endswith("· not granted: repository:team/app:push"), f.comment
    assert not f.marked
    text = contentviews.prettify_message(f.response, f).text
    assert "- repository acme_team/app: pull  # client name team/app" in text


def test_metadata_is_json_serialisable_for_flow_files():
    info = cv.bearer_info("Bearer " + make_jwt(claims()))
    assert json.loads(json.dumps(info)) == info


def test_parse_json_tells_documents_apart():
    a = b'{"name":"a","tags":[]}'
    b = b'{"name":"b","tags":[]}'
    assert cv.parse_json(a)["name"] == "a" and cv.parse_json(b)["name"] == "b"
    assert cv.parse_json(os.urandom(16).replace(b"{", b"x")) is None


def test_manifests_stream_when_nobody_looks(tctx, addon):
    # plain mitmdump (flow_detail < 3): a manifest costs no buffering
    assert not addon.show_manifests
    f = addon_flow("/v2/team/app/manifests/1", "PUT", [("Content-Length", "100")])
    addon.requestheaders(f)
    assert f.request.stream is True


async def test_manifests_are_kept_whole_for_the_view_and_passed_unchanged(tctx, addon):
    addon.show_manifests = True  # as under mitmweb, the console or flow_detail >= 3
    body = b'{ "schemaVersion":2,  "layers":[] ,"config":{}}'  # not canonical: must survive
    f = addon_flow("/v2/team/app/manifests/1", "PUT", [("Content-Length", str(len(body)))])
    addon.requestheaders(f)
    assert f.request.stream is False
    f = addon_flow("/v2/team/app/manifests/1")
    addon.requestheaders(f)
    f.response = Response.make(200, body, {"Content-Type": cv.OCI_MANIFEST})
    addon.responseheaders(f)
    assert not f.response.stream
    await addon.response(f)
    assert f.response.content == body
    pretty = contentviews.prettify_message(f.response, f)
    assert pretty.view_name == "Registry" and "layers: 0" in pretty.text


@pytest.mark.parametrize(
    "path, length",
    [
        ("/v2/team/app/manifests/1", str((4 << 20) + 1)),  # beyond the spec's limit
        ("/v2/team/app/manifests/1", None),  # chunked: size unknown
        ("/v2/team/app/blobs/sha256:" + "a" * 64, "10"),
    ],
)
def test_other_bodies_still_stream(tctx, addon, path, length):
    f = addon_flow(path)
    addon.requestheaders(f)
    assert f.request.stream is True
    f.response = Response.make(200, b"")
    if length is None:
        del f.response.headers["Content-Length"]
    else:
        f.response.headers["Content-Length"] = length
    addon.responseheaders(f)
    assert f.response.stream is True


async def test_flows_can_be_saved_and_loaded_ones_are_left_alone(tctx, addon):
    """mitmweb's Save and mitmdump -w write flows whole (metadata included); loaded back,
    mitmproxy replays the hooks on them, which must change nothing."""
    import io

    from mitmproxy import io as flowio

    token = make_jwt(claims())
    f = addon_flow("/v2/team/app/manifests/1", headers=[("Authorization", f"Bearer {token}")])
    addon.requestheaders(f)
    challenge_response(
        f, 401, 'Bearer realm="https://auth.upstream.test/token",error="invalid_token"'
    )
    addon.responseheaders(f)
    await addon.response(f)
    assert addon.realm == "https://auth.upstream.test/token"
    buf = io.BytesIO()
    flowio.FlowWriter(buf).add(f)
    (loaded,) = flowio.FlowReader(io.BytesIO(buf.getvalue())).stream()
    assert not loaded.live and token not in buf.getvalue().decode("latin-1")
    assert (loaded.comment, loaded.marked) == (f.comment, ":lock:")

    addon.learned["default"] = ("https://learned.test/token", None)
    before = (loaded.comment, loaded.response.get_state(), loaded.request.get_state())
    addon.requestheaders(loaded)
    addon.responseheaders(loaded)
    await addon.response(loaded)
    assert (loaded.comment, loaded.response.get_state(), loaded.request.get_state()) == before
    assert addon.realm == "https://learned.test/token"  # not re-learned from a rewritten one
    text = contentviews.prettify_message(loaded.response, loaded).text
    assert "error: invalid_token" in text and "subject: alice" in text


@pytest.mark.parametrize(
    "state, text",
    [("hit", "blob cache: hit"), ("miss", "blob cache: miss"), ("wait", "single-flight wait")],
)
def test_cache_line_for_blobs_the_cache_served(state, text):
    msg = Message(is_request=False, path="/v2/team/app/blobs/sha256:ab", status=200, cache=state)
    assert text in render(b"\x1f\x8b binary layer", msg)
    # A manifest by digest keeps its own view, with the cache line first.
    manifest = json.dumps({"schemaVersion": 2, "mediaType": cv.OCI_MANIFEST, "layers": []})
    out = render(manifest.encode(), Message(is_request=False, status=200, cache=state))
    assert out.startswith("blob cache: ") and "layers: 0" in out
    assert render(b"\x1f\x8b", Message(is_request=False, status=200)) is None


def test_cache_line_for_a_remembered_answer_to_a_request_without_credentials():
    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
    msg = Message(is_request=False, path="/v2/", status=401, cache="challenge")
    out = render(body, msg)
    assert out.startswith("blob cache: answered as the upstream answered") and "UNAUTHORIZED" in out
