"""skopeo through mitmdump + the addon against the token-auth registry (issue 2's bar).

Clients use `team/...` and `{name}`; the registry holds `acme_team/...` and
`library/{name}`. Every test checks what reached the registry and the token server,
not just skopeo's exit code.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.images import fetch_manifest
from tests.e2e.proxycheck import RULES
from tests.e2e.upstream import ALICE, SkopeoError


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
def test_push_pull_inspect_tags_through_proxy(
    registry, token_server, proxy, skopeo, make_image, http_client, unique, tls
):
    p = proxy(RULES, tls=tls)
    repo = f"team/{unique}/tools/cli"
    image = make_image(layers=3, layer_size=20_000)
    registry.mark()
    token_server.clear_requests()

    dest = f"docker://{p.host}/{repo}"
    skopeo.copy(image.ref, f"{dest}:1.0", dest_creds=ALICE, tls_verify=tls)
    skopeo.copy(image.ref, f"{dest}:1.1", dest_creds=ALICE, tls_verify=tls)

    info = skopeo.inspect(f"{dest}:1.0", creds=ALICE, tls_verify=tls)
    assert info["Name"] == f"{p.host}/{repo}"
    assert info["Digest"] == image.digest
    assert sorted(skopeo.list_tags(dest, creds=ALICE, tls_verify=tls)) == ["1.0", "1.1"]

    # The upstream holds it under the mapped name, with the digest skopeo pushed.
    direct = http_client(registry.url, ALICE)
    assert fetch_manifest(direct, f"acme_team/{unique}/tools/cli", "1.0").digest == image.digest
    seen = registry.repositories_seen(since_mark=True)
    assert seen == {f"acme_team/{unique}/tools/cli"}, seen
    # Tokens were asked for mapped names only, and granted.
    scopes = token_server.requested_scopes()
    assert f"repository:acme_team/{unique}/tools/cli:pull,push" in scopes
    assert not [s for s in scopes if ":team/" in s], scopes
    assert any(r.granted for r in token_server.requests())

    # Pull back through the proxy into a fresh layout: same manifest digest.
    out = image.layout.parent / f"pulled-{tls}"
    skopeo.copy(f"{dest}:1.1", f"oci:{out}:x", src_creds=ALICE, tls_verify=tls)
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest


def test_cross_repo_mount_through_proxy(registry, token_server, proxy, skopeo, make_image, unique):
    p = proxy(RULES)
    first, second = f"team/{unique}/base", f"team/{unique}/derived"
    image = make_image(layers=2, layer_size=50_000)
    skopeo.copy(image.ref, f"docker://{p.host}/{first}:v1", dest_creds=ALICE, tls_verify=False)
    registry.mark()
    token_server.clear_requests()

    skopeo.copy(image.ref, f"docker://{p.host}/{second}:v1", dest_creds=ALICE, tls_verify=False)

    entries = registry.access_log(since_mark=True)
    mounts = [
        e
        for e in entries
        if e.method == "POST"
        and e.path == f"/v2/acme_team/{unique}/derived/blobs/uploads/"
        and "mount" in e.query
    ]
    # The upstream saw `from` as its own name and linked the layers (201), no upload.
    assert sorted(m.query["mount"][0] for m in mounts) == sorted(x.digest for x in image.layers)
    assert all(m.query["from"] == [f"acme_team/{unique}/base"] for m in mounts)
    assert all(m.status == 201 for m in mounts), mounts
    patches = [e for e in entries if e.method == "PATCH"]
    assert len(patches) <= 1, patches  # at most the config blob goes up again
    scopes = token_server.requested_scopes()
    assert f"repository:acme_team/{unique}/derived:pull,push" in scopes
    assert f"repository:acme_team/{unique}/base:pull" in scopes


def test_multi_arch_index_through_proxy(registry, proxy, skopeo, make_index, http_client, unique):
    p = proxy(RULES)
    index = make_index()
    ref = f"docker://{p.host}/team/{unique}/multi:1"
    skopeo.copy(index.ref, ref, dest_creds=ALICE, tls_verify=False, all_images=True)
    assert skopeo.inspect(ref, creds=ALICE, tls_verify=False, raw=True) == index.index_bytes
    direct = http_client(registry.url, ALICE)
    assert fetch_manifest(direct, f"acme_team/{unique}/multi", "1").digest == index.digest
    out = index.layout.parent / "pulled-index"
    skopeo.copy(ref, f"oci:{out}:x", src_creds=ALICE, tls_verify=False, all_images=True)
    pulled = json.loads((out / "index.json").read_text())
    assert pulled["manifests"][0]["digest"] == index.digest


def test_single_name_rule_maps_to_library(registry, proxy, skopeo, make_image, unique):
    p = proxy(RULES)
    image = make_image(layers=1)
    name = f"tool{unique}"
    registry.mark()
    skopeo.copy(image.ref, f"docker://{p.host}/{name}:1", dest_creds=ALICE, tls_verify=False)
    assert registry.repositories_seen(since_mark=True) == {f"library/{name}"}
    assert skopeo.list_tags(f"docker://{p.host}/{name}", creds=ALICE, tls_verify=False) == ["1"]


def test_delete_through_proxy(registry, proxy, skopeo, make_image, unique):
    p = proxy(RULES)
    image = make_image(layers=1)
    ref = f"docker://{p.host}/team/{unique}/gone:1"
    skopeo.copy(image.ref, ref, dest_creds=ALICE, tls_verify=False)
    registry.mark()
    skopeo.delete(ref, creds=ALICE, tls_verify=False)
    deletes = [e for e in registry.access_log(since_mark=True) if e.method == "DELETE"]
    assert [(e.path, e.status) for e in deletes] == [
        (f"/v2/acme_team/{unique}/gone/manifests/{image.digest}", 202)
    ]
    with pytest.raises(SkopeoError):
        skopeo.inspect(ref, creds=ALICE, tls_verify=False)


def test_unmatched_name_is_refused_and_never_reaches_upstream(
    registry, token_server, proxy, skopeo, make_image, unique
):
    p = proxy(RULES)
    image = make_image(layers=1)
    registry.mark()
    token_server.clear_requests()
    with pytest.raises(SkopeoError) as err:
        skopeo.copy(
            image.ref, f"docker://{p.host}/other/{unique}:1", dest_creds=ALICE, tls_verify=False
        )
    assert "name unknown" in err.value.stderr.lower() or "not known" in err.value.stderr.lower()
    assert not [u for _, u in registry.requests(since_mark=True) if unique in u]
    assert not [s for s in token_server.requested_scopes() if unique in s]


def test_challenge_sends_clients_to_the_proxy(proxy, http_client, ca, unique):
    for tls in (False, True):
        p = proxy(RULES, tls=tls)
        client = http_client(p.url)
        r = client.raw("GET", f"{p.url}/v2/")
        assert r.status == 401
        challenge = r.header("WWW-Authenticate")
        assert f'realm="{p.url}/auth"' in challenge, challenge
        assert 'service="test-registry"' in challenge
        r = client.raw("GET", f"{p.url}/v2/team/{unique}/app/manifests/latest")
        challenge = r.header("WWW-Authenticate")
        assert f'scope="repository:team/{unique}/app:pull"' in challenge, challenge
        body = r.json()
        assert "acme_team" not in json.dumps(body)


def test_token_before_ping_after_restart(proxy, http_client, token_server, unique):
    """A fresh proxy that never saw a challenge still serves tokens (asks the upstream)."""
    p = proxy(RULES)
    token_server.clear_requests()
    client = http_client(p.url, ALICE)
    r = client.raw(
        "GET",
        f"{p.url}/auth?service=test-registry&scope=repository:team/{unique}/a:pull",
        headers={"Authorization": "Basic YWxpY2U6YWxpY2Utc2VjcmV0"},
    )
    assert r.status == 200, r.body
    assert r.json()["token"]
    assert token_server.requested_scopes() == [f"repository:acme_team/{unique}/a:pull"]


def test_token_service_down_gives_registry_error(ca, registry, proxy, http_client):
    """A realm that refuses connections: 502 with a registry-style JSON error."""
    rules = RULES.replace(
        "token_path: /auth", "upstream:\n  realm: https://127.0.0.1:9/auth\ntoken_path: /auth"
    )
    p = proxy(rules)
    r = http_client(p.url).raw("GET", f"{p.url}/auth?scope=repository:team/x:pull")
    assert r.status == 502
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_rules_reload_without_restart(
    registry, proxy, skopeo, make_image, http_client, unique, tmp_path
):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    p = proxy(rules_file=rules_file)
    image = make_image(layers=1)
    skopeo.copy(
        image.ref, f"docker://{p.host}/team/{unique}/r:1", dest_creds=ALICE, tls_verify=False
    )

    # An invalid edit is reported and the old rules stay.
    rules_file.write_text(RULES + "  - client: '{bad'\n    upstream: x\n")
    deadline = time.monotonic() + 15
    while "previous rules stay in force" not in p.log_text():
        assert time.monotonic() < deadline, p.log_text()
        time.sleep(0.2)
    assert "rule 3" in p.log_text()
    assert skopeo.list_tags(
        f"docker://{p.host}/team/{unique}/r", creds=ALICE, tls_verify=False
    ) == ["1"]

    # A valid edit takes effect: `alias/...` now also reaches acme_team/...
    rules_file.write_text(
        RULES.replace(
            '  - client: "{name}"',
            '  - client: "alias/{r:path}"\n'
            '    upstream: "library/aliased/{r:path}"\n'
            '  - client: "{name}"',
        )
    )
    deadline = time.monotonic() + 15
    while "reloaded 3 rules" not in p.log_text():
        assert time.monotonic() < deadline, p.log_text()
        time.sleep(0.2)
    registry.mark()
    skopeo.copy(
        image.ref, f"docker://{p.host}/alias/{unique}:1", dest_creds=ALICE, tls_verify=False
    )
    puts = [u for m, u in registry.requests(since_mark=True) if m == "PUT" and "/manifests/" in u]
    assert puts == [f"/v2/library/aliased/{unique}/manifests/1"]


def test_bad_rules_file_stops_startup(ca, registry, tmp_path):
    import subprocess

    from tests.e2e.upstream import Mitmdump

    bad = tmp_path / "bad-rules.yaml"
    bad.write_text('rules:\n  - client: "{ns}/x"\n    upstream: "acme/x"\n')
    m = Mitmdump(registry.url, ca, rules_file=bad)
    m.port = 1  # never bound: mitmdump must stop before serving
    proc = subprocess.run(m.command(), capture_output=True, text=True, timeout=60)
    m.cleanup()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "bad-rules.yaml:2: rule 1 ({ns}/x -> acme/x): client and upstream" in out, out
    assert "different placeholders (only in client: ns)" in out
    assert "Traceback" not in out


def test_secrets_never_reach_the_log(registry, proxy, skopeo, make_image, unique):
    # flow_detail=2 prints every header; bodies (flow_detail>=3) are the content view's job.
    p = proxy(RULES, extra_args=["--set", "flow_detail=2", "--set", "termlog_verbosity=debug"])
    image = make_image(layers=1)
    skopeo.copy(
        image.ref, f"docker://{p.host}/team/{unique}/s:1", dest_creds=ALICE, tls_verify=False
    )
    skopeo.inspect(f"docker://{p.host}/team/{unique}/s:1", creds=ALICE, tls_verify=False)
    log = p.log_text()
    assert "registry:" in log  # the addon did log
    import base64

    basic = base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()
    for secret in (ALICE[1], basic):
        assert secret not in log
    assert "Bearer ey" not in log, [x for x in log.splitlines() if "Bearer ey" in x][:3]
    assert '"token": "ey' not in log and '"token":"ey' not in log
