"""Hostile input through the rewrite functions and the addon hooks (issue 6, item 1).

Whatever reaches the upstream must name only repositories the rules allow; everything
else gets a registry-style JSON error; no exception escapes.
"""

import asyncio
import json
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import taddons

import registry_rewrite
from regrewrite import api, realm
from regrewrite.auth import form_values, parse_challenges, parse_scope, rewrite_challenge
from tests.unit.test_addon import RULES, flow, respond

ALLOWED_UPSTREAM = ("acme_team/", "library/")


def allowed(name: str) -> bool:
    # library/{name} is one component; acme_team/{r:path} one or more.
    if name.startswith("library/"):
        return "/" not in name[len("library/") :]
    return name.startswith("acme_team/")


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(RULES)
    addon = registry_rewrite.RegistryRewrite()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(path))
        yield addon


@pytest.mark.parametrize(
    "path, status, code",
    [
        ("/v2/team/../secret/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/./app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team%2Fapp/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team//app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/Team/App/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/" + "a" * 260 + "/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/app%0d%0aX-Evil:1/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/app%00/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/..", 400, "TAG_INVALID"),
        ("/v2/team/app/manifests/%2e%2e", 400, "TAG_INVALID"),
        ("/v2/team/app/blobs/..%2fsecret", 400, "DIGEST_INVALID"),
        ("/v2/team/app/blobs/uploads/..", 400, "BLOB_UPLOAD_INVALID"),
        ("/v2/acme_team/app/manifests/latest", 404, "NAME_UNKNOWN"),  # an upstream name
        ("/v2/other/x/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/team/app/secret-endpoint/x", 404, "UNSUPPORTED"),
        ("/debug/vars", 404, "UNSUPPORTED"),
        ("/v2/_catalog?last=secret%0aname", 400, "NAME_INVALID"),
    ],
)
def test_hostile_paths_get_registry_errors(hooks, path, status, code):
    f = flow(path, "POST" if "uploads" in path else "GET")
    hooks.requestheaders(f)
    assert f.response is not None, f.request.path
    assert f.response.status_code == status
    doc = json.loads(f.response.content)
    assert doc["errors"][0]["code"] == code
    assert f.response.headers["Content-Type"] == "application/json"


def test_upstream_name_that_a_rule_would_produce_is_still_a_client_name(hooks):
    # `library/x` is not a client name (library/{name} is the upstream side), so refused.
    f = flow("/v2/library/x/manifests/1")
    hooks.requestheaders(f)
    assert f.response.status_code == 404


segment = st.one_of(
    st.sampled_from(
        [
            "team",
            "app",
            "tools",
            "..",
            ".",
            "",
            "%2F",
            "%2e%2e",
            "A",
            "library",
            "acme_team",
            "manifests",
            "blobs",
            "uploads",
            "tags",
            "list",
            "_catalog",
            "referrers",
            "sha256:ab",
            "x%00",
            "a\r\nb",
            "-x",
            "a__b",
            "a___b",
        ]
    ),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="?#/"), max_size=8
    ),
)
endpoints = st.sampled_from(
    [
        "/manifests/latest",
        "/manifests/sha256:ab",
        "/blobs/sha256:ab",
        "/blobs/uploads/",
        "/blobs/uploads/u1",
        "/tags/list",
        "/referrers/sha256:ab",
        "",
        "/x",
        "/manifests/..",
    ]
)
paths = st.one_of(
    # name + a real endpoint: the shape that gets forwarded when the name is right
    st.builds(
        lambda n, e: "/v2/" + "/".join(n) + e, st.lists(segment, min_size=1, max_size=4), endpoints
    ),
    st.lists(segment, min_size=1, max_size=7).map(lambda s: "/v2/" + "/".join(s)),
)
queries = st.lists(
    st.tuples(
        st.sampled_from(["from", "mount", "last", "n", "digest", "scope"]),
        st.one_of(
            st.sampled_from(["team/app", "secret/x", "acme_team/app", "..", "%2F"]),
            st.text(max_size=10),
        ),
    ),
    max_size=3,
).map(lambda kv: "&".join(f"{k}={v}" for k, v in kv))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(paths, queries, st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]))
def test_fuzz_requests_only_reach_allowed_repositories(hooks, path, query, method):
    target = path + ("?" + query if query else "")
    if any(c in target for c in " \r\n\x00#"):
        return  # not a request target mitmproxy's parser hands on
    f = flow(target, method)
    hooks.requestheaders(f)
    if f.response is not None:
        assert f.response.status_code in (400, 404, 405)
        json.loads(f.response.content or b"{}")
        return
    sent_path, sent_query = api.split_target(f.request.path)
    repo = api.parse_repository_path(sent_path)
    if repo is not None:
        assert allowed(repo.name), f.request.path
    else:
        assert sent_path in ("/v2/", "/v2", "/v2/_catalog"), f.request.path
    source = api.query_value(sent_query, "from")
    if repo is not None and repo.kind == "blobs/uploads" and source is not None:
        assert allowed(source), f.request.path


scope_texts = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "repository:team/app:pull",
                "repository:secret/x:pull,push",
                "repository:acme_team/app:push",
                "registry:catalog:*",
                "repository:team/app:pull repository:secret/x:push",
                "repository(plugin):team/p:pull",
                "repository:nginx:pull",
                "repository:localhost:5000/team/app:pull",
                ":::",
                "repository::pull",
            ]
        ),
        st.text(max_size=30),
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scope_texts, st.booleans())
def test_fuzz_token_requests_only_ask_for_allowed_repositories(hooks, scopes, post):
    sent = []

    def fake_fetch(method, url, headers, body, tls, timeout):
        sent.append((url, body))
        return realm.Reply(200, (("Content-Type", "application/json"),), b"{}")

    original = realm.fetch
    realm.fetch = fake_fetch
    try:
        hooks.learned["default"] = ("https://auth.upstream.test/token", None)
        from urllib.parse import quote

        form = "&".join(f"scope={quote(s, safe='')}" for s in scopes)
        f = flow("/auth", "POST", form.encode()) if post else flow("/auth?" + form)
        hooks.requestheaders(f)
        asyncio.run(hooks.request(f))
    finally:
        realm.fetch = original
    assert f.response is not None
    if not sent:
        return
    url, body = sent[0]
    raw = body.decode() if body else url.split("?", 1)[1] if "?" in url else ""
    for value in form_values(raw, "scope"):
        for text in value.split(" "):
            scope = parse_scope(text)
            if scope.type.startswith("repository"):
                assert allowed(scope.name), raw
            else:
                assert text == "registry:catalog:*", raw


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_fuzz_challenges_never_raise_unexpectedly(header):
    try:
        parse_challenges(header)
    except ValueError:
        return
    out = rewrite_challenge(header, "http://127.0.0.1:5000/auth", lambda n: None)
    parse_challenges(out.header)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=150), st.sampled_from([401, 403, 200, 307]))
def test_fuzz_response_headers_through_hooks(hooks, header, status):
    f = flow("/v2/team/app/manifests/1")
    hooks.requestheaders(f)
    try:
        header.encode("latin-1")
    except UnicodeEncodeError:
        return
    respond(
        f,
        status,
        b"{}",
        [
            ("WWW-Authenticate", header),
            ("Location", header),
            ("Link", header),
            ("Content-Type", "application/json"),
        ],
    )
    hooks.responseheaders(f)
    hooks.response(f)
    location = f.response.headers["Location"]
    assert "acme_team" not in unquote(location) or "acme_team" in unquote(header)


def test_encoded_bodies_are_decoded_within_the_cap():
    import gzip
    import zlib

    from regrewrite import decide

    doc = b'{"name":"acme_team/app","tags":["1"]}'
    assert decide.decode_body(gzip.compress(doc), "gzip") == doc
    assert decide.decode_body(zlib.compress(doc), "deflate") == doc
    assert decide.decode_body(doc, "identity") == doc
    bomb = gzip.compress(b"\0" * (decide.RESPONSE_BODY_CAP + 1))  # ~4 KiB on the wire
    assert len(bomb) < 64 << 10
    for body, encoding in ((bomb, "gzip"), (b"not gzip", "gzip"), (doc, "br")):
        with pytest.raises(ValueError):
            decide.decode_body(body, encoding)
