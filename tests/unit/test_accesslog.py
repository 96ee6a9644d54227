"""The AccessLog addon after the core: its JSON lines, its bounded queue, no secrets."""

import base64
import json
import logging

import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.flow import Error
from mitmproxy.http import Response
from mitmproxy.test import taddons

from regrewrite.addons import accesslog
from regrewrite.addons.accesslog import AccessLog
from tests.unit.test_addon import flow

RULES = """
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
PASSWORD = "s3cr3t-P4ssw0rd-xyz"
BASIC = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9."
    + base64.urlsafe_b64encode(b'{"sub":"alice","access":[]}').decode().rstrip("=")
    + ".c2lnbmF0dXJlLXNlY3JldC1wYXJ0"
)
REFRESH = "refresh-0123456789abcdef"
SECRETS = (PASSWORD, BASIC, JWT, JWT.split(".")[2], REFRESH)
FIELDS = {
    "ts", "client", "user", "method", "endpoint", "client_name", "upstream_name",
    "upstream", "status", "bytes", "duration_ms", "decision",
}  # fmt: skip


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "access.log"


@pytest.fixture
def alog(addon, rules_file, log_path):
    a = AccessLog()
    with taddons.context(addon, a) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        tctx.configure(a, registry_access_log=str(log_path))
        yield a
        a.done()


def lines(a, path):
    a.done()  # the writer thread flushes and stops
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(addon, a, f, status, body=b"", metadata=None, stream=False):
    f.client_conn.peername = ("192.0.2.9", 41000)
    addon.requestheaders(f)
    f.metadata.update(metadata or {})
    f.response = Response.make(status, body, {"Content-Type": "application/json"})
    f.response.timestamp_start = f.request.timestamp_start + 0.01
    f.response.timestamp_end = f.request.timestamp_start + 0.0125
    f.response.stream = stream
    addon.responseheaders(f)
    a.responseheaders(f)
    if callable(f.response.stream):  # the core streams it: the body passes as mitmproxy would
        for chunk in (body, b""):
            f.response.stream(chunk)
    return f


def test_one_line_per_flow_with_its_fields(alog, addon, log_path):
    md = {
        "registry_endpoint": "manifests",
        "registry_decision": "mapped",
        "registry_client_name": "team/app",
        "registry_upstream_name": "acme_team/app",
        "registry_upstream_key": "default",
        "registry_user": "alice",
    }
    f = run(addon, alog, flow("/v2/team/app/manifests/1"), 200, b"{}" * 8, md)
    alog.response(f)
    alog.error(f)  # a later error hook does not log the flow twice
    g = run(
        addon,
        alog,
        flow("/v2/team/app/blobs/sha256:" + "a" * 64),
        200,
        metadata=dict(md, registry_endpoint="blobs"),
        stream=True,
    )
    g.response.stream(b"x" * 300)
    g.response.stream(b"")
    alog.response(g)
    (first, second) = lines(alog, log_path)
    assert set(first) == FIELDS
    assert first["client"] == "192.0.2.9"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert first | {"ts": None} == {
        "ts": None,
        "client": "192.0.2.9",
        "user": "alice",
        "method": "GET",
        "endpoint": "manifests",
        "client_name": "team/app",
        "upstream_name": "acme_team/app",
        "upstream": "default",
        "status": 200,
        "bytes": 16,
        "duration_ms": 12.5,
        "decision": "mapped",
    }
    assert second["bytes"] == 300 and second["endpoint"] == "blobs"


def test_error_without_response(alog, addon, log_path):
    f = flow("/v2/team/app/manifests/1")
    addon.requestheaders(f)
    f.metadata.update(registry_decision="mapped", registry_endpoint="manifests")
    f.error = Error("server disconnected")
    alog.error(f)
    (entry,) = lines(alog, log_path)
    assert entry["status"] is None and entry["bytes"] == 0 and entry["decision"] == "mapped"


def test_never_writes_credentials(alog, addon, log_path):
    # A token request as a client sends it (Basic credentials, password grant with a
    # refresh token), and the token service's answer carrying tokens.
    form = f"grant_type=password&username=alice&password={PASSWORD}&refresh_token={REFRESH}"
    t = flow(
        f"/auth?scope=repository:team/app:pull&password={PASSWORD}",
        method="POST",
        content=form.encode(),
        headers=[("Authorization", f"Basic {BASIC}")],
    )
    body = json.dumps({"token": JWT, "access_token": JWT, "refresh_token": REFRESH}).encode()
    t = run(
        addon,
        alog,
        t,
        200,
        body,
        {"registry_endpoint": "token", "registry_decision": "answered", "registry_user": "alice"},
    )
    alog.response(t)
    m = run(
        addon,
        alog,
        flow("/v2/team/app/manifests/1", headers=[("Authorization", f"Bearer {JWT}")]),
        401,
        b'{"errors":[]}',
        {"registry_endpoint": "manifests", "registry_user": "alice"},
    )
    alog.response(m)
    entries = lines(alog, log_path)
    text = log_path.read_text()
    assert len(entries) == 2 and entries[0]["user"] == "alice"
    for secret in SECRETS:
        assert secret not in text


def test_standard_output(addon, rules_file, capsys):
    a = AccessLog()
    with taddons.context(addon, a) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        tctx.configure(a, registry_access_log="-")
        f = run(addon, a, flow("/v2/team/app/tags/list"), 200, b"{}")
        a.response(f)
        a.done()
    assert json.loads(capsys.readouterr().out)["status"] == 200


def test_full_queue_drops_and_counts(addon, rules_file, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(accesslog, "QUEUE_SIZE", 2)
    a = AccessLog()
    with taddons.context(addon, a) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        out = open(tmp_path / "log", "w")  # noqa: SIM115 (the writer closes it)
        # A writer that has not caught up yet (its thread is not even running).
        writer = accesslog._Writer(out, close=True)
        a.writer = writer
        with caplog.at_level(logging.WARNING):
            for _ in range(10):
                f = run(addon, a, flow("/v2/team/app/tags/list"), 200, b"{}")
                a.response(f)  # never blocks
            writer.start()
            a.done()
    assert len((tmp_path / "log").read_text().splitlines()) == 2  # a full queue
    assert writer.dropped == 8
    warnings = [r.message for r in caplog.records if "registry_access_log" in r.message]
    assert len(warnings) == 2  # once at the first drop, once with the total
    assert "8 records were dropped" in warnings[1]


def test_bad_path_is_an_options_error(alog, tmp_path):
    with pytest.raises(exceptions.OptionsError, match="registry_access_log"):
        ctx.options.update(registry_access_log=str(tmp_path / "missing" / "dir" / "log"))
