"""The container image (deploy/Containerfile), built and run for real.

No image registry is reachable, so the base image is made from Debian packages:
`mmdebstrap` a minimal trixie root filesystem with python3 and its venv module, `docker
import` it into a private dockerd (tests/e2e/clients.py), then `deploy/build-image
--offline` builds the project's image on it from wheels downloaded on the host (the
build itself reaches no package index). The container then runs with host networking in
front of the test registry, and skopeo pushes and pulls through it.

Building takes a few minutes (mostly mmdebstrap and vfs layer copies); it happens once
per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from tests.e2e.clients import DOCKER_TOOLS, Dockerd, require_tools
from tests.e2e.conftest import require_tool
from tests.e2e.images import fetch_manifest
from tests.e2e.proxycheck import RULES, assert_only_upstream_names
from tests.e2e.upstream import ALICE, LOOPBACK, REPO_ROOT, free_port, wait_for_port

# The build runs in the first test's setup: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SUITE = "trixie"  # Debian 13: python3 is 3.13 (mitmproxy 12 needs >= 3.12; bookworm has 3.11)
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_TAG = "registry-rewrite-base:e2e"
IMAGE_TAG = "registry-rewrite:e2e"
IMAGE_USER = "10001:10001"


@pytest.fixture(scope="module")
def dockerd():
    require_tools(*DOCKER_TOOLS, "runc")
    with Dockerd() as d:
        yield d


@pytest.fixture(scope="module")
def image(dockerd, tmp_path_factory) -> str:
    """The project's image, built on a base made from Debian packages."""
    require_tool("mmdebstrap")
    work = tmp_path_factory.mktemp("image")
    rootfs = work / "rootfs.tar"
    t0 = time.monotonic()
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            # Nobody reads these in the image; smaller layers import and copy faster.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            SUITE,
            str(rootfs),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    t1 = time.monotonic()
    dockerd.docker("import", str(rootfs), BASE_TAG, timeout=300)
    rootfs.unlink()
    py = dockerd.docker(
        "run",
        "--rm",
        "--network",
        "none",
        BASE_TAG,
        "python3",
        "-c",
        "import sys; print('%d.%d' % sys.version_info[:2])",
    ).stdout.strip()
    build = subprocess.run(
        [
            str(REPO_ROOT / "deploy" / "build-image"),
            "--base",
            BASE_TAG,
            "--tag",
            IMAGE_TAG,
            "--offline",
            py,
        ],
        env=dict(dockerd.env, DOCKER=dockerd.cli, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    t2 = time.monotonic()
    print(
        f"\n[container] base rootfs {t1 - t0:.0f} s (Python {py}), import + build {t2 - t1:.0f} s"
    )
    return IMAGE_TAG


def _inspect(dockerd, ref: str) -> dict:
    return json.loads(dockerd.docker("inspect", ref).stdout)[0]


def test_image_runs_as_non_root_with_a_readyz_healthcheck(dockerd, image):
    config = _inspect(dockerd, image)["Config"]
    assert config["User"] == IMAGE_USER
    assert "5000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"][0] == "registry-rewrite"
    health = " ".join(config["Healthcheck"]["Test"])
    env = dict(e.split("=", 1) for e in config["Env"])
    assert "HEALTHCHECK_URL" in health and env["HEALTHCHECK_URL"].endswith(":5000/readyz")
    out = dockerd.docker("run", "--rm", "--network", "none", image, "--version").stdout
    assert out.startswith("registry-rewrite 0.1.0 (mitmproxy 12."), out
    uid = dockerd.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u"
    ).stdout.strip()
    assert uid == IMAGE_USER.split(":")[0]


def test_container_serves_pulls_and_pushes(
    dockerd, image, registry, token_server, ca, skopeo, make_image, http_client, unique, tmp_path
):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "rules.yaml").write_text(RULES)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.pem").write_bytes(ca.ca_pem.read_bytes())
    for d in (rules_dir, certs):  # readable by the image's non-root user
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o644)
    port = free_port()
    name = f"rr-e2e-{uuid.uuid4().hex[:8]}"
    # As in deploy/kubernetes/deployment.yaml: read-only root, mitmproxy's confdir on a
    # tmpfs, the rules mounted as a directory, no capabilities.
    dockerd.docker(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        f"{rules_dir}:/etc/registry-rewrite:ro",
        "--volume",
        f"{certs}:/certs:ro",
        "--env",
        f"HEALTHCHECK_URL=http://{LOOPBACK}:{port}/readyz",
        image,
        "--mode",
        f"reverse:{registry.url}",
        # host networking: loopback only, on a free port
        "--listen-host",
        LOOPBACK,
        "--listen-port",
        str(port),
        "--set",
        "ssl_verify_upstream_trusted_ca=/certs/ca.pem",
        "--set",
        "confdir=/tmp/mitmproxy",
    )
    try:
        wait_for_port(port, timeout=60, describe=lambda: _logs(dockerd, name))
        host = f"{LOOPBACK}:{port}"
        repo, up_repo = f"team/ctr-img-{unique}/app", f"acme_team/ctr-img-{unique}/app"
        img = make_image(layers=3, layer_size=30_000)
        registry.mark()
        skopeo.copy(img.ref, f"docker://{host}/{repo}:1", dest_creds=ALICE, tls_verify=False)
        out = tmp_path / "pulled"
        skopeo.copy(f"docker://{host}/{repo}:1", f"oci:{out}:x", src_creds=ALICE, tls_verify=False)
        pulled = json.loads((out / "index.json").read_text())
        assert pulled["manifests"][0]["digest"] == img.digest
        direct = http_client(registry.url, ALICE)
        assert fetch_manifest(direct, up_repo, "1").digest == img.digest
        assert_only_upstream_names(registry.access_log(since_mark=True), up_repo)
        assert token_server.requests(), "no token went through the container"

        # docker's own HEALTHCHECK (the image's, on /readyz) reports healthy.
        deadline = time.monotonic() + 60
        while (state := _inspect(dockerd, name)["State"]["Health"]["Status"]) != "healthy":
            assert state != "unhealthy", _inspect(dockerd, name)["State"]["Health"]
            assert time.monotonic() < deadline, f"health {state}\n{_logs(dockerd, name)}"
            time.sleep(1)
        # Every process of the container runs as the image's non-root user.
        top = dockerd.docker("top", name, "-o", "pid,uid,args").stdout.splitlines()
        assert any("registry-rewrite" in line or "mitmdump" in line for line in top), top
        assert {line.split()[1] for line in top[1:]} == {IMAGE_USER.split(":")[0]}, top
    finally:
        dockerd.docker("rm", "--force", name, check=False)


def _logs(dockerd, name: str) -> str:
    r = dockerd.docker("logs", "--tail", "100", name, check=False)
    return r.stdout + r.stderr
