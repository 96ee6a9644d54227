"""The decision log: one line per flow the proxy decided itself or whose authorisation
failed. Metadata is set by hand as the core's contract defines it (COMMON.md); the last
tests run the real core's hooks first."""

import logging

import pytest
from mitmproxy.http import Response
from mitmproxy.test import taddons, tflow

import registry_rewrite
from regrewrite.addons.decisionlog import DecisionLog, format_line
from tests.unit.test_addon import flow

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
LOGGER = "regrewrite.addons.decisionlog"
NOT_FOUND = b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}'


@pytest.fixture
def log():
    return DecisionLog()


@pytest.fixture
def dctx(log):
    with taddons.context(log) as ctx:
        yield ctx


def make_flow(path, method="GET", status=404, content=b"", headers=(), metadata=None):
    f = flow(path, method, headers=headers)
    f.response = Response.make(status, content, {"Content-Type": "application/json"})
    f.metadata.update(metadata or {})
    return f


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_denial_is_one_info_line_with_decision_code_and_reason(dctx, log, caplog):
    f = make_flow(
        "/v2/x/manifests/1",
        metadata={"registry_decision": "denied", "registry_error_code": "NAME_UNKNOWN"},
    )
    f.comment = "denied: no rule for x"
    with caplog.at_level(logging.INFO):
        log.response(f)
    assert lines(caplog) == [
        "registry: denied GET /v2/x/manifests/1 -> 404 NAME_UNKNOWN: no rule for x"
    ]
    assert caplog.records[-1].levelno == logging.INFO


def test_upstream_404_of_a_mapped_flow_is_not_logged(dctx, log, caplog):
    # The same status as a denial: only the decision tells them apart.
    f = make_flow(
        "/v2/team/app/manifests/1",
        content=NOT_FOUND,
        metadata={"registry_decision": "mapped", "registry_client_name": "team/app"},
    )
    f.comment = "team/app → acme_team/app · manifests GET 1"
    with caplog.at_level(logging.DEBUG):
        log.response(f)
    assert lines(caplog) == []


def test_answered_and_error_flows_are_logged_errors_as_warnings(dctx, log, caplog):
    answered = make_flow("/auth", status=200, metadata={"registry_decision": "answered"})
    answered.comment = (
        "token: 1 scope mapped · repository:team/app:pull → repository:acme_team/app:pull"
    )
    failed = make_flow(
        "/auth",
        status=502,
        metadata={"registry_decision": "error", "registry_error_code": "UNAVAILABLE"},
    )
    failed.comment = "failed: token service auth.test:443: connection refused"
    with caplog.at_level(logging.INFO):
        log.response(answered)
        log.response(failed)
    assert lines(caplog) == [
        "registry: answered GET /auth -> 200: token: 1 scope mapped · "
        "repository:team/app:pull → repository:acme_team/app:pull",
        "registry: error GET /auth -> 502 UNAVAILABLE: token service auth.test:443: "
        "connection refused",
    ]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [
        logging.INFO,
        logging.WARNING,
    ]


def test_successful_answer_without_comment_is_not_logged(dctx, log, caplog):
    # A health probe (/livez every few seconds) has nothing to tell; a failed one has.
    live = make_flow("/livez", status=200, metadata={"registry_decision": "answered"})
    ready = make_flow(
        "/readyz",
        status=503,
        metadata={"registry_decision": "answered", "registry_error_code": "UNAVAILABLE"},
    )
    with caplog.at_level(logging.DEBUG):
        log.response(live)
        log.response(ready)
    assert lines(caplog) == ["registry: answered GET /readyz -> 503 UNAVAILABLE"]


@pytest.mark.parametrize(
    "status, headers, marked, logged",
    [
        (401, (), "", False),  # an anonymous client's first 401: the normal challenge
        (401, (("Authorization", "Bearer <redacted>"),), "", True),  # token rejected
        (401, (), ":lock:", True),  # the core says the upstream refused it
        (403, (), "", True),
        (200, (("Authorization", "Bearer <redacted>"),), "", False),
    ],
)
def test_failed_authorisation_of_a_mapped_flow_is_logged(
    dctx, log, caplog, status, headers, marked, logged
):
    f = make_flow(
        "/v2/team/app/manifests/1",
        status=status,
        headers=headers,
        metadata={"registry_decision": "mapped"},
    )
    f.marked = marked
    f.comment = "team/app → acme_team/app · manifests GET 1 · auth: 401 insufficient_scope"
    with caplog.at_level(logging.INFO):
        log.response(f)
    expected = [
        f"registry: mapped GET /v2/team/app/manifests/1 -> {status}: team/app → "
        "acme_team/app · manifests GET 1 · auth: 401 insufficient_scope"
    ]
    assert lines(caplog) == (expected if logged else [])


def test_option_logs_every_flows_comment(dctx, log, caplog):
    dctx.configure(log, registry_log_comments=True)
    f = make_flow(
        "/v2/team/app/blobs/sha256:ab", status=200, metadata={"registry_decision": "mapped"}
    )
    f.comment = "team/app → acme_team/app · blobs GET sha256:ab"
    plain = make_flow("/v2/", status=200)  # not a registry flow: no decision, no line
    with caplog.at_level(logging.INFO):
        log.response(f)
        log.response(plain)
    assert lines(caplog) == [
        "registry: mapped GET /v2/team/app/blobs/sha256:ab -> 200: "
        "team/app → acme_team/app · blobs GET sha256:ab"
    ]


def test_no_query_header_or_body_reaches_the_line(dctx, log, caplog):
    secret = "s3cr3t-refresh-token"
    f = make_flow(
        f"/auth?account=alice&refresh_token={secret}",
        status=401,
        headers=(("Authorization", f"Basic {secret}"),),
        content=f'{{"errors":[{{"code":"UNAUTHORIZED","detail":"{secret}"}}]}}'.encode(),
        metadata={"registry_decision": "answered"},
    )
    f.comment = "token: 1 scope mapped"
    with caplog.at_level(logging.DEBUG):
        log.response(f)
    assert lines(caplog) == ["registry: answered GET /auth -> 401: token: 1 scope mapped"]
    assert secret not in caplog.text


def test_line_is_one_line_and_bounded():
    line = format_line(
        "denied", "GET", "/v2/" + "a" * 5000, 400, "NAME_INVALID", "x\ny\x1b[31m" * 1000
    )
    assert "\n" not in line and "\x1b" not in line
    assert len(line) < 1500


def test_error_hook_names_the_mapping(dctx, log, caplog):
    f = make_flow("/v2/team/app/manifests/1", metadata={"registry_decision": "mapped"})
    f.response = None
    f.error = tflow.terr("Connection refused")
    f.comment = "team/app → acme_team/app · manifests GET 1"
    with caplog.at_level(logging.INFO):
        log.error(f)
    assert lines(caplog) == [
        "registry: error GET /v2/team/app/manifests/1 -> no response: Connection refused"
        " · team/app → acme_team/app · manifests GET 1"
    ]


# --- with the real core in front ----------------------------------------------------


def test_script_composes_the_decision_log():
    # After the core: it reports what the core decided.
    kinds = [type(a) for a in registry_rewrite.addons]
    assert DecisionLog in kinds
    assert kinds.index(DecisionLog) > kinds.index(registry_rewrite.RegistryRewrite)


async def test_core_denial_then_decision_log(rules_file, caplog):
    core, log = registry_rewrite.RegistryRewrite(), DecisionLog()
    with taddons.context(core, log) as ctx:
        ctx.configure(core, registry_rules=str(rules_file))
        unmapped = make_flow("/v2/x/manifests/1")
        unmapped.response = None
        mapped = make_flow("/v2/team/app/manifests/1")
        mapped.response = None
        with caplog.at_level(logging.INFO):
            for f in (unmapped, mapped):
                core.requestheaders(f)
                if f.response is None:  # went upstream, which says 404 too
                    f.response = Response.make(404, NOT_FOUND, {"Content-Type": "application/json"})
                core.responseheaders(f)
                await core.response(f)
                log.response(f)
    assert lines(caplog) == [
        "registry: denied GET /v2/x/manifests/1 -> 404 NAME_UNKNOWN: no rule for x"
    ]
