"""Operating it (issue 13 items 1-5), for real: the installed `registry-rewrite` command,
/livez and /readyz, Prometheus metrics and the JSON access log after real skopeo pulls,
and the realm advertised behind a trusted (and an untrusted) load balancer.

Clients say `team/...`; the registry holds `acme_team/...` (proxycheck.RULES).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.images import fetch_manifest
from tests.e2e.proxycheck import RULES, push_image_raw
from tests.e2e.regclient import parse_challenge
from tests.e2e.upstream import ALICE, LOOPBACK, REPO_ROOT, Mitmdump, free_port

METRIC_NAMES = {
    "registry_rewrite_requests_total",
    "registry_rewrite_denied_total",
    "registry_rewrite_token_requests_total",
    "registry_rewrite_upstream_seconds_bucket",
    "registry_rewrite_bytes_total",
    "registry_rewrite_rules_reloads_total",
    "registry_rewrite_rules",
}
LOG_FIELDS = {
    "ts", "client", "user", "method", "endpoint", "client_name", "upstream_name",
    "upstream", "status", "bytes", "duration_ms", "decision",
}  # fmt: skip


# --- 1. the installed command ------------------------------------------------------------


class InstalledProxy(Mitmdump):
    """Mitmdump started through an installed `registry-rewrite` command instead of
    `mitmdump -s addon/registry_rewrite.py`."""

    def __init__(self, command: Path, *args, **kwargs):
        super().__init__(*args, addon=None, **kwargs)
        self.installed = command
        self.extra_args += ["--set", f"registry_rules={self.rules_file}"]

    def command(self) -> list[str]:
        return [str(self.installed), *super().command()[1:]]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this checkout installed into a fresh venv; its dependencies come from
    the project's venv through a .pth line (no index needed for them, and the checkout's
    own editable install is not picked up: that .pth path is not a site directory)."""
    work = tmp_path_factory.mktemp("installed")
    # From a copy of the sources: setuptools builds in the tree, and a build/ left by an
    # earlier build would slip files into the wheel that pyproject.toml does not list.
    source = work / "source"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "tests", "bench"
        ),
    )
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("registry_rewrite-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = sysconfig.get_path("purelib")  # the project venv's site-packages
    (Path(site) / "project-deps.pth").write_text(f"{deps}\n")
    return venv / "bin" / "registry-rewrite"


def test_installed_command_version_and_a_real_pull(
    installed, ca, registry, http_client, make_image, unique, tmp_path
):
    out = subprocess.run(
        [str(installed), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("registry-rewrite 0.1.0 (mitmproxy 12."), out.stdout
    # The installed modules, not the checkout's.
    where = subprocess.run(
        [str(installed.parent / "python"), "-c", "import regrewrite; print(regrewrite.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert str(installed.parents[1]) in where and str(REPO_ROOT) not in where

    p = InstalledProxy(installed, registry.url, ca, RULES)
    try:
        p.start()
        client = http_client(p.url, ALICE)
        image = make_image(layers=1, layer_size=5000)
        push_image_raw(client, f"team/{unique}/app", image, "v1")
        assert fetch_manifest(client, f"team/{unique}/app", "v1").digest == image.digest
        assert f"acme_team/{unique}/app" in registry.repositories_seen()
        assert f"{installed.parents[1]}/lib/" in p.log_text()  # the script it loaded
    finally:
        p.stop()
        p.cleanup()


# --- 2. health ---------------------------------------------------------------------------


def test_health_under_deny_is_answered_by_the_proxy(registry, proxy, http_client):
    p = proxy(RULES)  # unmatched: deny
    client = http_client(p.url)
    registry.mark()
    for method in ("GET", "HEAD"):
        assert client.raw(method, f"{p.url}/livez").status == 200
        ready = client.raw(method, f"{p.url}/readyz")
        assert ready.status == 200, ready.body
    paths = [path for _, path in registry.requests(since_mark=True)]
    assert paths == ["/v2/"], paths  # one probe, cached; /livez and /readyz never forwarded


def test_readyz_503_when_the_upstream_is_down(ca, registry, proxy, http_client):
    p = proxy(RULES, upstream=f"https://{LOOPBACK}:{free_port()}")
    client = http_client(p.url)
    assert client.raw("GET", f"{p.url}/livez").status == 200
    ready = client.raw("GET", f"{p.url}/readyz")
    assert ready.status == 503
    (error,) = ready.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert error["detail"] == [{"upstream": "default", "problem": "unreachable"}]


# --- 3. and 4. metrics and the access log after a real pull ------------------------------


def scrape(port: int) -> list:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples, name: str, **labels) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for_metrics(port: int, name: str, at_least: float, timeout: float = 15.0) -> list:
    """Scrape until ``name`` sums to ``at_least`` (the rules watcher looks every second
    and waits for a file to settle), for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if value(samples, name) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_metrics_and_access_log_after_a_real_pull(
    proxy, skopeo, make_image, http_client, unique, tmp_path
):
    metrics_port = free_port()
    log = tmp_path / "access.log"
    p = proxy(
        RULES,
        extra_args=[
            "--set",
            f"registry_metrics={LOOPBACK}:{metrics_port}",
            "--set",
            f"registry_access_log={log}",
        ],
    )
    repo = f"team/{unique}/app"
    image = make_image(layers=2, layer_size=30_000)
    dest = f"docker://{p.host}/{repo}"
    skopeo.copy(image.ref, f"{dest}:1.0", dest_creds=ALICE, tls_verify=False)
    skopeo.copy(f"{dest}:1.0", f"oci:{tmp_path / 'pulled'}:x", src_creds=ALICE, tls_verify=False)
    denied = http_client(p.url).raw("GET", f"{p.url}/v2/nobody/{unique}/manifests/1.0")
    assert denied.status == 404
    # Metrics are on their own listener only, not on the proxy's port.
    assert http_client(p.url).raw("GET", f"{p.url}/metrics").status == 404

    samples = scrape(metrics_port)
    assert METRIC_NAMES <= {s.name for s in samples}
    assert value(samples, "registry_rewrite_rules") == 2
    assert value(samples, "registry_rewrite_denied_total", reason="NAME_UNKNOWN") == 1
    ok_manifests = value(
        samples,
        "registry_rewrite_requests_total",
        upstream="default",
        endpoint="manifests",
        method="GET",
        code="200",
    )
    assert ok_manifests >= 1
    assert value(samples, "registry_rewrite_token_requests_total", code="200") >= 1
    timed = value(samples, "registry_rewrite_upstream_seconds_count", endpoint="blobs")
    assert timed >= 2
    layer_bytes = sum(layer.size for layer in image.layers)
    # Pushed once and pulled once, streamed both ways.
    assert value(samples, "registry_rewrite_bytes_total", direction="request") >= layer_bytes
    assert value(samples, "registry_rewrite_bytes_total", direction="response") >= layer_bytes
    for s in samples:
        for label, text in s.labels.items():
            if label == "le":
                continue  # a histogram bucket bound ("1.0" is also the test's tag)
            for leak in (unique, "team", "alice", "1.0", "sha256"):
                assert leak not in text, (s.name, label, text)

    # A rules edit, then a broken one: counted by result; the broken one changes nothing.
    assert value(samples, "registry_rewrite_rules_reloads_total") == 0
    p.rules_file.write_text(RULES + '  - client: "extra/{n}"\n    upstream: "library/x-{n}"\n')
    samples = wait_for_metrics(metrics_port, "registry_rewrite_rules_reloads_total", 1)
    assert value(samples, "registry_rewrite_rules") == 3
    p.rules_file.write_text("rules: [")
    samples = wait_for_metrics(metrics_port, "registry_rewrite_rules_reloads_total", 2)
    assert value(samples, "registry_rewrite_rules_reloads_total", result="ok") == 1
    assert value(samples, "registry_rewrite_rules_reloads_total", result="error") == 1
    assert value(samples, "registry_rewrite_rules") == 3

    p.stop()  # the log is flushed and closed at shutdown
    text = log.read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(set(e) == LOG_FIELDS for e in entries)
    pulls = [
        e
        for e in entries
        if e["endpoint"] == "manifests" and e["method"] == "GET" and e["status"] == 200
    ]
    assert pulls, entries
    assert pulls[0] | {"ts": None, "client": None, "bytes": None, "duration_ms": None} == {
        "ts": None,
        "client": None,
        "bytes": None,
        "duration_ms": None,
        "user": "alice",
        "method": "GET",
        "endpoint": "manifests",
        "client_name": repo,
        "upstream_name": f"acme_team/{unique}/app",
        "upstream": "default",
        "status": 200,
        "decision": "mapped",
    }
    assert pulls[0]["client"] == LOOPBACK and pulls[0]["bytes"] > 0
    assert {e["decision"] for e in entries} >= {"mapped", "denied", "answered"}
    blobs = [e for e in entries if e["endpoint"] == "blobs" and e["status"] == 200]
    assert sum(e["bytes"] for e in blobs if e["method"] == "GET") >= layer_bytes
    for secret in (ALICE[1], "eyJ", "Basic ", "Bearer "):
        assert secret not in text


# --- 5. behind a load balancer -----------------------------------------------------------

BALANCER = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example.test"}


def realm_of(response) -> str:
    return parse_challenge(response.header("WWW-Authenticate"))[1]["realm"]


def test_realm_and_location_from_a_trusted_balancer(proxy, http_client, unique):
    p = proxy(RULES, extra_args=["--set", "registry_trusted_proxies=127.0.0.1/32"])
    client = http_client(p.url, ALICE)
    ping = client.raw("GET", f"{p.url}/v2/", BALANCER)
    assert ping.status == 401
    assert realm_of(ping) == "https://registry.example.test/auth"
    # The realm's host exists only in this test: fetch the token at the proxy itself, as
    # the balancer would forward it.
    params = parse_challenge(ping.header("WWW-Authenticate"))[1]
    scope = f"repository:team/{unique}/lb:pull,push"
    token = client.fetch_token(dict(params, realm=f"{p.url}/auth"), [scope])
    upload = client.raw(
        "POST",
        f"{p.url}/v2/team/{unique}/lb/blobs/uploads/",
        dict(BALANCER, Authorization=f"Bearer {token}"),
    )
    assert upload.status == 202, upload.body
    assert upload.header("Location").startswith(
        f"https://registry.example.test/v2/team/{unique}/lb/blobs/uploads/"
    )
    assert "registry_trusted_proxies" in p.log_text()  # how the public URL is derived


def test_forwarding_headers_from_an_untrusted_peer_are_ignored(proxy, http_client):
    p = proxy(RULES, extra_args=["--set", "registry_trusted_proxies=10.0.0.0/8"])
    ping = http_client(p.url).raw("GET", f"{p.url}/v2/", BALANCER)
    assert realm_of(ping) == f"{p.url}/auth"
