"""What a new user does with only README.md and the shipped rules.yaml (issue 15).

Every command and file here is read from README.md as it stands, so the README cannot
drift from what works: the quick-start command (only the upstream URL swapped for the
test registry and the port for a free one), the mitmweb API curl lines, and both forms
of containerd's hosts.toml (only host names and the CA path swapped).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from regrewrite.rules import load_rules
from tests.e2e.conftest import require_tool
from tests.e2e.images import fetch_manifest
from tests.e2e.mitmweb import Mitmweb
from tests.e2e.proxycheck import (
    RULES,
    TRANSPORT_PROBE,
    assert_only_upstream_names,
    client_transports,
    push_image_raw,
)
from tests.e2e.upstream import ALICE, BOB, REPO_ROOT, SkopeoError, _Service, free_port

README = REPO_ROOT / "README.md"
EXAMPLE_HOST = "registry.example.com"  # the proxy's name in the README's examples
EXAMPLE_CA = f"/etc/containerd/certs.d/{EXAMPLE_HOST}/ca.crt"


def readme_section(heading: str) -> str:
    """The text under the README heading that starts with `heading` (to the next one)."""
    text = README.read_text()
    m = re.search(rf"^(#+) {re.escape(heading)}.*?$", text, re.M)
    assert m, f"README.md has no heading {heading!r}"
    end = re.compile(rf"^#{{1,{len(m.group(1))}}} ", re.M).search(text, m.end())
    return text[m.end() : end.start() if end else len(text)]


def readme_blocks(heading: str, lang: str) -> list[str]:
    """The fenced `lang` blocks of a README section, dedented (list items indent them)."""
    pattern = re.compile(rf"^([ \t]*)```{lang}\n(.*?)^\1```", re.M | re.S)
    return [textwrap.dedent(m.group(2)) for m in pattern.finditer(readme_section(heading))]


def readme_block(heading: str, lang: str, containing: str) -> str:
    found = [b for b in readme_blocks(heading, lang) if containing in b]
    assert len(found) == 1, f"README {heading!r}: {len(found)} {lang} blocks with {containing!r}"
    return found[0]


# --------------------------------------------------------------------------------------
# The quick start: the shipped rules.yaml, the README's command, any upstream
# --------------------------------------------------------------------------------------


def test_shipped_rules_pin_nothing_and_their_pinning_example_loads(tmp_path):
    shipped = (REPO_ROOT / "rules.yaml").read_text()
    rules = load_rules(REPO_ROOT / "rules.yaml")
    assert (rules.realm, rules.service) == (None, None)
    assert rules.upstream_name("team/app") == "acme_team/app"
    # Uncommented, the example block must be a valid pin.
    example = re.search(r"^# upstream:\n(?:#   .*\n)+", shipped, re.M)
    assert example, "rules.yaml lost its commented upstream: example"
    pinned = tmp_path / "rules.yaml"
    pinned.write_text(
        shipped.replace(example.group(0), re.sub(r"^# ?", "", example.group(0), flags=re.M))
    )
    rules = load_rules(pinned)
    assert rules.realm == "https://dockerauth.cn-hangzhou.aliyuncs.com/auth"
    assert rules.service == "registry.aliyuncs.com:cn-shenzhen:26842"


class QuickStartProxy(_Service):
    """The README's quick-start command, run in a directory laid out like a fresh clone
    (the shipped rules.yaml copied unchanged, addon/, .venv)."""

    def __init__(self, workdir: Path, upstream_url: str, ca):
        self.dir = workdir
        self.log_path = workdir / "mitmdump.log"
        self.port = free_port()
        self.proc = None
        block = readme_block("Quick start", "sh", " --mode reverse:").strip()
        setup, _, command = block.partition(" && ")
        assert setup == "bash .ci/setup", block  # done already: the tests run in its .venv
        argv = shlex.split(command)
        mode = argv.index("--mode") + 1
        assert argv[mode].startswith("reverse:https://"), argv
        argv[mode] = f"reverse:{upstream_url}"
        argv[argv.index("--listen-port") + 1] = str(self.port)  # 5000 may be taken here
        # What a registry with a public certificate would not need: the test CA, and a
        # confdir of our own (not ~/.mitmproxy).
        argv += ["--set", f"ssl_verify_upstream_trusted_ca={ca.ca_pem}"]
        argv += ["--set", f"confdir={workdir / 'confdir'}"]
        self.argv = argv
        shutil.copy(REPO_ROOT / "rules.yaml", workdir / "rules.yaml")
        shutil.copytree(
            REPO_ROOT / "addon", workdir / "addon", ignore=shutil.ignore_patterns("__pycache__")
        )
        (workdir / ".venv").symlink_to(REPO_ROOT / ".venv")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> QuickStartProxy:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._launch(self.argv, env, 30.0, cwd=self.dir)
        return self


@pytest.fixture(scope="module")
def quick_start(request, ca, registry, tmp_path_factory):
    p = QuickStartProxy(tmp_path_factory.mktemp("fresh-clone"), registry.url, ca)
    failed_before = request.session.testsfailed
    p.start()
    yield p
    p.stop()
    if request.session.testsfailed > failed_before:
        print("----- quick-start mitmdump log -----")
        print("\n".join(p.log_text().splitlines()[-200:]))


def test_readme_command_with_shipped_rules_pushes_and_pulls(
    quick_start, registry, skopeo, make_image, unique, tmp_path
):
    assert quick_start.argv[0] == ".venv/bin/registry-rewrite"
    image = make_image(layers=2, layer_size=20_000)
    ref = f"docker://{quick_start.host}/team/app:{unique}"
    registry.mark()
    skopeo.copy(image.ref, ref, dest_creds=ALICE, tls_verify=False)
    skopeo.copy(ref, f"oci:{tmp_path / 'pulled'}:x", src_creds=ALICE, tls_verify=False)
    pulled = json.loads((tmp_path / "pulled" / "index.json").read_text())
    assert [m["digest"] for m in pulled["manifests"]] == [image.digest]
    # The shipped rule: team/app <-> acme_team/app, and nothing else reached the registry.
    assert_only_upstream_names(registry.access_log(since_mark=True), "acme_team/app")
    log = quick_start.log_text()
    # The token service was learned from the registry, not taken from the file.
    assert "upstream default token realm is https://127.0.0.1:" in log, log
    assert "rules configure" not in log and "unreachable" not in log, log


def test_readme_command_stops_on_a_bad_rules_file_before_listening(ca, registry, tmp_path):
    p = QuickStartProxy(tmp_path, registry.url, ca)
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules.read_text().replace('upstream: "acme_', 'upstream: "{ns}_', 1))
    proc = subprocess.run(
        p.argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(r"rules\.yaml:\d+: rule 1 ", out), out  # file, line, rule, problem
    assert "listening at" not in out, out


def test_mitmdump_log_tells_a_denial_from_an_upstream_404(
    quick_start, registry, http_client, unique
):
    client = http_client(f"http://{quick_start.host}", ALICE)
    denied = client.request("GET", f"/v2/solo{unique}/manifests/1.0")  # one component: no rule
    upstream = client.request("GET", f"/v2/team/none{unique}/manifests/1.0")
    assert denied.status == upstream.status == 404
    line = (
        f"registry: denied GET /v2/solo{unique}/manifests/1.0 -> 404 NAME_UNKNOWN: "
        f"no rule for solo{unique}"
    )
    deadline = time.monotonic() + 10
    while line not in quick_start.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = quick_start.log_text()
    assert line in log, log
    # The upstream's 404 prints as mitmdump's usual flow line only (which it shortens).
    assert f"GET {registry.url}/v2/team/none{unique}/manif" in log, log
    decided = [x for x in log.splitlines() if "registry: " in x and f"/v2/team/none{unique}" in x]
    assert not decided, decided
    assert ALICE[1] not in log


def test_mitmdump_log_shows_a_failed_authorisation_but_not_the_first_challenge(
    quick_start, http_client, unique
):
    # bob may pull acme_team/*, not push: the registry refuses the upload with his token.
    client = http_client(f"http://{quick_start.host}", BOB)
    path = f"/v2/team/bob{unique}/blobs/uploads/"
    r = client.request("POST", path, scopes=[f"repository:team/bob{unique}:pull,push"])
    assert r.status == 401, r
    assert [x.status for x in client.history] == [401, 200, 401]  # challenge, token, refusal
    line = f"registry: mapped POST {path} -> 401: team/bob{unique} → acme_team/bob{unique}"
    deadline = time.monotonic() + 10
    while line not in quick_start.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [x for x in quick_start.log_text().splitlines() if f"POST {path}" in x]
    decided = [x[x.index("registry: ") :] for x in lines if "registry: " in x]
    # One line: the refused Bearer request, with why; the anonymous first 401 has none.
    assert len(decided) == 1 and decided[0].startswith(line), lines
    assert "insufficient_scope" in decided[0], decided
    assert BOB[1] not in quick_start.log_text()


# --------------------------------------------------------------------------------------
# mitmweb's HTTP API, with the README's curl lines
# --------------------------------------------------------------------------------------


def _json_documents(text: str) -> list:
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
    return docs


def test_readme_curl_lines_read_flows_views_and_run_commands(
    request, ca, registry, http_client, unique
):
    curl = require_tool("curl")
    block = readme_block("Without a browser", "sh", "curl")
    first, rest = block.split("\n", 1)
    assert first == "WEB=http://127.0.0.1:8081 TOKEN=the-web-password", first
    web = Mitmweb(registry.url, ca, RULES).start()
    try:
        client = http_client(web.url, ALICE)
        assert client.request("GET", f"/v2/team/none{unique}/manifests/1").status == 404
        deadline = time.monotonic() + 30
        while True:
            flows = web.api.flows()
            if flows and flows[-1]["request"]["path"].endswith("/manifests/1"):
                if all("response" in f or "error" in f for f in flows):
                    break
            assert time.monotonic() < deadline, flows
            time.sleep(0.2)
        script = f"WEB={web.web_url} TOKEN={shlex.quote(web.password)}\n{rest}"
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PATH=f"{Path(curl).parent}:{os.environ['PATH']}"),
        )
        assert proc.returncode == 0, proc.stderr
        by_bearer, by_query, view, command, explain = _json_documents(proc.stdout)
        assert (
            [f["id"] for f in by_bearer] == [f["id"] for f in by_query] == [f["id"] for f in flows]
        )
        assert by_bearer[-1]["comment"].startswith(f"team/none{unique} → acme_team/none{unique}")
        assert view["view_name"] == "Registry", view
        assert "MANIFEST_UNKNOWN" in view["text"], view
        assert "error" not in command, command
        assert "acme_team/{r:path}" in command["value"], command
        assert "team/app → acme_team/app" in explain.get("value", ""), explain
    finally:
        web.stop()
        if request.session.testsfailed:
            print("\n".join(web.log_text().splitlines()[-100:]))
        web.cleanup()


# --------------------------------------------------------------------------------------
# containerd's hosts.toml, both forms, as the README has them
# --------------------------------------------------------------------------------------


def _hosts_toml(containing: str, proxy_host: str, ca_pem: Path) -> str:
    toml = readme_block("Pointing clients at it", "toml", containing)
    assert EXAMPLE_CA in toml, toml
    return toml.replace(EXAMPLE_CA, str(ca_pem)).replace(EXAMPLE_HOST, proxy_host)


def test_readme_hosts_toml_server_form_with_ca(
    containerd, registry, proxy, ca, http_client, make_image, unique
):
    p = proxy(RULES, tls=True)
    path = containerd.hosts_dir / p.host / "hosts.toml"
    path.parent.mkdir(parents=True)
    path.write_text(_hosts_toml(f'server = "https://{EXAMPLE_HOST}"', p.host, ca.ca_pem))
    up_repo, repo = f"acme_team/ctr-{unique}", f"team/ctr-{unique}"
    image = make_image(layers=1, layer_size=20_000)
    push_image_raw(http_client(registry.url, ALICE), up_repo, image, "v1")
    user = ":".join(ALICE)

    registry.mark()
    containerd.pull(f"{p.host}/{repo}:v1", user=user)
    assert containerd.image_digest(f"{p.host}/{repo}:v1") == image.digest
    containerd.tag(f"{p.host}/{repo}:v1", f"{p.host}/{repo}:v2")
    containerd.push(f"{p.host}/{repo}:v2", user=user)  # the file grants push
    assert_only_upstream_names(registry.access_log(since_mark=True), up_repo)
    assert fetch_manifest(http_client(registry.url, ALICE), up_repo, "v2").digest == image.digest


def test_readme_hosts_toml_mirror_form_with_ca(
    containerd, registry, proxy, ca, skopeo, make_image, unique
):
    # The test registry stands in for Docker Hub: an upstream that mirrors docker.io,
    # pulled from anonymously (the registry lets anyone pull acme_team/public*).
    rules = f"""
unmatched: deny
rules:
  - client: "team/{{r:path}}"
    upstream: "acme_team/{{r:path}}"
upstreams:
  hub:
    url: {registry.url}
    mirror_of: docker.io
    rules:
      - client: "hub/{{r:path}}"
        upstream: "acme_team/{{r:path}}"
"""
    p = proxy(rules, tls=True, extra_args=TRANSPORT_PROBE)
    path = containerd.hosts_dir / "docker.io" / "hosts.toml"
    path.parent.mkdir(parents=True)
    toml = _hosts_toml('server = "https://registry-1.docker.io"', p.host, ca.ca_pem)
    path.write_text(toml)
    name = f"acme_team/public-mirror-{unique}"
    image = make_image(layers=1, layer_size=20_000)
    skopeo.copy(image.ref, f"docker://{registry.host}/{name}:1", dest_creds=ALICE)

    registry.mark()
    containerd.pull(f"docker.io/{name}:1")
    assert containerd.image_digest(f"docker.io/{name}:1") == image.digest
    # It came through the proxy under the mirrored registry's own names, which only the
    # mirror hint (?ns=docker.io) routes: no rule has acme_team/... as a client name.
    seen = client_transports(p)
    assert ("https", "HEAD", f"/v2/{name}/manifests/1") in seen, seen
    assert name in registry.repositories_seen(since_mark=True)


# --------------------------------------------------------------------------------------
# Robot accounts: the proxy's own credentials give anyone pull, and push only by rule
# --------------------------------------------------------------------------------------

ROBOT_PASSWORD_ENV = "E2E_ROBOT_PASSWORD"


def test_anonymous_client_cannot_push_through_a_robot_account(
    proxy, registry, token_server, skopeo, make_image, unique, http_client, monkeypatch
):
    # alice may push library/* and acme_team/*: the robot account could push both.
    monkeypatch.setenv(ROBOT_PASSWORD_ENV, ALICE[1])
    p = proxy(
        f"""
unmatched: deny
rules:
  - client: "team/{{r:path}}"
    upstream: "acme_team/{{r:path}}"
upstreams:
  robot:
    url: {registry.url}
    credentials:
      username: {ALICE[0]}
      password_env: {ROBOT_PASSWORD_ENV}
    rules:
      - client: "robot/{{r:path}}"            # no actions: pull only, by default
        upstream: "library/{{r:path}}"
      - client: "robotrw/{{r:path}}"
        upstream: "acme_team/robotrw/{{r:path}}"
        actions: [pull, push]
"""
    )
    image = make_image(layers=1, layer_size=10_000)
    direct = http_client(registry.url, ALICE)
    push_image_raw(direct, f"library/robot-{unique}", image, "1")

    # Anyone pulls through the robot account.
    pulled = skopeo.inspect(f"docker://{p.host}/robot/robot-{unique}:1", anonymous=True,
                            tls_verify=False, raw=True)  # fmt: skip
    assert pulled == image.manifest_bytes

    # Nobody pushes through it where no rule grants push: refused, nothing upstream.
    token_server.clear_requests()
    with pytest.raises(SkopeoError):
        skopeo.copy(image.ref, f"docker://{p.host}/robot/robot-{unique}:2",
                    dest_anonymous=True, tls_verify=False)  # fmt: skip
    assert direct.request("GET", f"/v2/library/robot-{unique}/manifests/2").status == 404
    asked = [s for r in token_server.requests() for s in r.scopes]
    assert not [s for s in asked if "push" in s or "delete" in s or "*" in s], asked
    # (skopeo finds the blobs there already and goes straight to the manifest PUT)
    refused = rf"registry: denied (POST|PUT) /v2/robot/robot-{unique}/\S+ -> 403 DENIED"
    assert re.search(refused, p.log_text()), p.log_text()[-3000:]

    # A rule that grants push lets anyone push, with the robot's rights.
    skopeo.copy(image.ref, f"docker://{p.host}/robotrw/app-{unique}:1",
                dest_anonymous=True, tls_verify=False)  # fmt: skip
    up = f"acme_team/robotrw/app-{unique}"
    assert fetch_manifest(direct, up, "1").digest == image.digest
