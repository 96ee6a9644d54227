"""Registry traffic as people debug it (issue 5): a real mitmweb with the addon, driven by
skopeo, read back over mitmweb's own API; and mitmdump's most verbose log, which must
show the registry contentview and no secret.

The mitmweb scenario runs once per module (push, list tags, pull, a refused push and a
push without the right to) and the tests below each check one aspect of what mitmweb
then holds.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse

import pytest

from tests.e2e.conftest import require_tool
from tests.e2e.images import build_image
from tests.e2e.mitmweb import Mitmweb
from tests.e2e.proxycheck import RULES
from tests.e2e.upstream import ALICE, BOB, Skopeo, SkopeoError

BASIC_ALICE = base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()
BASIC_BOB = base64.b64encode(f"{BOB[0]}:{BOB[1]}".encode()).decode()


def _require_skopeo() -> None:
    require_tool("skopeo")
    if os.geteuid() == 0:
        require_tool("unshare", "util-linux")
        require_tool("mount", "mount")


def wait_for_flows(api, done, timeout: float = 30.0) -> list[dict]:
    """mitmweb's flow list once `done(flows)` holds and no flow is still in flight."""
    deadline = time.monotonic() + timeout
    while True:
        flows = api.flows()
        settled = all("response" in f or "error" in f for f in flows)
        if settled and done(flows):
            return flows
        if time.monotonic() > deadline:
            raise AssertionError(f"flows did not settle: {json.dumps(flows)[:3000]}")
        time.sleep(0.2)


class Scenario:
    """What the module's mitmweb run did, for the tests to look at."""

    def __init__(self, web: Mitmweb, unique: str, image, token_server):
        self.web = web
        self.unique = unique
        self.repo = f"team/{unique}/app"
        self.upstream_repo = f"acme_team/{unique}/app"
        self.image = image
        self.token_server = token_server
        self.flows: list[dict] = []
        self.elapsed = 0.0  # seconds skopeo took, through mitmweb

    def by_comment(self, text: str) -> list[dict]:
        return [f for f in self.flows if text in f["comment"]]


@pytest.fixture(scope="module")
def scenario(request, ca, registry, token_server, tmp_path_factory):
    _require_skopeo()
    unique = os.urandom(4).hex()
    tmp = tmp_path_factory.mktemp("mitmweb")
    web = Mitmweb(registry.url, ca, RULES).start()
    failed_before = request.session.testsfailed
    skopeo = Skopeo(ca, directory=tmp / "skopeo")
    try:
        s = Scenario(
            web, unique, build_image(tmp / "image", layers=2, layer_size=8000), token_server
        )
        started = time.monotonic()
        dest = f"docker://{web.host}/{s.repo}"
        skopeo.copy(s.image.ref, f"{dest}:1.0", dest_creds=ALICE, tls_verify=False)
        assert skopeo.list_tags(dest, creds=ALICE, tls_verify=False) == ["1.0"]
        skopeo.copy(f"{dest}:1.0", f"oci:{tmp / 'pulled'}:x", src_creds=ALICE, tls_verify=False)
        with pytest.raises(SkopeoError):  # no rule maps other/...
            skopeo.copy(
                s.image.ref, f"docker://{web.host}/other/{unique}:1", dest_creds=ALICE,
                tls_verify=False,
            )  # fmt: skip
        with pytest.raises(SkopeoError):  # bob may pull acme_team/*, not push
            skopeo.copy(
                s.image.ref, f"docker://{web.host}/team/{unique}/bob:1", dest_creds=BOB,
                tls_verify=False,
            )  # fmt: skip
        s.elapsed = time.monotonic() - started
        s.flows = wait_for_flows(
            web.api, lambda flows: any(f"team/{unique}/bob" in f["comment"] for f in flows)
        )
        yield s
    finally:
        skopeo.cleanup()
        web.stop()
        if request.session.testsfailed > failed_before:
            print("----- mitmweb log (last 200 lines) -----")
            print("\n".join(web.log_text().splitlines()[-200:]))
        web.cleanup()


def test_rewritten_flows_carry_comments(scenario):
    s = scenario
    manifest_put = s.by_comment(f"{s.repo} → {s.upstream_repo} · manifests PUT 1.0")
    assert len(manifest_put) == 1, [f["comment"] for f in s.flows]
    # Once a flow has gone upstream it shows the client's request (what a person edits
    # and replays); the comment says what the registry saw.
    assert manifest_put[0]["request"]["path"] == f"/v2/{s.repo}/manifests/1.0"
    assert s.by_comment(f"{s.repo} → {s.upstream_repo} · manifests GET 1.0")
    assert s.by_comment(f"{s.repo} → {s.upstream_repo} · tags/list GET")
    assert s.by_comment(f"{s.repo} → {s.upstream_repo} · blobs/uploads POST")
    tokens = s.by_comment(
        f"token: 1 scope mapped · repository:{s.repo}:pull,push → "
        f"repository:{s.upstream_repo}:pull,push"
    )
    assert tokens and all(f["response"]["status_code"] == 200 for f in tokens)
    # The first 401 of the token dance is explained, but not marked.
    pings = [f for f in s.flows if f["request"]["path"] == "/v2/"]
    assert pings and all(f["comment"] == "auth: 401 challenge" for f in pings)
    assert not any(f["marked"] for f in pings + tokens + manifest_put)


def test_refused_flow_is_marked_and_keeps_the_client_path(scenario):
    s = scenario
    refused = s.by_comment(f"denied: no rule for other/{s.unique}")
    assert refused
    for f in refused:
        assert f["marked"] == "⛔"
        assert f["request"]["path"].startswith(f"/v2/other/{s.unique}/")
        assert f["response"]["status_code"] == 404


def test_failed_auth_is_marked_and_says_why(scenario):
    s = scenario
    bob = f"team/{s.unique}/bob"
    token = s.by_comment(f"repository:{bob}:pull,push → ")
    assert token and token[0]["comment"].endswith(f"· not granted: repository:{bob}:push")
    failed = s.by_comment(f"auth: 401 insufficient_scope for repository:{bob}:pull,push")
    assert failed, [f["comment"] for f in s.flows if bob in f["comment"]]
    assert all(f["marked"] == "🔒" for f in failed)
    assert failed[0]["comment"].startswith(f"{bob} → acme_team/{s.unique}/bob · blobs/uploads")


def test_marked_and_comment_filters_find_them(scenario):
    s = scenario
    api = s.web.api
    marked = {f["id"] for f in s.flows if f["marked"]}
    assert marked == api.matching("~marked")
    assert len(marked) >= 2
    denied = api.matching("~comment denied:")
    assert denied and denied <= marked
    assert api.matching(f'~comment "insufficient_scope for repository:team/{s.unique}/bob"')
    assert api.matching("~comment auth:") >= {
        f["id"] for f in s.flows if f["comment"].startswith("auth:")
    }


def test_token_response_view_shows_claims_of_the_real_token(scenario):
    s = scenario
    api = s.web.api
    flow = s.by_comment(f"repository:{s.repo}:pull,push → ")[0]
    raw = json.loads(api.content(flow["id"]))
    token = raw["token"]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    view = api.content_view(flow["id"])
    assert view["view_name"] == "Registry"
    text = view["text"]
    assert "issuer: test-token-issuer" in text
    assert "subject: alice" in text
    assert "audience: test-registry" in text
    assert f"jwt id: {claims['jti']}" in text
    assert f"- repository {s.upstream_repo}: pull, push  # client name {s.repo}" in text, text
    assert token not in text and token.split(".")[2] not in text and "eyJ" not in text
    # The token server issued exactly this (the view decodes what came back).
    assert claims["access"] == [
        {"type": "repository", "name": s.upstream_repo, "actions": ["pull", "push"]}
    ]


def test_views_of_bearer_requests_manifests_tags_and_auth_failures(scenario):
    s = scenario
    api = s.web.api
    put = s.by_comment(f"{s.repo} → {s.upstream_repo} · manifests PUT 1.0")[0]
    text = api.content_view(put["id"], "request")["text"]
    assert text.startswith("# OCI image manifest")
    assert "layers: 2," in text and s.image.config.digest in text
    assert all(layer.digest in text for layer in s.image.layers)
    assert "bearer token:" in text and f"repository {s.upstream_repo}: pull, push" in text

    # A GET with a bearer token and no body: the view shows the token's claims.
    get = s.by_comment(f"{s.repo} → {s.upstream_repo} · manifests GET 1.0")[0]
    assert dict(get["request"]["headers"])["Authorization"] == "Bearer <redacted>"
    view = api.content_view(get["id"], "request")
    assert view["view_name"] == "Registry" and "subject: alice" in view["text"]
    manifest = api.content_view(get["id"])
    assert manifest["view_name"] == "Registry"
    assert f"digest: {s.image.digest} (of this body)" in manifest["text"]

    tags = s.by_comment(f"{s.repo} → {s.upstream_repo} · tags/list GET")[0]
    text = api.content_view(tags["id"])["text"]
    assert f"repository: {s.repo} → {s.upstream_repo} (client → upstream)" in text
    assert "tags: 1\n  - 1.0" in text

    bob = f"team/{s.unique}/bob"
    failed = s.by_comment(f"auth: 401 insufficient_scope for repository:{bob}:pull,push")[0]
    text = api.content_view(failed["id"])["text"]
    assert "# registry error (401)" in text
    assert f"detail: repository {bob}: " in text  # what was denied, in the client's names
    assert "  error: insufficient_scope\n" in text
    # (skopeo may also ask to mount from the first repository: its scope then follows)
    assert f"  scope: repository:{bob}:" in text
    assert "subject: bob" in text
    assert f"- repository acme_team/{s.unique}/bob: pull  # client name {bob}" in text


def test_nothing_secret_in_the_flow_list_or_any_view(scenario):
    s = scenario
    api = s.web.api
    listing = json.dumps(api.flows())
    for secret in (ALICE[1], BOB[1], BASIC_ALICE, BASIC_BOB, "eyJ"):
        assert secret not in listing
    for f in s.flows:
        for message in ("request", "response"):
            if message in f:
                text = api.content_view(f["id"], message)["text"]
                for secret in (ALICE[1], BOB[1], BASIC_ALICE, BASIC_BOB, "eyJ"):
                    assert secret not in text, (f["comment"], message)


def test_flows_can_be_saved(scenario):
    """mitmweb's File > Save (GET /flows/dump) writes every flow, comments and marks
    included (flow files take only plain values, and the addon keeps only those)."""
    import io

    from mitmproxy import io as flowio

    data = scenario.web.api.content_dump()
    saved = {f.id: f for f in flowio.FlowReader(io.BytesIO(data)).stream()}
    assert set(saved) == {f["id"] for f in scenario.flows}
    for f in scenario.flows:
        assert saved[f["id"]].comment == f["comment"]
        assert bool(saved[f["id"]].marked) == bool(f["marked"])
    for secret in (ALICE[1], BOB[1], BASIC_ALICE, BASIC_BOB, "Bearer eyJ"):
        assert secret.encode() not in data


def test_registry_rules_command_from_the_command_bar(scenario, token_server):
    s = scenario
    text = s.web.api.command("registry.rules")
    assert f"rules file: {s.web.rules_file} (2 rules)" in text
    assert "unmatched: deny" in text and "token_path: /auth" in text
    assert f"upstream realm: {token_server.realm} (learned from the upstream's challenge)" in text
    assert "upstream service: test-registry (learned" in text
    assert "1. team/{r:path} → acme_team/{r:path}" in text


def test_mitmweb_lists_the_view(scenario):
    assert "registry" in scenario.web.api.state()["contentViews"]


def test_mitmdump_flow_detail_4_logs_no_secret(
    registry, token_server, proxy, skopeo, make_image, http_client, unique
):
    """The most verbose mitmdump log of a push, a pull and OAuth2 password and refresh
    grants shows the registry view, and no token, refresh token, password or Basic
    credential."""
    p = proxy(RULES, extra_args=["--set", "flow_detail=4", "--set", "termlog_verbosity=debug"])
    image = make_image(layers=2, layer_size=8000)
    dest = f"docker://{p.host}/team/{unique}/s:1"
    skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
    skopeo.copy(dest, f"oci:{image.layout.parent / 'pulled'}:x", src_creds=ALICE, tls_verify=False)

    client = http_client(p.url)
    form = {
        "grant_type": "password",
        "username": ALICE[0],
        "password": ALICE[1],
        "service": "test-registry",
        "client_id": "e2e",
        "access_type": "offline",
        "scope": f"repository:team/{unique}/s:pull",
    }
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    r = client.raw("POST", f"{p.url}/auth", headers, urllib.parse.urlencode(form).encode())
    assert r.status == 200, r.body
    refresh, access = r.json()["refresh_token"], r.json()["access_token"]
    form = {"grant_type": "refresh_token", "refresh_token": refresh, "service": "test-registry"}
    r = client.raw("POST", f"{p.url}/auth", headers, urllib.parse.urlencode(form).encode())
    assert r.status == 200, r.body
    # A request with the token, straight to the registry API through the proxy.
    # mitmdump prints the request as the client sent it (the comment has the mapping).
    line = f"GET {registry.url}/v2/team/{unique}/s/manifests/1"
    seen = p.log_text().count(line)
    r = client.raw(
        "GET",
        f"{p.url}/v2/team/{unique}/s/manifests/1",
        {"Authorization": f"Bearer {access}", "Accept": image.manifest.media_type},
    )
    assert r.status == 200

    deadline = time.monotonic() + 10
    while p.log_text().count(line) <= seen:  # the dumper prints once the flow is done
        assert time.monotonic() < deadline, p.log_text()[-3000:]
        time.sleep(0.1)
    log = p.log_text()
    # The view is what mitmdump printed, unasked: claims, manifests, the token form.
    assert "# registry token: claims decoded" in log
    assert f"- repository acme_team/{unique}/s: pull, push  # client name team/{unique}/s" in log
    assert "# OCI image manifest" in log and "bearer token:" in log
    assert "grant_type: password" in log and "password: <withheld>" in log
    for secret in (ALICE[1], BASIC_ALICE, refresh, access, "eyJ"):
        assert secret not in log, [line for line in log.splitlines() if secret in line][:3]


# --- replay (issue 12): these run last in the module, they add flows -------------------


def _replay(s: Scenario, flow_id: str) -> dict:
    s.web.api._request("POST", f"/flows/{flow_id}/replay")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (flow,) = [f for f in s.web.api.flows() if f["id"] == flow_id]
        if flow.get("is_replay") == "request" and ("response" in flow or "error" in flow):
            if flow["comment"].startswith("replay"):
                return flow
        time.sleep(0.2)
    raise AssertionError(f"replay of {flow_id} did not finish")


def test_replay_in_process_maps_once_and_keeps_credentials_hidden(scenario, registry):
    s = scenario
    (pull,) = s.by_comment(f"{s.repo} → {s.upstream_repo} · manifests GET 1.0")[:1]
    assert pull["request"]["path"] == f"/v2/{s.repo}/manifests/1.0"
    registry.mark()
    replayed = _replay(s, pull["id"])
    # The credentials of the first pass were kept in memory, never in the flow.
    assert replayed["response"]["status_code"] == 200, replayed["comment"]
    assert replayed["comment"].startswith(
        f"replay · {s.repo} → {s.upstream_repo} · manifests GET 1.0"
    )
    gets = [e.path for e in registry.access_log(since_mark=True) if e.method == "GET"]
    assert f"/v2/{s.upstream_repo}/manifests/1.0" in gets
    assert not any("acme_acme_" in p or "/v2/team/" in p for p in gets), gets
    flows_json = json.dumps(s.web.api.flows())
    dump = s.web.api.content_dump()
    for secret in (ALICE[1], BASIC_ALICE):
        assert secret not in flows_json and secret.encode() not in dump
    assert b"Bearer ey" not in dump and "Bearer ey" not in flows_json


def test_edit_and_replay_is_edited_in_client_names(scenario, registry):
    s = scenario
    (pull,) = s.by_comment(f"{s.repo} → {s.upstream_repo} · manifests GET 1.0")[:1]
    # A person edits the manifest GET into a tags/list of the same client repository...
    s.web.api._request(
        "PUT", f"/flows/{pull['id']}", {"request": {"path": f"/v2/{s.repo}/tags/list"}}
    )
    registry.mark()
    replayed = _replay(s, pull["id"])
    assert replayed["response"]["status_code"] == 200, replayed["comment"]
    assert f"{s.repo} → {s.upstream_repo} · tags/list GET" in replayed["comment"]
    seen = [e.path for e in registry.access_log(since_mark=True) if e.method == "GET"]
    assert f"/v2/{s.upstream_repo}/tags/list" in seen, seen
    body = json.loads(s.web.api.content(pull["id"]))
    assert body["name"] == s.repo  # the answer in client names, too
