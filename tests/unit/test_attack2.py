"""Attacks on the small addons, replay and the token path that once got through."""

import asyncio
import base64
import io
import json
import re

import pytest
from mitmproxy import io as mio
from mitmproxy.flow import Error
from mitmproxy.http import Response
from mitmproxy.proxy.layers import http as layers_http
from mitmproxy.test import taddons

import registry_rewrite
from regrewrite import realm
from regrewrite.addons import accesslog
from regrewrite.addons.health import Health
from regrewrite.api import Origin
from tests.unit.test_addon import flow

RULES = """
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
PASSWORD = "pw-S3CRET"
REFRESH = "rt-S3CRET"
BASIC = "Basic YWxpY2U6cHctUzNDUkVU"  # alice:pw-S3CRET


def _unreachable(*args, **kwargs):
    raise realm.RealmUnreachable("upstream.test:443: connection refused")


def _stored(f) -> str:
    """What mitmweb's API and a saved flow file hold of the flow."""
    return json.dumps(f.get_state(), default=lambda b: b.decode("latin-1"))


def _run_token(addon, f):
    addon.requestheaders(f)
    asyncio.run(addon.request(f))
    addon.responseheaders(f)  # mitmproxy emulates it for a response set in a hook
    asyncio.run(addon.response(f))


@pytest.mark.parametrize(
    "form",
    [
        # Refused before the plan: the upstream advertises no realm (it is down).
        f"grant_type=password&username=alice&password={PASSWORD}&refresh_token={REFRESH}"
        "&scope=repository%3Ateam%2Fapp%3Apull",
        # Refused for a non-ASCII form.
        f"grant_type=password&username=\xe9&password={PASSWORD}&refresh_token={REFRESH}",
    ],
)
def test_a_refused_token_request_keeps_no_secret(addon, rules_file, monkeypatch, form):
    monkeypatch.setattr(realm, "fetch", _unreachable)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        headers = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Authorization", BASIC),
        ]
        f = flow("/auth", "POST", form.encode("latin-1"), headers)
        _run_token(addon, f)
    assert f.response.status_code in (400, 502)
    stored = _stored(f)
    for secret in (PASSWORD, REFRESH, BASIC.split()[1]):
        assert secret not in stored


@pytest.mark.parametrize(
    "authorization, user",
    [
        ("Basic YWxpY2U6cHctUzNDUkVU", "alice"),  # alice:pw-S3CRET
        # No colon: not user:password; the whole value may be a token (a PAT sent as
        # Basic). It went into registry_user, the access log and saved flows.
        ("Basic cGF0LVMzQ1JFVA==", None),  # pat-S3CRET
        ("Basic bm90OmJhc2U2NA=!", None),
        ("Bearer opaque", None),
    ],
)
def test_registry_user_is_never_a_credential(authorization, user):
    assert registry_rewrite._user(authorization) == user


def test_registry_user_is_bounded():
    # An unverified JWT's sub is the client's to choose: the access log writes it.
    claims = base64.urlsafe_b64encode(json.dumps({"sub": "x" * 100_000}).encode()).decode()
    token = f"eyJhbGciOiJub25lIn0.{claims.rstrip('=')}.sig"
    user = registry_rewrite._user(f"Bearer {token}")
    assert user is not None and len(user) <= registry_rewrite.USER_LIMIT


@pytest.mark.parametrize(
    "path, method", [("/livez", "POST"), ("/livez", "GET"), ("/readyz", "PUT")]
)
async def test_health_answers_send_no_100_continue(addon, rules_file, path, method):
    # mitmproxy sends "100 Continue" after requestheaders even when a response is set;
    # the client then sends its body, and past the cap no answer could reach it (the
    # core drops Expect from what it answers for the same reason).
    h = Health()
    with taddons.context(h, addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        f = flow(path, method, headers=[("Expect", "100-continue"), ("Content-Length", "9")])
        pending = h.requestheaders(f)
        if pending is not None:
            await pending
    assert f.response is not None
    assert "expect" not in f.request.headers


def test_one_bad_record_does_not_end_the_access_log(tmp_path, caplog):
    # The writer thread turns records into JSON; one it cannot (a flow without a start
    # time, a metadata value json cannot take) ended the thread, and with it the log.
    path = tmp_path / "access.log"
    writer = accesslog._Writer(open(path, "a", encoding="utf-8"), True)  # noqa: SIM115
    good = (1.0, "192.0.2.9", "alice", "GET", "ping", None, None, "default", 200, 0, 1.5, "x")
    writer.start()
    writer.offer((None, *good[1:]))  # no start time
    writer.offer((*good[:2], object(), *good[3:]))  # not JSON
    writer.offer(good)
    writer.finish()
    assert not writer.is_alive()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["user"] for r in records] == ["alice"]
    assert "2 records could not be written" in caplog.text


def test_replay_of_a_saved_flow_behind_a_balancer(addon, rules_file):
    # A flow saved behind a trusted balancer keeps registry_public, which a flow file
    # stores as a plain list; its replay (no forwarding headers any more: the core drops
    # them) used that list as the public origin and failed with a 502.
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        addon.learned["default"] = ("https://auth.test/token", "reg")
        f = flow("/v2/team/app/manifests/1")
        f.metadata["registry_public"] = Origin("https", "reg.example.com", 443)
        addon.requestheaders(f)
        f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        buf = io.BytesIO()
        mio.FlowWriter(buf).add(f)
        buf.seek(0)
        g = next(iter(mio.FlowReader(buf).stream()))
        g.is_replay, g.live, g.response = "request", True, None
        addon.requestheaders(g)
        assert g.request.path == "/v2/acme_team/app/manifests/1"
        g.response = Response.make(
            401,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
            {
                "Content-Type": "application/json",
                "WWW-Authenticate": 'Bearer realm="https://auth.test/token",service="reg",'
                'scope="repository:acme_team/app:pull"',
            },
        )
        addon.responseheaders(g)
        asyncio.run(addon.response(g))
    assert g.response.status_code == 401, g.comment
    challenge = g.response.headers["WWW-Authenticate"]
    assert re.search(r'realm="https?://[a-z0-9.:-]+/auth"', challenge), challenge
    assert "repository:team/app:pull" in challenge


def test_access_log_records_are_bounded(addon, rules_file):
    # A refused name is the client's, of any length (mitmproxy bounds no request line):
    # the queue holds QUEUE_SIZE records, so each must be small for its memory to be.
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        f = flow("/v2/" + "x/" * 50_000 + "app/manifests/1")
        addon.requestheaders(f)
        f.metadata["registry_upstream_name"] = "y" * 100_000
        f.metadata["registry_user"] = "u" * 100_000
    assert f.response.status_code in (400, 404)
    values = accesslog.fields(f)
    assert sum(len(v) for v in values if isinstance(v, str)) <= 4 * accesslog.FIELD_LIMIT
    record = accesslog.entry(values)
    assert record["client_name"].startswith("x/x/") and record["client_name"].endswith("…")


def test_a_replay_keeps_credentials_typed_into_the_edited_flow(addon, rules_file):
    # Only the redacted value is replaced by the kept one: Authorization typed in anew
    # (mitmweb's request editor) was dropped, so the replay went without it.
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        f = flow("/v2/team/app/manifests/1", headers=[("Authorization", "Bearer old")])
        addon.requestheaders(f)
        f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        assert f.request.headers["Authorization"] == "Bearer <redacted>"
        # replayed unedited: the kept credential
        f.is_replay, f.response = "request", None
        addon.requestheaders(f)
        assert f.request.headers["Authorization"] == "Bearer old"
        f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        # edited: the new one, for this replay and the next
        f.request.headers["Authorization"] = "Bearer new"
        for _ in range(2):
            f.is_replay, f.response = "request", None
            addon.requestheaders(f)
            assert f.request.headers["Authorization"] == "Bearer new"
            f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
            addon.responseheaders(f)
            asyncio.run(addon.response(f))
            assert f.request.headers["Authorization"] == "Bearer <redacted>"


def test_a_replay_sends_the_edited_token_form_with_its_secrets(addon, rules_file, monkeypatch):
    # The kept original form replaced the edited one whole: a scope changed in the
    # request editor was not what the replay asked for.
    monkeypatch.setattr(realm, "fetch", _unreachable)
    form = (
        f"grant_type=password&username=alice&password={PASSWORD}&scope=repository%3Ateam%2Fa%3Apull"
    )
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        addon.learned["default"] = ("https://auth.test/token", "reg")
        f = flow(
            "/auth", "POST", form.encode(), [("Content-Type", "application/x-www-form-urlencoded")]
        )
        _run_token(addon, f)
        assert PASSWORD not in f.request.text
        f.request.text = f.request.text.replace("team%2Fa%3A", "team%2Fb%3A")
        f.is_replay, f.response = "request", None
        addon.requestheaders(f)
        assert f.request.text == form.replace("team%2Fa%3A", "team%2Fb%3A")
        # unedited: the original, exactly
        _run_token(addon, f)
        f.is_replay, f.response = "request", None
        addon.requestheaders(f)
        assert f.request.text == form.replace("team%2Fa%3A", "team%2Fb%3A")


# --- an exception in any small addon's hook, in mitmproxy's own addon chain ------------

SMALL = ("Health", "TrustedProxies", "Metrics", "AccessLog", "DecisionLog")
HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")


def _chain_cases():
    for name in SMALL:
        cls = getattr(registry_rewrite, name)
        for hook in HOOKS:
            if hasattr(cls, hook):
                yield name, hook


@pytest.mark.parametrize("name, hook", list(_chain_cases()))
async def test_a_failing_small_addon_never_lets_a_flow_through_unmapped(
    rules_file, tmp_path, monkeypatch, caplog, name, hook
):
    # mitmproxy logs an addon's exception and calls the next addon: the core must still
    # map or refuse every flow, and no credential may reach any log.
    def boom(self, flow):
        raise RuntimeError("injected")

    monkeypatch.setattr(getattr(registry_rewrite, name), hook, boom)
    addons = [type(a)() for a in registry_rewrite.addons]
    with taddons.context(*addons) as tctx:
        core = next(a for a in addons if isinstance(a, registry_rewrite.RegistryRewrite))
        tctx.configure(core, registry_rules=str(rules_file))
        tctx.options.update(
            registry_trusted_proxies="127.0.0.0/8",
            registry_metrics="127.0.0.1:0",
            registry_access_log=str(tmp_path / "access.log"),
            registry_log_comments=True,
        )
        for a in addons:
            if hasattr(a, "running") and not isinstance(a, registry_rewrite.RegistryRewrite):
                a.running()
        hooks = tctx.master.addons
        for path, expect in (
            ("/v2/team/app/manifests/1", "/v2/acme_team/app/manifests/1"),
            ("/v2/secret/app/manifests/1", None),
            ("/livez", None),
        ):
            headers = [("Authorization", BASIC), ("X-Forwarded-Host", "lb.example")]
            f = flow(path, headers=headers)
            f.client_conn.peername = ("127.0.0.1", 40000)
            await hooks.handle_lifecycle(layers_http.HttpRequestHeadersHook(f))
            await hooks.handle_lifecycle(layers_http.HttpRequestHook(f))
            if expect is None:
                assert f.response is not None and f.response.status_code >= 200, path
            else:
                assert f.response is None
                assert f.request.path == expect
                assert "x-forwarded-host" not in f.request.headers
                f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
            await hooks.handle_lifecycle(layers_http.HttpResponseHeadersHook(f))
            await hooks.handle_lifecycle(layers_http.HttpResponseHook(f))
            f.error = Error("client disconnected")
            await hooks.handle_lifecycle(layers_http.HttpErrorHook(f))
            assert BASIC.split()[1] not in json.dumps(f.get_state(), default=str)
        for a in addons:
            if hasattr(a, "done"):
                a.done()
    logged = caplog.text + (tmp_path / "access.log").read_text()
    assert "injected" in caplog.text  # the fault did happen
    for secret in (BASIC.split()[1], PASSWORD):
        assert secret not in logged


@pytest.mark.parametrize("edit", ["host", "port", "scheme"])
def test_a_replay_to_another_host_carries_no_kept_credential(addon, rules_file, edit):
    # Credentials are kept out of the flow (mitmweb shows it, files save it) but in
    # memory for a replay; a replay edited to go to another host took them along.
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        f = flow("/v2/team/app/manifests/1", headers=[("Authorization", BASIC)])
        addon.requestheaders(f)
        f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        assert f.request.headers["Authorization"] == "Basic <redacted>"
        if edit == "host":
            f.request.host = "collector.example"
        elif edit == "port":
            f.request.port = 8443
        else:
            f.request.scheme = "http"
        f.is_replay, f.response = "request", None
        addon.requestheaders(f)
    assert "Authorization" not in f.request.headers
    assert "without credentials" in f.metadata["registry_replay"]


def test_a_replay_to_the_same_host_carries_the_kept_credential(addon, rules_file):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        f = flow("/v2/team/app/manifests/1", headers=[("Authorization", BASIC)])
        addon.requestheaders(f)
        f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        f.request.path = "/v2/team/other/manifests/2"  # another name: same upstream
        f.is_replay, f.response = "request", None
        addon.requestheaders(f)
    assert f.request.headers["Authorization"] == BASIC
    assert f.request.path == "/v2/acme_team/other/manifests/2"


def test_a_replay_sent_elsewhere_teaches_no_realm(addon, rules_file, monkeypatch):
    # The learned realm is where every client's token request goes, with the client's
    # credentials: a replay edited to another host must not replace it with that host's.
    calls = []

    def fetch(method, url, headers, body, tls, timeout):
        calls.append(url)
        if url.startswith("https://upstream.test/"):
            challenge = 'Bearer realm="https://auth.test/token",service="reg"'
        else:
            challenge = 'Bearer realm="https://collector.example/token",service="c"'
        return realm.Reply(401, (("WWW-Authenticate", challenge),), b"")

    monkeypatch.setattr(realm, "fetch", fetch)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        addon.learned["default"] = ("https://auth.test/token", "reg")
        f = flow("/v2/team/app/manifests/1")
        addon.requestheaders(f)
        f.response = Response.make(200, b"{}", {"Content-Type": "application/json"})
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        f.request.host = "collector.example"
        f.is_replay, f.response = "request", None
        addon.requestheaders(f)
        f.response = Response.make(
            401,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}',
            {
                "Content-Type": "application/json",
                "WWW-Authenticate": 'Bearer realm="https://collector.example/token",service="c"',
            },
        )
        addon.responseheaders(f)
        asyncio.run(addon.response(f))
        assert addon.learned["default"] == ("https://auth.test/token", "reg")
        # A token request replayed elsewhere, the realm not known yet: not asked there.
        addon.learned.clear()
        t = flow("/auth?scope=repository%3Ateam%2Fapp%3Apull", headers=[("Authorization", BASIC)])
        _run_token(addon, t)
        t.request.host = "collector.example"
        t.is_replay, t.response = "request", None
        _run_token(addon, t)
        addon.learned.clear()
        t.request.host = "collector.example"
        t.is_replay, t.response = "request", None
        _run_token(addon, t)
        assert "default" not in addon.learned
        assert t.response.status_code == 502
        assert not any("collector.example" in url for url in calls), calls


async def test_health_refusal_follows_the_metadata_contract(addon, rules_file):
    # A 405 is the proxy refusing with a 4xx: "denied", with its registry error code
    # (metrics count denials by it; the decision log prints it).
    h = Health()
    with taddons.context(h, addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        f = flow("/livez", "DELETE")
        assert h.requestheaders(f) is None
    assert f.response.status_code == 405
    assert f.metadata["registry_decision"] == "denied"
    assert f.metadata["registry_error_code"] == "UNSUPPORTED"


def test_a_failing_token_request_logs_no_query(addon, rules_file, monkeypatch, caplog):
    # The failure log named the path with its query: a token request may carry
    # account names, refresh tokens or passwords there (the decision log drops it too).
    from regrewrite import decide

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(decide, "plan_token", boom)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        addon.learned["default"] = ("https://auth.test/token", "reg")
        f = flow(f"/auth?scope=repository%3Ateam%2Fapp%3Apull&password={PASSWORD}")
        _run_token(addon, f)
    assert f.response.status_code == 500
    assert "injected" in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    "mode, live, host, elsewhere",
    [
        # In reverse mode the target is known before any live flow.
        (["reverse:https://upstream.test"], False, "collector.example", True),
        (["reverse:https://upstream.test"], False, "upstream.test", False),
        # A replay-only process (mitmdump -n -C): where the flow went, as recorded.
        (["regular"], False, "upstream.test", False),
        (["regular"], True, "collector.example", True),
    ],
)
def test_where_a_replay_is_meant_to_go(addon, rules_file, mode, live, host, elsewhere):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        tctx.options.update(mode=mode)
        f = flow("/v2/team/app/manifests/1")
        f.metadata["registry_default"] = ["https", "upstream.test", 443]  # as a file has it
        if live:
            addon.requestheaders(flow("/v2/team/app/manifests/1"))
        f.request.host = host
        f.is_replay = "request"
        addon.requestheaders(f)
    assert ("registry_elsewhere" in f.metadata) is elsewhere
