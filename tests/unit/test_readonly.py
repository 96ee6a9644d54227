"""Read-only rules (issue 11 item 4, issue 15 item 2), enforced by the core: writes are
refused by the proxy, token scopes and challenges ask only for what is allowed."""

import json

import pytest

from regrewrite import realm
from regrewrite.auth import form_values, parse_challenges
from tests.unit.test_addon import UPSTREAM_REALM, FakeRealm, error_of, flow, respond

RULES = """
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
  - client: "hub/{name}"
    upstream: "library/{name}"
    actions: [pull]
upstreams:
  robot:
    url: https://robot.test
    credentials:
      username: robot
      password_env: ROBOT_TEST_PASSWORD
    rules:
      - client: "builds/{r:path}"
        upstream: "ci/{r:path}"
        actions: [pull, push]
      - client: "mirror/{r:path}"
        upstream: "{r:path}"
"""


@pytest.fixture(autouse=True)
def robot_password(monkeypatch):
    monkeypatch.setenv("ROBOT_TEST_PASSWORD", "robot-secret")


@pytest.mark.parametrize(
    "method, path",
    [
        ("PUT", "/v2/hub/nginx/manifests/1"),
        ("POST", "/v2/hub/nginx/blobs/uploads/"),
        ("PATCH", "/v2/hub/nginx/blobs/uploads/u1"),
        ("DELETE", "/v2/hub/nginx/manifests/sha256:ab"),
        ("BREW", "/v2/hub/nginx/manifests/1"),  # unknown methods count as writes
        # The robot account's upstream: pull only unless a rule grants more.
        ("PUT", "/v2/mirror/x/manifests/1"),
        ("DELETE", "/v2/mirror/x/manifests/sha256:ab"),
    ],
)
def test_writes_to_read_only_names_are_refused_by_the_proxy(tctx, addon, method, path):
    f = flow(path, method)
    addon.requestheaders(f)
    assert f.response is not None, "went upstream"
    assert error_of(f)[:2] == (403, "DENIED")
    assert f.metadata["registry_decision"] == "denied"
    assert "read-only" in f.comment


@pytest.mark.parametrize(
    "method, path, upstream_path",
    [
        ("GET", "/v2/hub/nginx/manifests/1", "/v2/library/nginx/manifests/1"),
        ("HEAD", "/v2/mirror/x/blobs/sha256:ab", "/v2/x/blobs/sha256:ab"),
        ("PUT", "/v2/builds/app/manifests/1", "/v2/ci/app/manifests/1"),  # granted push
        ("PUT", "/v2/team/app/manifests/1", "/v2/acme_team/app/manifests/1"),
    ],
)
def test_allowed_actions_go_upstream(tctx, addon, method, path, upstream_path):
    f = flow(path, method)
    addon.requestheaders(f)
    assert f.response is None
    assert f.request.path == upstream_path


async def test_token_scopes_are_narrowed_to_what_the_rules_allow(tctx, addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["default"] = (UPSTREAM_REALM, "svc")
    f = flow(
        "/auth?scope=repository:hub/nginx:pull,push,delete"
        "&scope=repository:team/app:pull,push&scope=repository:hub/redis:*"
    )
    addon.requestheaders(f)
    await addon.request(f)
    ((_, url, _, _),) = fake.calls
    assert form_values(url.split("?", 1)[1], "scope") == [
        "repository:library/nginx:pull",
        "repository:acme_team/app:pull,push",
    ]
    assert "dropped repository:hub/redis:*" in f.comment


async def test_robot_account_token_never_asks_for_a_push_nobody_granted(tctx, addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["robot"] = ("https://auth.robot.test/token", "robot-svc")
    f = flow("/auth?scope=repository:mirror/x:pull,push")  # an anonymous client
    addon.requestheaders(f)
    await addon.request(f)
    ((method, url, headers, _),) = fake.calls
    assert form_values(url.split("?", 1)[1], "scope") == ["repository:x:pull"]
    assert headers["Authorization"].startswith("Basic ")  # the proxy's own account
    assert "robot-secret" not in f.comment + json.dumps(dict(f.request.headers))


def test_challenge_asks_only_for_what_is_allowed(tctx, addon):
    f = flow("/v2/hub/nginx/manifests/1")
    addon.requestheaders(f)
    respond(
        f,
        401,
        b"",
        [
            (
                "WWW-Authenticate",
                f'Bearer realm="{UPSTREAM_REALM}",service="svc",'
                'scope="repository:library/nginx:pull,push"',
            )
        ],
    )
    addon.responseheaders(f)
    (challenge,) = parse_challenges(f.response.headers["WWW-Authenticate"])
    assert challenge.get("scope") == "repository:hub/nginx:pull"


def test_refusals_name_the_client_repository_for_the_logs(tctx, addon):
    for path in ("/v2/hub/nginx/blobs/uploads/", "/v2/other/x/manifests/1", "/v2/team/a/blobs/x"):
        f = flow(path, "POST" if "uploads" in path else "GET")
        addon.requestheaders(f)
        assert f.response is not None
        assert f.metadata["registry_client_name"] == path.split("/")[2] + "/" + path.split("/")[3]
