"""Several upstreams behind one proxy: rules file, routing, challenges and token splits."""

import base64
import json

import pytest
from mitmproxy.test import taddons

import registry_rewrite
from regrewrite import realm
from regrewrite.auth import form_values, parse_challenges
from regrewrite.rules import RulesError, parse_rules
from tests.unit.test_addon import error_of, flow, respond

RULES = """
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
      - client: "hubusers/{org}/{name}"
        upstream: "{org}_x/{name}"
  ghcr:
    url: https://ghcr.test:8443
    realm: https://ghcr.test:8443/token
    service: ghcr-service
    credentials:
      username: robot
      password_env: GHCR_TEST_TOKEN
    rules:
      - client: "ghcr/{r:path}"
        upstream: "{r:path}"
"""


@pytest.fixture
def addon(tmp_path, monkeypatch):
    monkeypatch.setenv("GHCR_TEST_TOKEN", "s3cret")
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    addon = registry_rewrite.RegistryRewrite()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(path))
        yield addon


def test_rules_file_with_upstreams(monkeypatch):
    monkeypatch.setenv("GHCR_TEST_TOKEN", "x")
    rules = parse_rules(RULES)
    assert [u.key for u in rules.upstreams] == ["default", "hub", "ghcr"]
    assert rules.route("team/app")[:2] == (0, "acme_team/app")
    assert rules.route("hub/nginx")[:2] == (1, "library/nginx")
    assert rules.route("hubusers/bitnami/redis")[:2] == (1, "bitnami_x/redis")
    assert rules.route("ghcr/org/tool")[:2] == (2, "org/tool")
    # The same upstream name on two upstreams maps back per upstream.
    assert rules.client_name("library/nginx", 1) == "hub/nginx"
    assert rules.client_name("library/nginx", 0) is None
    assert rules.client_name("org/tool", 2) == "ghcr/org/tool"
    assert rules.mirror("docker.io") == 1 and rules.mirror("quay.io") is None
    assert rules.upstreams[2].credentials.password() == "x"
    assert "x" not in repr(rules.upstreams[2].credentials)


@pytest.mark.parametrize(
    "text, message",
    [
        ("upstreams:\n  hub:\n    rules: []\n", ":3: upstreams.hub: missing 'url'"),
        (
            "upstreams:\n  hub:\n    url: ftp://x\n",
            "upstreams.hub.url 'ftp://x' must be an http(s) URL",
        ),
        ("upstreams:\n  hub:\n    url: https://x/v2\n", "upstreams.hub.url 'https://x/v2'"),
        (
            "upstreams:\n  hub:\n    url: https://x\n    colour: red\n",
            "unknown key 'upstreams.hub.colour'",
        ),
        ("upstreams:\n  default:\n    url: https://x\n", "'default' names the reverse-mode target"),
        (
            "upstreams:\n  hub:\n    url: https://x\n    credentials:\n      username: u\n"
            "      password_env: NOT_SET_ANYWHERE_42\n",
            "environment variable NOT_SET_ANYWHERE_42 is not set",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x\n    rules:\n      - client: 'a/{n'\n"
            "        upstream: 'library/{n}'\n",
            "upstreams.hub rule 1 (a/{n -> library/{n}): template 'a/{n'",
        ),
    ],
)
def test_bad_upstreams_are_refused(text, message):
    with pytest.raises(RulesError, match=None) as e:
        parse_rules(text, "r.yaml")
    assert message in str(e.value)


def test_routing_sends_the_flow_to_its_upstream(addon):
    f = flow("/v2/hub/nginx/manifests/latest")
    addon.requestheaders(f)
    assert f.response is None
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "hub.test", 443)
    assert f.request.headers["host"] == "hub.test"
    assert f.request.path == "/v2/library/nginx/manifests/latest"
    assert "@hub" in f.comment

    g = flow("/v2/team/app/manifests/latest")
    addon.requestheaders(g)
    assert (
        g.request.host == "upstream.test" and g.request.path == "/v2/acme_team/app/manifests/latest"
    )


def test_responses_map_back_per_upstream(addon):
    f = flow("/v2/hub/nginx/blobs/uploads/", "POST")
    addon.requestheaders(f)
    respond(
        f,
        401,
        b"",
        [
            (
                "WWW-Authenticate",
                'Bearer realm="https://auth.hub.test/token",service="hub-service",'
                'scope="repository:library/nginx:pull,push"',
            )
        ],
    )
    addon.responseheaders(f)
    (c,) = parse_challenges(f.response.headers["WWW-Authenticate"])
    assert c.get("realm") == "http://127.0.0.1:5000/auth"
    assert c.get("scope") == "repository:hub/nginx:pull,push"
    assert addon.learned["hub"] == ("https://auth.hub.test/token", "hub-service")
    assert addon.realm is None  # the default upstream's realm is not the hub's

    g = flow("/v2/hub/nginx/blobs/uploads/", "POST")
    addon.requestheaders(g)
    respond(
        g, 202, b"", [("Location", "https://hub.test/v2/library/nginx/blobs/uploads/u?_state=s")]
    )
    addon.responseheaders(g)
    assert (
        g.response.headers["Location"]
        == "http://127.0.0.1:5000/v2/hub/nginx/blobs/uploads/u?_state=s"
    )


def test_ping_is_answered_by_the_proxy(addon):
    f = flow("/v2/")
    addon.requestheaders(f)
    assert f.response.status_code == 401
    (c,) = parse_challenges(f.response.headers["WWW-Authenticate"])
    assert c.get("realm") == "http://127.0.0.1:5000/auth"
    assert f.comment == "auth: 401 challenge"  # as the README promises (issue 15)
    assert f.metadata["registry_decision"] == "answered"
    g = flow("/v2/", headers=[("Authorization", "Bearer abc")])
    addon.requestheaders(g)
    assert g.response.status_code == 200


def test_mount_across_upstreams_becomes_an_upload(addon):
    f = flow("/v2/hub/nginx/blobs/uploads/?mount=sha256%3Aab&from=team%2Fbase", "POST")
    addon.requestheaders(f)
    assert f.request.path == "/v2/library/nginx/blobs/uploads/"
    assert f.request.host == "hub.test"


class FakeRealm:
    def __init__(self):
        self.calls = []

    def __call__(self, method, url, headers, body, tls, timeout):
        self.calls.append((method, url, dict(headers), body))
        return realm.Reply(200, (("Content-Type", "application/json"),), b'{"token":"t"}')


async def test_token_goes_to_the_upstream_of_its_scopes(addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["hub"] = ("https://auth.hub.test/token", "hub-service")
    f = flow(
        "/auth?service=default-svc&scope=repository:hub/nginx:pull"
        "&scope=repository:team/app:pull&scope=repository:hubusers/bitnami/redis:pull",
        headers=[("Authorization", "Basic dTpw")],
    )
    addon.requestheaders(f)
    await addon.request(f)
    ((method, url, headers, _),) = fake.calls
    assert url.startswith("https://auth.hub.test/token?")
    query = url.split("?", 1)[1]
    assert form_values(query, "scope") == [
        "repository:library/nginx:pull",
        "repository:bitnami_x/redis:pull",
    ]
    assert form_values(query, "service") == ["hub-service"]
    # hub is not the default upstream: by default it gets no credentials of the client's.
    assert "Authorization" not in headers
    assert "anonymous" in f.comment
    assert "dropped repository:team/app:pull" in f.comment


async def test_configured_credentials_replace_the_clients(addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    form = (
        "grant_type=refresh_token&refresh_token=rt&service=x"
        "&scope=repository%3Aghcr%2Forg%2Ftool%3Apull"
    )
    f = flow("/auth", "POST", form.encode(), [("Authorization", "Basic Y2xpZW50OnB3")])
    addon.requestheaders(f)
    await addon.request(f)
    ((method, url, headers, body),) = fake.calls
    assert method == "GET" and body is None
    assert url == (
        "https://ghcr.test:8443/token?service=ghcr-service&scope=repository%3Aorg%2Ftool%3Apull"
    )
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"robot:s3cret").decode()
    assert b"rt" not in f.request.content and "s3cret" not in str(f.request.headers)


async def test_mirror_hint_uses_upstream_names(addon, monkeypatch):
    f = flow("/v2/library/nginx/manifests/latest?ns=docker.io")
    addon.requestheaders(f)
    assert f.request.host == "hub.test" and f.request.path.startswith(
        "/v2/library/nginx/manifests/latest"
    )
    respond(
        f,
        401,
        b"",
        [
            (
                "WWW-Authenticate",
                'Bearer realm="https://a.hub.test/t",service="hub-service",'
                'scope="repository:library/nginx:pull"',
            )
        ],
    )
    addon.responseheaders(f)
    (c,) = parse_challenges(f.response.headers["WWW-Authenticate"])
    assert c.get("realm") == "http://127.0.0.1:5000/auth?ns=docker.io"
    assert c.get("scope") == "repository:library/nginx:pull"

    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    t = flow(
        "/auth?ns=docker.io&scope=repository:library/nginx:pull&scope=repository:secret/x:pull"
    )
    addon.requestheaders(t)
    await addon.request(t)
    url = fake.calls[0][1]
    assert url.startswith("https://a.hub.test/t?")
    assert form_values(url.split("?", 1)[1], "scope") == ["repository:library/nginx:pull"]

    g = flow("/v2/secret/x/manifests/latest?ns=docker.io")
    addon.requestheaders(g)
    assert error_of(g)[:2] == (404, "NAME_UNKNOWN")


def test_single_upstream_ping_still_goes_upstream(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules: []\n")
    addon = registry_rewrite.RegistryRewrite()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(path))
        f = flow("/v2/")
        addon.requestheaders(f)
        assert f.response is None and f.request.stream
    assert json.dumps({})  # keep json import honest


async def test_push_scope_decides_the_upstream_over_a_mount_source(addon, monkeypatch):
    # containerd pushing hub/nginx after pulling it from team/...: source scope first.
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["hub"] = ("https://auth.hub.test/token", "hub-service")
    form = (
        "grant_type=password"
        "&scope=repository%3Ateam%2Fbase%3Apull+repository%3Ahub%2Fnginx%3Apull%2Cpush"
    )
    f = flow("/auth", "POST", form.encode())
    addon.requestheaders(f)
    await addon.request(f)
    ((method, url, headers, body),) = fake.calls
    # The client's password grant is not for hub (anonymous by default): a plain GET.
    assert method == "GET" and body is None and "Authorization" not in headers
    assert url.startswith("https://auth.hub.test/token?")
    query = url.split("?", 1)[1]
    assert form_values(query, "scope") == ["repository:library/nginx:pull,push"]
    assert form_values(query, "service") == ["hub-service"]


async def test_unreadable_password_file_names_the_upstream(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    path = tmp_path / "rules.yaml"
    path.write_text(
        "upstreams:\n  ghcr:\n    url: https://ghcr.test\n    realm: https://ghcr.test/token\n"
        "    service: ghcr-svc\n"
        f"    credentials:\n      username: robot\n      password_file: {secret}\n"
        "    rules:\n      - client: 'ghcr/{r:path}'\n        upstream: '{r:path}'\n"
    )
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon = registry_rewrite.RegistryRewrite()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(path))
        secret.unlink()
        f = flow("/auth?scope=repository:ghcr/x:pull", headers=[("Authorization", "Basic dTpw")])
        addon.requestheaders(f)
        await addon.request(f)
    assert error_of(f) == (502, "UNAVAILABLE", {"upstream": "ghcr"})
    assert fake.calls == []


@pytest.mark.parametrize("auth", [[], [("Authorization", "Bearer abc")]])
def test_ping_answer_caps_the_request_body(addon, auth):
    # The ping is answered by the proxy; a body sent with it was read whole (no cap).
    from regrewrite import decide
    from regrewrite.addons import patches

    f = flow("/v2/", "POST", headers=[*auth, ("Expect", "100-continue")])
    addon.requestheaders(f)
    assert f.response is not None
    assert f.metadata[patches.REQUEST_CAP] == decide.REQUEST_BODY_CAP
    assert "Expect" not in f.request.headers


async def test_a_token_goes_only_to_the_registry_it_is_for(addon, monkeypatch):
    fake = FakeRealm()
    monkeypatch.setattr(realm, "fetch", fake)
    addon.learned["hub"] = ("https://auth.hub.test/token", "hub-service")
    f = flow("/auth?scope=repository:hub/nginx:pull")
    addon.requestheaders(f)
    await addon.request(f)
    assert f.response.status_code == 200  # the token "t", issued by hub's token service
    to_default = flow("/v2/team/app/manifests/1", headers=[("Authorization", "Bearer t")])
    addon.requestheaders(to_default)
    assert to_default.response is None and "Authorization" not in to_default.request.headers
    assert "token of upstream hub withheld" in to_default.comment
    to_hub = flow("/v2/hub/nginx/manifests/1", headers=[("Authorization", "Bearer t")])
    addon.requestheaders(to_hub)
    assert to_hub.request.headers["Authorization"] == "Bearer t"


def test_a_jwt_for_another_upstreams_service_is_withheld(addon):
    from tests.unit.test_contentview import claims, make_jwt

    addon.learned["default"] = ("https://auth.default.test/token", "default-service")
    token = make_jwt(claims([], aud="hub-service"))
    f = flow("/v2/team/app/manifests/1", headers=[("Authorization", f"Bearer {token}")])
    addon.requestheaders(f)
    assert "Authorization" not in f.request.headers
    f = flow("/v2/hub/nginx/manifests/1", headers=[("Authorization", f"Bearer {token}")])
    addon.requestheaders(f)
    assert f.request.headers["Authorization"] == f"Bearer {token}"
    own = make_jwt(claims([], aud="default-service"))
    f = flow("/v2/team/app/manifests/1", headers=[("Authorization", f"Bearer {own}")])
    addon.requestheaders(f)
    assert f.request.headers["Authorization"] == f"Bearer {own}"
