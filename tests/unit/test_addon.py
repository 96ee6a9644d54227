"""The addon's hooks on prepared flows (mitmproxy's taddons/tflow idiom); the upstream
and its token realm are stood in for by monkeypatching ``realm.fetch``."""

import asyncio
import json
import logging
import os
import threading

import pytest
from mitmproxy import exceptions
from mitmproxy.http import Response
from mitmproxy.test import tflow, tutils

import registry_rewrite
from regrewrite import realm
from regrewrite.auth import parse_challenges

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
  - client: "{name}"
    upstream: "library/{name}"
"""
UPSTREAM_REALM = "https://auth.upstream.test/token"


def flow(path, method="GET", content=b"", headers=(), tls=False, sni=None):
    """A flow as reverse mode hands it to us: already aimed at the upstream."""
    req = tutils.treq(
        method=method.encode(),
        scheme=b"https",
        host="upstream.test",
        port=443,
        path=path.encode(),
        headers=[(b"host", b"upstream.test")] + [(k.encode(), v.encode()) for k, v in headers],
        content=content,
    )
    f = tflow.tflow(req=req)
    f.client_conn.sockname = ("127.0.0.1", 5000)
    f.client_conn.tls = tls
    f.client_conn.sni = sni
    f.client_conn.timestamp_tls_setup = 1 if tls else None
    return f


def respond(f, status=200, content=b"", headers=()):
    f.response = Response.make(status, content, [(k.encode(), v.encode()) for k, v in headers])


def error_of(f):
    doc = json.loads(f.response.content)
    return f.response.status_code, doc["errors"][0]["code"], doc["errors"][0].get("detail")


# --- request paths ----------------------------------------------------------------


@pytest.mark.parametrize(
    "client, upstream",
    [
        ("/v2/team/app/manifests/latest", "/v2/acme_team/app/manifests/latest"),
        ("/v2/team/tools/cli/blobs/sha256:ab", "/v2/acme_team/tools/cli/blobs/sha256:ab"),
        ("/v2/team/app/blobs/uploads/", "/v2/acme_team/app/blobs/uploads/"),
        (
            "/v2/team/app/blobs/uploads/u1?_state=x%3D",
            "/v2/acme_team/app/blobs/uploads/u1?_state=x%3D",
        ),
        ("/v2/team/app/tags/list?n=10&last=1.0", "/v2/acme_team/app/tags/list?n=10&last=1.0"),
        ("/v2/team/app/referrers/sha256:ab", "/v2/acme_team/app/referrers/sha256:ab"),
        ("/v2/nginx/manifests/1.25", "/v2/library/nginx/manifests/1.25"),
        ("/v2/", "/v2/"),
    ],
)
def test_request_paths_are_mapped_and_streamed(tctx, addon, client, upstream):
    f = flow(client, method="PUT" if "uploads/u1" in client else "GET")
    addon.requestheaders(f)
    assert f.response is None
    assert f.request.path == upstream
    assert f.request.stream


def test_cross_repo_mount_from_is_mapped(tctx, addon):
    f = flow("/v2/team/app/blobs/uploads/?mount=sha256%3Aab&from=team%2Fbase", "POST")
    addon.requestheaders(f)
    assert (
        f.request.path == "/v2/acme_team/app/blobs/uploads/?mount=sha256%3Aab&from=acme_team%2Fbase"
    )


def test_mount_from_outside_the_rules_becomes_an_upload(tctx, addon):
    # A registry that cannot mount starts an upload (see test_addon_clients.py).
    f = flow("/v2/team/app/blobs/uploads/?mount=sha256%3Aab&from=other%2Fx", "POST")
    addon.requestheaders(f)
    assert f.response is None
    assert f.request.path == "/v2/acme_team/app/blobs/uploads/"


def test_unmatched_deny_answers_without_upstream(tctx, addon):
    f = flow("/v2/other/x/manifests/latest")
    addon.requestheaders(f)
    assert error_of(f) == (404, "NAME_UNKNOWN", {"name": "other/x"})
    assert f.request.path == "/v2/other/x/manifests/latest"  # the list shows what was asked
    assert f.marked and f.comment.startswith("denied: no rule for other/x")
    assert not f.request.stream  # mitmproxy refuses to stream a request we answer


async def test_unmatched_pass_forwards_unchanged(tctx, addon, rules_file):
    rules_file.write_text(RULES.replace("deny", "pass"))
    tctx.configure(addon, registry_rules=str(rules_file) + "")
    await addon.reload_rules()
    f = flow("/v2/other/x/manifests/latest")
    addon.requestheaders(f)
    assert f.response is None and f.request.path == "/v2/other/x/manifests/latest"


@pytest.mark.parametrize(
    "path", ["/v2/Team/app/manifests/x", "/v2/team/../x/manifests/x", "/v2/team/a%2Fb/tags/list"]
)
def test_invalid_names_get_name_invalid(tctx, addon, path):
    f = flow(path)
    addon.requestheaders(f)
    assert error_of(f)[:2] == (400, "NAME_INVALID")


def test_head_refusal_has_no_body(tctx, addon):
    f = flow("/v2/other/x/manifests/latest", "HEAD")
    addon.requestheaders(f)
    assert f.response.status_code == 404 and f.response.content == b""
    assert int(f.response.headers["content-length"]) > 0


# --- catalog ------------------------------------------------------------------------


async def test_catalog_maps_last_and_filters_and_pages(tctx, addon):
    f = flow("/v2/_catalog?n=2&last=team%2Fapp")
    addon.requestheaders(f)
    assert f.request.path == "/v2/_catalog?n=2&last=acme_team%2Fapp"
    respond(
        f,
        200,
        b'{"repositories":["acme_team/base","secret/hidden"]}',
        [
            ("Content-Type", "application/json"),
            ("Link", '</v2/_catalog?last=secret%2Fhidden&n=2>; rel="next"'),
        ],
    )
    addon.responseheaders(f)
    assert not f.response.stream
    await addon.response(f)
    assert json.loads(f.response.content) == {"repositories": ["team/base"]}
    link = f.response.headers["Link"]
    assert "secret" not in link and "last=~" in link  # an opaque cursor hides the name
    cursor = link.split("last=")[1].split("&")[0]
    g = flow(f"/v2/_catalog?last={cursor}&n=2")
    addon.requestheaders(g)
    assert g.request.path == "/v2/_catalog?last=secret%2Fhidden&n=2"


async def test_a_big_body_counts_against_the_budget_while_it_waits_for_its_rewrite(
    tctx, addon, monkeypatch
):
    from regrewrite.addons import patches

    seen = []

    def rewrite(*args):
        seen.append(patches.buffered())  # (in the worker thread, while the flow waits)
        return b'{"repositories":[]}'

    monkeypatch.setattr(registry_rewrite.decide, "rewrite_body", rewrite)
    addon.running()
    body = json.dumps({"repositories": ["acme_team/x" * 10] * 1000}).encode()
    f = flow("/v2/_catalog")
    addon.requestheaders(f)
    respond(f, 200, body, [("Content-Type", "application/json")])
    addon.responseheaders(f)
    before = patches.buffered()
    await addon.response(f)
    assert len(body) > registry_rewrite.INLINE_REWRITE
    assert seen == [before + len(body)] and patches.buffered() == before
    assert f.response.content == b'{"repositories":[]}'
    addon.done()


# --- token endpoint ------------------------------------------------------------------


class FakeRealm:
    """Stands in for the upstream's realm and /v2/ ping."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def __call__(self, method, url, headers, body, tls, timeout):
        self.calls.append((method, url, dict(headers), body))
        if self.fail:
            raise self.fail
        if url.endswith("/v2/"):
            return realm.Reply(
                401, (("WWW-Authenticate", f'Bearer realm="{UPSTREAM_REALM}",service="svc"'),), b""
            )
        return realm.Reply(200, (("Content-Type", "application/json"),), b'{"token":"t"}')


async def run_token(tctx, addon, f):
    addon.requestheaders(f)
    assert not f.request.stream
    await addon.request(f)


async def test_token_get_maps_every_scope(tctx, addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["default"] = (UPSTREAM_REALM, None)
    f = flow(
        "/auth?service=svc&scope=repository%3Ateam%2Fapp%3Apull%2Cpush"
        "&scope=repository:nginx:pull%20repository:team/base:pull&scope=registry:catalog:*&account=alice",
        headers=[("Authorization", "Basic YWxpY2U6cHc="), ("X-Forwarded-Host", "evil.test")],
    )
    await run_token(tctx, addon, f)
    ((method, url, headers, body),) = fake.calls
    assert method == "GET" and url.startswith(UPSTREAM_REALM + "?service=svc&scope=")
    query = url.split("?", 1)[1]
    from regrewrite.auth import form_values

    assert form_values(query, "scope") == [
        "repository:acme_team/app:pull,push",
        "repository:library/nginx:pull repository:acme_team/base:pull",
        "registry:catalog:*",
    ]
    assert form_values(query, "account") == ["alice"]
    assert headers["Authorization"] == "Basic YWxpY2U6cHc="
    assert "X-Forwarded-Host" not in headers and "host" not in {k.lower() for k in headers}
    assert f.response.status_code == 200 and f.response.content == b'{"token":"t"}'
    assert f.comment.startswith("token: 3 scopes mapped")


async def test_token_post_form_scope_mapped_rest_untouched(tctx, addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["default"] = (UPSTREAM_REALM, None)
    form = (
        "grant_type=refresh_token&refresh_token=r%2B1&service=svc&client_id=containerd"
        "&scope=repository%3Ateam%2Fapp%3Apull%2Cpush+repository%3Aother%2Fx%3Apull"
    )
    f = flow(
        "/auth", "POST", form.encode(), [("Content-Type", "application/x-www-form-urlencoded")]
    )
    await run_token(tctx, addon, f)
    ((method, url, headers, body),) = fake.calls
    assert (method, url) == ("POST", UPSTREAM_REALM)
    assert body.decode() == (
        "grant_type=refresh_token&refresh_token=r%2B1&service=svc&client_id=containerd"
        "&scope=repository:acme_team/app:pull,push"
    )
    assert "dropped repository:other/x:pull" in f.comment


async def test_token_realm_discovered_when_not_yet_learned(tctx, addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    f = flow("/auth?scope=repository:team/app:pull")
    await run_token(tctx, addon, f)
    assert [c[1] for c in fake.calls] == [
        "https://upstream.test/v2/",
        UPSTREAM_REALM + "?scope=repository:acme_team/app:pull",
    ]
    assert addon.realm == UPSTREAM_REALM


async def test_configured_realm_wins(tctx, addon, monkeypatch, rules_file):
    rules_file.write_text("upstream:\n  realm: https://pinned.test/auth\n" + RULES)
    await addon.reload_rules()
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["default"] = (UPSTREAM_REALM, None)
    await run_token(tctx, addon, flow("/auth?scope=repository:team/app:pull"))
    assert fake.calls[0][1].startswith("https://pinned.test/auth?")


@pytest.mark.parametrize("timeout, status", [(False, 502), (True, 504)])
async def test_token_service_unreachable_is_a_registry_error(
    tctx, addon, monkeypatch, timeout, status
):
    monkeypatch.setattr(realm, "fetch", FakeRealm(realm.RealmUnreachable("refused", timeout)))
    addon.learned["default"] = (UPSTREAM_REALM, None)
    f = flow("/auth?scope=repository:team/app:pull")
    await run_token(tctx, addon, f)
    assert error_of(f)[:2] == (status, "UNAVAILABLE")
    assert f.response.headers["Content-Type"] == "application/json"


async def test_token_endpoint_rejects_other_methods(tctx, addon):
    f = flow("/auth", "DELETE")
    addon.requestheaders(f)
    assert error_of(f)[:2] == (405, "UNSUPPORTED")


# --- responses ------------------------------------------------------------------------

CHALLENGE = (
    'Bearer realm="https://auth.upstream.test/token",service="svc",'
    'scope="repository:acme_team/app:pull,push",error="insufficient_scope"'
)


@pytest.mark.parametrize(
    "tls, sni, public, realm_url",
    [
        (False, None, None, "http://127.0.0.1:5000/auth"),
        (True, "registry.example.com", None, "https://registry.example.com:5000/auth"),
        (False, None, "https://registry.example.com", "https://registry.example.com/auth"),
    ],
)
def test_challenge_points_at_proxy(tctx, addon, tls, sni, public, realm_url):
    if public:
        tctx.configure(addon, registry_public_url=public)
    f = flow("/v2/team/app/blobs/uploads/", "POST", tls=tls, sni=sni)
    addon.requestheaders(f)
    respond(f, 401, b"", [("WWW-Authenticate", CHALLENGE), ("Content-Type", "application/json")])
    addon.responseheaders(f)
    (c,) = parse_challenges(f.response.headers["WWW-Authenticate"])
    assert c.get("realm") == realm_url
    assert c.get("scope") == "repository:team/app:pull,push"
    assert c.get("service") == "svc" and c.get("error") == "insufficient_scope"
    assert addon.realm == "https://auth.upstream.test/token"


def test_location_and_link_are_mapped(tctx, addon):
    f = flow("/v2/team/app/blobs/uploads/", "POST")
    addon.requestheaders(f)
    respond(
        f,
        202,
        b"",
        [("Location", "https://upstream.test/v2/acme_team/app/blobs/uploads/u1?_state=s")],
    )
    addon.responseheaders(f)
    assert (
        f.response.headers["Location"]
        == "http://127.0.0.1:5000/v2/team/app/blobs/uploads/u1?_state=s"
    )
    assert f.response.stream

    f = flow("/v2/team/app/blobs/sha256:ab")
    addon.requestheaders(f)
    respond(f, 307, b"", [("Location", "https://blobs.storage.test/x?sig=1")])
    addon.responseheaders(f)
    assert f.response.headers["Location"] == "https://blobs.storage.test/x?sig=1"


async def test_tags_list_body_and_link(tctx, addon):
    f = flow("/v2/team/app/tags/list?n=1")
    addon.requestheaders(f)
    respond(
        f,
        200,
        b'{"name":"acme_team/app","tags":["1.0"]}',
        [
            ("Content-Type", "application/json"),
            ("Link", '</v2/acme_team/app/tags/list?last=1.0&n=1>; rel="next"'),
        ],
    )
    addon.responseheaders(f)
    assert not f.response.stream
    await addon.response(f)
    assert json.loads(f.response.content) == {"name": "team/app", "tags": ["1.0"]}
    assert f.response.headers["Link"] == '</v2/team/app/tags/list?last=1.0&n=1>; rel="next"'


async def test_error_body_names_are_mapped(tctx, addon):
    f = flow("/v2/team/app/manifests/nope")
    addon.requestheaders(f)
    body = {
        "errors": [{"code": "NAME_UNKNOWN", "message": "x", "detail": {"name": "acme_team/app"}}]
    }
    respond(
        f, 404, json.dumps(body).encode(), [("Content-Type", "application/json; charset=utf-8")]
    )
    addon.responseheaders(f)
    await addon.response(f)
    assert json.loads(f.response.content)["errors"][0]["detail"] == {"name": "team/app"}


@pytest.mark.parametrize(
    "status, content_type, code",
    [
        (404, "text/plain; charset=utf-8", "UNKNOWN"),
        (403, "text/html", "DENIED"),
        (429, "", "TOOMANYREQUESTS"),
        (502, "text/html", "UNAVAILABLE"),
        (500, "text/html", "UNKNOWN"),
    ],
)
async def test_an_error_body_that_is_not_json_is_replaced(tctx, addon, status, content_type, code):
    # Nothing parses an HTML or text error for names: it never reaches the client.
    f = flow("/v2/team/app/manifests/nope")
    addon.requestheaders(f)
    headers = [("Content-Type", content_type)] if content_type else []
    respond(
        f, status, b"<html>acme_team/app is not here</html>", [*headers, ("Content-Encoding", "x")]
    )
    addon.responseheaders(f)
    assert not f.response.stream
    await addon.response(f)
    assert b"acme_team" not in f.response.content
    assert error_of(f)[:2] == (status, code)
    assert f.response.headers["Content-Type"] == "application/json"
    assert "Content-Encoding" not in f.response.headers
    empty = flow("/v2/team/app/manifests/nope")
    addon.requestheaders(empty)
    respond(empty, status, b"", headers)
    addon.responseheaders(empty)
    await addon.response(empty)
    assert empty.response.content == b""


@pytest.mark.parametrize(
    "status, content_type, body, code",
    [
        (
            404,
            "application/problem+json",
            b'{"type": "about:blank", "title": "acme_team/app not found", "status": 404}',
            "UNKNOWN",
        ),
        (429, "application/json", b'{"message": "API rate limit exceeded"}', "TOOMANYREQUESTS"),
        (403, "application/json; charset=utf-8", b'["acme_team/app"]', "DENIED"),
    ],
)
async def test_a_json_error_that_is_no_registry_error_keeps_its_status(
    tctx, addon, status, content_type, body, code
):
    # A gateway's JSON (problem+json, {"message": ...}) has no "errors" list to map:
    # it failed the flow with a 502 (clients retry a 5xx; a 404 or 429 is an answer),
    # where the same words as text/html got their own status.
    f = flow("/v2/team/app/manifests/nope")
    addon.requestheaders(f)
    respond(f, status, body, [("Content-Type", content_type)])
    addon.responseheaders(f)
    await addon.response(f)
    assert b"acme_team" not in f.response.content
    assert error_of(f)[:2] == (status, code)
    assert f.response.headers["Content-Type"] == "application/json"


async def test_a_json_error_in_an_encoding_the_proxy_cannot_read_keeps_its_status(tctx, addon):
    # A CDN compresses JSON errors with br for a client that accepts it (curl
    # --compressed): undecodable, it failed the flow with a 502, where a br-encoded
    # text error got its own status.
    f = flow("/v2/team/app/manifests/nope", headers=[("Accept-Encoding", "br")])
    addon.requestheaders(f)
    headers = [("Content-Type", "application/json"), ("Content-Encoding", "br")]
    respond(f, 404, b"\x8b\x07\x80acme_team/app\x03", headers)
    addon.responseheaders(f)
    await addon.response(f)
    assert b"acme_team" not in f.response.content
    assert error_of(f)[:2] == (404, "UNKNOWN")
    assert "Content-Encoding" not in f.response.headers


async def test_a_redirects_body_is_dropped(tctx, addon):
    # The courtesy link in the body is the Location before its rewrite.
    f = flow("/v2/team/app/blobs/sha256:ab")
    addon.requestheaders(f)
    location = "https://upstream.test/v2/acme_team/app/blobs/sha256:ab"
    link = f'<a href="{location}">Temporary Redirect</a>.'.encode()
    respond(f, 307, link, [("Location", location), ("Content-Type", "text/html")])
    addon.responseheaders(f)
    await addon.response(f)
    assert f.response.headers["Location"] == "http://127.0.0.1:5000/v2/team/app/blobs/sha256:ab"
    assert list(f.response.stream(link)) == [] and f.response.headers["Content-Length"] == "0"
    storage = flow("/v2/team/app/blobs/sha256:ab")
    addon.requestheaders(storage)
    headers = [("Location", "https://storage.test/x?sig=1"), ("Content-Encoding", "br")]
    respond(storage, 307, link, headers)  # (not decoded: never read)
    addon.responseheaders(storage)
    await addon.response(storage)
    assert list(storage.response.stream(link)) == []
    assert storage.response.headers["Location"] == "https://storage.test/x?sig=1"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_redirects_body_is_dropped_as_it_arrives(tctx, addon, monkeypatch, chunked):
    # Buffered to be emptied, a storage redirect's courtesy link counted against the
    # budget of capped bodies: while other flows' rewrites held it, a blob GET got a
    # 502 (and any body over 4 MiB did too). Nothing of it needs to be held.
    import weakref

    from regrewrite.addons import patches
    from tests.unit.test_patches import Stream, feed, state_response

    monkeypatch.setattr(patches, "_buffering", weakref.WeakSet())
    f = flow("/v2/team/app/blobs/sha256:ab")
    addon.requestheaders(f)
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", "44")
    headers = [("Location", "https://storage.test/x?sig=1"), ("Content-Encoding", "br"), framing]
    f.response = Response.make(307, b"", [(k.encode(), v.encode()) for k, v in headers])
    addon.responseheaders(f)
    s = Stream(cap=0, request=False)
    s.flow = f
    with patches.holding(patches.BUFFER_BUDGET):
        assert feed(s, state_response, b"<a href=x>acme_team</a>", request=False) == []
    assert f.live and f.error is None and s.response_body_buf == b""
    assert callable(f.response.stream)
    # ([], not b"": an empty chunk ends a chunked HTTP/1 body early)
    assert list(f.response.stream(b"<a href=x>acme_team</a>")) == []
    assert list(f.response.stream(b"")) == []
    assert "Content-Encoding" not in f.response.headers
    if chunked:
        assert "Content-Length" not in f.response.headers
    else:
        assert f.response.headers["Content-Length"] == "0"


def test_blob_bodies_are_streamed(tctx, addon):
    f = flow("/v2/team/app/blobs/sha256:ab")
    addon.requestheaders(f)
    respond(
        f,
        200,
        b"",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(1 << 30))],
    )
    addon.responseheaders(f)
    assert f.request.stream and f.response.stream


# --- rules file -----------------------------------------------------------------------


def test_bad_rules_file_at_startup_is_logged_as_error(tctx, addon, tmp_path, caplog):
    # mitmdump exits when an error is logged during start-up: a clean message, no traceback.
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - client: '{a}'\n    upstream: 'x'\n")
    with caplog.at_level(logging.ERROR):
        tctx.configure(addon, registry_rules=str(bad))
    assert "bad.yaml:2: rule 1 ({a} -> x): client and upstream use different placeholders" in (
        caplog.text
    )


def test_bad_rules_file_while_running_is_an_options_error(tctx, addon, tmp_path):
    # e.g. `set registry_rules=...` in the console: refused, previous rules kept.
    addon.started = True
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - client: '{a}'\n    upstream: 'x'\n")
    with pytest.raises(
        exceptions.OptionsError, match=r"bad.yaml:2: rule 1 \(\{a\} -> x\): .*placeholders"
    ):
        tctx.configure(addon, registry_rules=str(bad))
    assert addon.rules.upstream_name("team/app") == "acme_team/app"


def test_bad_public_url_is_an_options_error(tctx, addon):
    with pytest.raises(exceptions.OptionsError, match="registry_public_url"):
        tctx.configure(addon, registry_public_url="registry.example.com")


async def test_reload_takes_effect_and_invalid_edit_keeps_old_rules(
    tctx, addon, rules_file, caplog
):
    rules_file.write_text(RULES.replace("acme_team", "newco_team"))
    await addon.reload_rules()
    assert addon.rules.upstream_name("team/app") == "newco_team/app"
    rules_file.write_text(RULES + "  - client: '{x}'\n")
    with caplog.at_level(logging.ERROR):
        await addon.reload_rules()
    assert "rule 3: missing 'upstream'" in caplog.text and "previous rules stay" in caplog.text
    assert addon.rules.upstream_name("team/app") == "newco_team/app"


async def _watch_until(addon, done, rounds=100):
    """Run the rules watcher (at a fast pace) until ``done()`` or ``rounds`` looks."""
    task = asyncio.get_running_loop().create_task(addon._watch_rules())
    try:
        for _ in range(rounds):
            await asyncio.sleep(0.02)
            if done():
                return True
        return False
    finally:
        task.cancel()


async def test_watcher_sees_a_copy_that_keeps_size_and_mtime(tctx, addon, rules_file, monkeypatch):
    monkeypatch.setattr(registry_rewrite, "RELOAD_INTERVAL", 0.01)
    stat = os.stat(rules_file)
    # Same length, same mtime (as `cp -p` or `rsync -a` leave it): only the content differs.
    rules_file.write_text(RULES.replace("acme_team", "acme_tean"))
    os.utime(rules_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(rules_file).st_size == stat.st_size
    assert await _watch_until(
        addon, lambda: addon.rules.upstream_name("team/app") == "acme_tean/app"
    )


async def test_watcher_survives_any_exception_and_keeps_the_rules(
    tctx, addon, rules_file, monkeypatch, caplog
):
    monkeypatch.setattr(registry_rewrite, "RELOAD_INTERVAL", 0.01)
    real = registry_rewrite._parse_rules_file
    calls = []

    def broken(path, data):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("a bug in the checker")  # not a RulesError
        return real(path, data)

    monkeypatch.setattr(registry_rewrite, "_parse_rules_file", broken)
    rules_file.write_text(RULES.replace("acme_team", "first_team"))
    with caplog.at_level(logging.ERROR):
        assert await _watch_until(addon, lambda: len(calls) >= 1)
    assert addon.rules.upstream_name("team/app") == "acme_team/app"  # kept
    assert "reloading the rules failed" in caplog.text and addon.reloads["error"] == 1
    # The watcher is still alive: the next edit takes effect.
    rules_file.write_text(RULES.replace("acme_team", "second_team"))
    assert await _watch_until(
        addon, lambda: addon.rules.upstream_name("team/app") == "second_team/app"
    )


async def test_reload_runs_off_the_event_loop(tctx, addon, rules_file, monkeypatch):
    loop_thread = threading.get_ident()
    threads = []
    real = registry_rewrite._parse_rules_file

    def recording(path, data):
        threads.append(threading.get_ident())
        return real(path, data)

    monkeypatch.setattr(registry_rewrite, "_parse_rules_file", recording)
    await addon.reload_rules()
    assert threads and loop_thread not in threads


def test_a_checker_bug_is_a_rules_error(monkeypatch, tmp_path):
    # StopIteration cannot cross a Future (asyncio raises TypeError and the reload would
    # hang): the parse step turns any exception into a RulesError inside the thread.
    def bug(text, source):
        raise StopIteration

    monkeypatch.setattr("regrewrite.rules.parse_rules", bug)
    with pytest.raises(registry_rewrite.RulesError, match="cannot check the rules"):
        registry_rewrite._parse_rules_file(str(tmp_path / "r.yaml"), b"rules: []")


def test_overlapping_rules_load_and_are_logged_as_aliases(tctx, addon, tmp_path, caplog):
    rules_file = tmp_path / "hub.yaml"
    rules_file.write_text(
        'rules:\n  - client: "hub/{name}"\n    upstream: "library/{name}"\n'
        '  - client: "hub/{org}/{name}"\n    upstream: "{org}/{name}"\n'
    )
    with caplog.at_level(logging.INFO):
        tctx.configure(addon, registry_rules=str(rules_file))
    assert addon.rules.route("hub/library/nginx").name == "library/nginx"
    assert "rule 2 (hub/{org}/{name} -> {org}/{name}) is an alias of rule 1" in caplog.text


async def test_unreachable_pinned_realm_names_both_realms_and_the_fix(
    tctx, addon, monkeypatch, rules_file
):
    # issue 15: a pinned realm (e.g. Aliyun's, copied from an example) that differs from
    # the one the upstream advertises and cannot be reached.
    rules_file.write_text("upstream:\n  realm: https://pinned.test/auth\n" + RULES)
    await addon.reload_rules()
    monkeypatch.setattr(realm, "fetch", FakeRealm(realm.RealmUnreachable("refused")))
    addon.learned["default"] = (UPSTREAM_REALM, None)
    f = flow("/auth?scope=repository:team/app:pull")
    addon.requestheaders(f)
    await addon.request(f)
    status, code, _ = error_of(f)
    assert (status, code) == (502, "UNAVAILABLE")
    assert "pinned.test" in f.comment and UPSTREAM_REALM in f.comment
    assert "remove 'realm' from the rules" in f.comment


def test_unreachable_realm_message_has_no_stray_colons(monkeypatch):
    # issue 15 saw "dockerauth.cn-hangzhou.aliyuncs.com:: [Errno -2]" for a port-less URL.
    import http.client

    def refuse(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(http.client.HTTPConnection, "request", refuse)
    with pytest.raises(realm.RealmUnreachable) as e:
        realm.fetch("GET", "http://auth.test/token", [], None, None, 5)
    assert str(e.value) == "auth.test: [Errno -2] Name or service not known"


async def test_replay_restores_kept_credentials_but_not_over_a_typed_one(tctx, addon):
    f = flow("/v2/team/app/manifests/1", headers=[("Authorization", "Bearer first")])
    addon.requestheaders(f)
    respond(f, 200)
    addon.responseheaders(f)
    await addon.response(f)
    assert f.request.headers["Authorization"] == "Bearer <redacted>"
    assert f.request.path == "/v2/team/app/manifests/1"  # shown as the client sent it
    f.is_replay = "request"
    f.response = None
    addon.requestheaders(f)  # kept in memory for this flow: restored, and mapped once
    assert f.response is None and f.request.path == "/v2/acme_team/app/manifests/1"
    assert f.request.headers["Authorization"] == "Bearer first"
    respond(f, 200)
    addon.responseheaders(f)
    await addon.response(f)
    assert f.comment.startswith("replay · team/app → acme_team/app")
    f.request.headers["Authorization"] = "Bearer typed-by-a-person"
    f.response = None
    addon.requestheaders(f)
    assert f.request.headers["Authorization"] == "Bearer typed-by-a-person"
