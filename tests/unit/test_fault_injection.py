"""Fault injection (issue 10): make each function the hooks call raise in turn, for a
corpus of representative flows, and check that the addon fails closed.

For every (function, flow) pair where the injected fault is actually hit:
- a request that still goes upstream after the request hooks goes exactly where, and
  with exactly the path and credentials, it goes without the fault (never unmapped);
- no token request leaves for a URL or with credentials that the fault-free run did not
  use (no credential for another host);
- the client gets a registry JSON error (or, where the fault did not matter, exactly
  the fault-free answer), and nothing it sees names an upstream repository, host or
  secret.
The hooks run in mitmproxy's order (requestheaders, request, responseheaders, response)
on prepared flows; ``realm.fetch`` is a recording fake.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json

import pytest
from mitmproxy.http import Response
from mitmproxy.test import taddons

import registry_rewrite
from regrewrite import api, auth, decide, realm, rules
from regrewrite.addons import patches
from tests.unit.test_addon import flow

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
upstreams:
  hub:
    url: https://hub.test
    service: hub-service
    mirror_of: docker.io
    rules:
      - client: "hub/{name}"
        upstream: "library/{name}"
  ghcr:
    url: https://ghcr.test:8443
    realm: https://ghcr.test:8443/token
    service: ghcr-service
    credentials:
      username: robot
      password_env: FI_GHCR_TOKEN
    rules:
      - client: "ghcr/{r:path}"
        upstream: "ghorg_x/{r:path}"
"""
SECRET = "s3cret-robot"
CLIENT_BASIC = "Basic " + base64.b64encode(b"alice:alice-pw").decode()
DEFAULT_REALM = "https://auth.upstream.test/token"
HUB_REALM = "https://auth.hub.test/token"
JSON = [("Content-Type", "application/json")]
# What no client may see: upstream repository names, upstream hosts, the proxy's secret.
LEAKS = ("acme_team", "library/", "ghorg_x", "upstream.test", "hub.test", "ghcr.test", SECRET)


def challenge(realm_url, service, scope):
    return ("WWW-Authenticate", f'Bearer realm="{realm_url}",service="{service}",scope="{scope}"')


def error_body(name):
    return json.dumps(
        {"errors": [{"code": "NAME_UNKNOWN", "message": "unknown", "detail": {"name": name}}]}
    ).encode()


# (id, method, path, request headers, request body, upstream answer (status, headers, body))
CORPUS = [
    (
        "pull-manifest",
        "GET",
        "/v2/team/app/manifests/1",
        [("Authorization", "Bearer abc.def.ghi")],
        b"",
        (200, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")], b"{}"),
    ),
    (
        "pull-challenge",
        "GET",
        "/v2/team/app/manifests/1",
        [],
        b"",
        (
            401,
            [*JSON, challenge(DEFAULT_REALM, "reg", "repository:acme_team/app:pull")],
            error_body("acme_team/app"),
        ),
    ),
    (
        "push-start",
        "POST",
        "/v2/team/app/blobs/uploads/",
        [("Authorization", CLIENT_BASIC)],
        b"",
        (202, [("Location", "/v2/acme_team/app/blobs/uploads/u1?_state=s")], b""),
    ),
    (
        "push-chunk",
        "PATCH",
        "/v2/team/app/blobs/uploads/u1?_state=s",
        [],
        b"data",
        (
            202,
            [("Location", "https://upstream.test/v2/acme_team/app/blobs/uploads/u1?_state=t")],
            b"",
        ),
    ),
    (
        "mount",
        "POST",
        "/v2/team/app/blobs/uploads/?mount=sha256%3Aab&from=team%2Fbase",
        [],
        b"",
        (201, [("Location", "/v2/acme_team/app/blobs/sha256:ab")], b""),
    ),
    (
        "tags",
        "GET",
        "/v2/team/app/tags/list?n=2",
        [],
        b"",
        (
            200,
            [*JSON, ("Link", '</v2/acme_team/app/tags/list?n=2&last=b>; rel="next"')],
            b'{"name":"acme_team/app","tags":["a","b"]}',
        ),
    ),
    (
        "tags-gzip",
        "GET",
        "/v2/team/app/tags/list",
        [],
        b"",
        (
            200,
            [*JSON, ("Content-Encoding", "gzip")],
            gzip.compress(b'{"name":"acme_team/app","tags":["a"]}'),
        ),
    ),
    (
        "catalog",
        "GET",
        "/v2/_catalog?n=2",
        [],
        b"",
        (
            200,
            [*JSON, ("Link", '</v2/_catalog?last=hidden%2Fx&n=2>; rel="next"')],
            b'{"repositories":["acme_team/app","hidden/x"]}',
        ),
    ),
    (
        "error-404",
        "GET",
        "/v2/team/app/manifests/nope",
        [],
        b"",
        (404, JSON, error_body("acme_team/app")),
    ),
    (
        "head-404",
        "HEAD",
        "/v2/team/app/manifests/nope",
        [],
        b"",
        (404, JSON, b""),
    ),
    (
        "hub-pull-challenge",
        "GET",
        "/v2/hub/nginx/manifests/1",
        [("Authorization", CLIENT_BASIC)],
        b"",
        (
            401,
            [*JSON, challenge(HUB_REALM, "hub-service", "repository:library/nginx:pull")],
            error_body("library/nginx"),
        ),
    ),
    (
        "ghcr-pull-redirect",
        "GET",
        "/v2/ghcr/org/tool/manifests/1",
        [],
        b"",
        (307, [("Location", "https://ghcr.test:8443/v2/ghorg_x/org/tool/blobs/sha256:ab")], b""),
    ),
    (
        "token-get",
        "GET",
        "/auth?service=reg&scope=repository%3Ateam%2Fapp%3Apull%2Cpush",
        [("Authorization", CLIENT_BASIC)],
        b"",
        None,
    ),
    (
        "token-post",
        "POST",
        "/auth",
        [("Content-Type", "application/x-www-form-urlencoded")],
        b"grant_type=password&username=alice&password=alice-pw&service=reg"
        b"&scope=repository%3Ateam%2Fapp%3Apull+repository%3Ateam%2Fbase%3Apull",
        None,
    ),
    (
        "token-hub",
        "POST",
        "/auth",
        [("Authorization", CLIENT_BASIC)],
        b"grant_type=refresh_token&refresh_token=rt-secret&scope=repository%3Ahub%2Fnginx%3Apull",
        None,
    ),
    (
        "token-ghcr",
        "GET",
        "/auth?scope=repository%3Aghcr%2Forg%2Ftool%3Apull",
        [("Authorization", CLIENT_BASIC)],
        b"",
        None,
    ),
    (
        "catalog-page-2",
        "GET",
        "/v2/_catalog?n=1&last=team%2Fapp",
        [],
        b"",
        (200, JSON, b'{"repositories":["acme_team/zed"]}'),
    ),
    (
        "mirror-pull",
        "GET",
        "/v2/library/nginx/manifests/1?ns=docker.io",
        [],
        b"",
        (200, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")], b"{}"),
    ),
    ("ping", "GET", "/v2/", [], b"", None),
    ("denied", "PUT", "/v2/secret/x/manifests/1", [("Authorization", CLIENT_BASIC)], b"{}", None),
]


class Injected(Exception):  # noqa: N818 - not a ValueError: no intended handling hides it
    pass


def _raiser(where):
    def fail(*args, **kwargs):
        where["hits"] += 1
        raise Injected("injected fault")

    return fail


# (module or class, attribute): every function the hooks reach.
TARGETS = [
    (decide, "decide_request"),
    (decide, "resolve"),
    (decide, "token_upstream"),
    (decide, "credentials_mode"),
    (decide, "plan_token"),
    (decide, "plan_response"),
    (decide, "body_rewrite"),
    (decide, "rewrite_body"),
    (decide, "allowed_actions"),
    (api, "split_target"),
    (api, "parse_repository_path"),
    (api, "query_value"),
    (api, "replace_query_value"),
    (api, "drop_query_values"),
    (api, "rewrite_url"),
    (api, "rewrite_link"),
    (api, "rewrite_catalog"),
    (api, "rewrite_tags_list"),
    (api, "rewrite_errors"),
    (api.Origin, "parse"),
    (auth, "rewrite_challenge"),
    (auth, "parse_challenges"),
    (auth, "map_scopes"),
    (auth, "parse_scopes"),
    (auth, "form_values"),
    (auth, "replace_form_values"),
    (auth, "set_form_value"),
    (auth, "redact_form"),
    (auth, "basic_credentials"),
    (rules.Rules, "resolve"),
    (decide, "decode_body"),
    (rules.Rules, "client_name"),
    (rules.Rules, "upstream_name"),
    (rules.Rules, "mirror"),
    (rules.Credentials, "password"),
    (realm, "fetch"),
    (registry_rewrite, "_account_header"),
    (registry_rewrite, "_client_names"),
    (registry_rewrite, "_drop_client_authority"),
    (registry_rewrite, "_is_manifest"),
    (registry_rewrite, "_user"),
    (registry_rewrite, "bearer_info"),
    (registry_rewrite, "auth_note"),
    (registry_rewrite, "token_shortfall"),
    (registry_rewrite.RegistryRewrite, "_learn_realm"),
    (registry_rewrite.RegistryRewrite, "_catalog_cursor"),
    (registry_rewrite.RegistryRewrite, "public_origin"),
    (registry_rewrite.RegistryRewrite, "_answer_ping"),
]


class FakeRealm:
    def __init__(self):
        self.calls = []

    def __call__(self, method, url, headers, body, tls, timeout):
        self.calls.append((method, url, tuple(sorted(headers)), body))
        return realm.Reply(
            200, (("Content-Type", "application/json"),), b'{"token":"tok","expires_in":60}'
        )


def run(addon, case):
    """Run one flow through the hooks in mitmproxy's order; return what happened."""
    _, method, path, headers, body, answer = case
    # A fresh start for each flow: nothing learned or cached by an earlier one.
    registry_rewrite._BEARER_CACHE.clear()
    addon.cursors.clear()
    addon.learned.clear()
    addon.learned["default"] = (DEFAULT_REALM, "reg")
    addon.learned["hub"] = (HUB_REALM, "hub-service")
    addon.show_manifests = True  # manifests kept for the view: that path too
    f = flow(path, method, body, headers)
    f.client_conn.sockname = ("127.0.0.1", 5000)
    addon.requestheaders(f)
    asyncio.run(addon.request(f))
    sent = None
    if f.response is None and f.error is None:
        req = f.request
        sent = (
            req.scheme,
            req.host,
            req.port,
            req.path,
            tuple(req.headers.get_all("Authorization")),
            req.content,
        )
        status, resp_headers, resp_body = answer
        f.response = Response.make(
            status, resp_body, [(k.encode(), v.encode()) for k, v in resp_headers]
        )
        if method == "HEAD":
            f.response.headers["Content-Length"] = "100"
    addon.responseheaders(f)
    if f.response is not None and f.metadata.get(patches.RESPONSE_CAP) == 0:
        # What the patched body state does with a body past a 0-byte cap.
        if f.response.raw_content:
            f.response = Response.make(502, f.metadata[patches.CAP_ERROR].encode(), dict(JSON))
            f.metadata["registry_answered"] = True
    asyncio.run(addon.response(f))
    resp = f.response
    seen = (
        resp.status_code,
        tuple((k.lower(), v) for k, v in resp.headers.items(multi=True)),
        resp.content,
    )
    return sent, seen


@pytest.fixture
def make_addon(tmp_path, monkeypatch):
    monkeypatch.setenv("FI_GHCR_TOKEN", SECRET)
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    contexts = []

    def make():
        addon = registry_rewrite.RegistryRewrite()
        tctx = taddons.context(addon)
        tctx.__enter__()
        contexts.append(tctx)
        tctx.configure(addon, registry_rules=str(path))
        return addon

    yield make
    for tctx in contexts:
        tctx.__exit__(None, None, None)


def _visible(seen) -> str:
    status, headers, content = seen
    return " ".join(f"{k}: {v}" for k, v in headers) + " " + content.decode("latin-1")


def _is_json_error(seen, method) -> bool:
    status, headers, content = seen
    if status < 400 or ("content-type", "application/json") not in headers:
        return False
    if method == "HEAD":
        return content == b""
    return bool(json.loads(content).get("errors"))


@pytest.fixture(scope="module")
def baselines():
    return {}


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_baseline_is_mapped_and_leak_free(make_addon, monkeypatch, case):
    # The fault-free run: the reference the injected runs are compared with.
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    sent, seen = run(make_addon(), case)
    leaks = [x for x in LEAKS if x in _visible(seen)]
    assert not leaks, (case[0], seen)
    if case[5] is None:
        assert sent is None  # answered by the proxy itself
    else:
        assert sent is not None, seen


@pytest.mark.parametrize("target", TARGETS, ids=[f"{o.__name__}.{a}" for o, a in TARGETS])
def test_each_fault_fails_closed(make_addon, monkeypatch, target):
    owner, attr = target
    hits_total = 0
    addon = make_addon()
    for case in CORPUS:
        name, method = case[0], case[1]
        fake = FakeRealm()
        with monkeypatch.context() as m:
            m.setattr(realm, "fetch", fake)
            base_sent, base_seen = run(addon, case)
        base_calls = list(fake.calls)

        fake = FakeRealm()
        where = {"hits": 0}
        with monkeypatch.context() as m:
            m.setattr(realm, "fetch", fake)
            if isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod):
                fail = _raiser(where)
                m.setattr(owner, attr, classmethod(lambda cls, *a, _f=fail, **k: _f()))
            else:  # (realm.fetch too: the raiser replaces the recording fake)
                m.setattr(owner, attr, _raiser(where))
            sent, seen = run(addon, case)
        if where["hits"] == 0:
            continue
        hits_total += 1
        ctx = f"{attr} in {name}: sent={sent} seen={seen}"
        # Nothing upstream unless exactly as without the fault.
        if sent is not None:
            assert sent == base_sent, ctx
        # No token request the fault-free run did not make (URL and credentials).
        for call in fake.calls:
            assert call in base_calls, (ctx, call, base_calls)
        # The client gets a JSON error, or exactly the fault-free answer.
        assert seen == base_seen or _is_json_error(seen, method), ctx
        leaks = [x for x in LEAKS if x in _visible(seen)]
        assert not leaks, (leaks, ctx)
    assert hits_total, f"{attr} is never called by any flow of the corpus"
