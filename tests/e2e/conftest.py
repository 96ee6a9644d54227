"""Fixtures for the end-to-end tests: real registry, token server, skopeo and mitmdump.

Session-scoped: `ca`, `token_server`, `registry` (one token-auth distribution registry
shared by all tests; tests keep apart by using `unique` repository names).
Per test: `skopeo` (fresh blob-info cache), `proxy` (factory starting mitmdump with the
addon), `make_image` / `make_index` (OCI layouts in tmp_path), `http_client`.

Missing tools skip the tests loudly on a developer machine and fail them under CI.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.e2e.clients import CONTAINERD_TOOLS, Containerd, require_tools
from tests.e2e.images import OciImage, OciIndex, build_image, build_index
from tests.e2e.regclient import RegistryHTTP
from tests.e2e.upstream import (
    ADDON_SCRIPT,
    Mitmdump,
    Registry,
    Skopeo,
    TestCA,
    TokenServer,
    default_acl,
)

# Lines of a service's log shown with a failing test.
_LOG_TAIL_LINES = 200


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_tool(name: str, package: str | None = None) -> str:
    """Path of executable `name`; skip (developer machine) or fail (CI) when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    hint = f"apt-get install {package or name}"
    if in_ci():
        pytest.fail(f"{name} not installed ({hint}); CI must run the end-to-end tests")
    pytest.skip(f"{name} not installed: end-to-end tests SKIPPED ({hint})")


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item so fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


@pytest.fixture(scope="session")
def ca():
    """The test CA and the 127.0.0.1/localhost leaf certificate (`TestCA`)."""
    ca = TestCA().start()
    yield ca
    ca.stop()


@pytest.fixture(scope="session")
def token_server(ca):
    """The HTTPS token server with `upstream.default_acl()` (alice, bob, anonymous)."""
    server = TokenServer(ca, default_acl()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry(ca, token_server):
    """distribution 2.8 with TLS and token auth; service `test-registry`."""
    require_tool("docker-registry")
    reg = Registry(ca, token_server).start()
    yield reg
    reg.cleanup()


@pytest.fixture(autouse=True)
def _registry_log_on_failure(request):
    # Print the registry's recent log with a failing test that used it (shown by pytest
    # as captured teardown output), so protocol failures can be read straight from CI.
    yield
    if "registry" in request.fixturenames and _failed(request):
        reg = request.getfixturevalue("registry")
        print(f"----- registry log (last {_LOG_TAIL_LINES} lines) -----")
        print(_tail(reg.log_text()))


@pytest.fixture
def skopeo(ca, tmp_path):
    """A `Skopeo` with its own blob-info cache, auth file and home, fresh for each test."""
    require_tool("skopeo")
    if os.geteuid() == 0:
        require_tool("unshare", "util-linux")
        require_tool("mount", "mount")
    return Skopeo(ca, directory=tmp_path / "skopeo")


@pytest.fixture
def unique() -> str:
    """A short random token to keep repository names of different tests apart."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def make_image(tmp_path) -> Callable[..., OciImage]:
    """`make_image(tag="latest", layers=2, layer_size=4096, ...)` -> OciImage (own layout)."""
    counter = itertools.count()

    def make(**kwargs) -> OciImage:
        return build_image(tmp_path / f"oci-image-{next(counter)}", **kwargs)

    return make


@pytest.fixture
def make_index(tmp_path) -> Callable[..., OciIndex]:
    """`make_index(tag="latest", platforms=(("linux","amd64"),("linux","arm64")))` -> OciIndex."""
    counter = itertools.count()

    def make(**kwargs) -> OciIndex:
        return build_index(tmp_path / f"oci-index-{next(counter)}", **kwargs)

    return make


@pytest.fixture
def http_client(ca) -> Callable[..., RegistryHTTP]:
    """`http_client(base_url, creds=None)` -> RegistryHTTP trusting the test CA."""

    def make(base_url: str, creds: tuple[str, str] | None = None) -> RegistryHTTP:
        return RegistryHTTP(base_url, creds=creds, ssl_context=ca.client_context())

    return make


@pytest.fixture
def proxy(request, ca, registry) -> Callable[..., Mitmdump]:
    """Factory starting mitmdump with the addon in front of the registry.

    `proxy(rules_text, *, tls=False, upstream=None, extra_args=(), addon=ADDON_SCRIPT)`
    returns a started `Mitmdump` (`url`, `host`, `log_text()`); all are stopped at
    teardown, and their logs printed when the test failed.
    """
    started: list[Mitmdump] = []

    def start(
        rules_text: str | None = None,
        *,
        tls: bool = False,
        upstream: str | None = None,
        extra_args: Sequence[str] = (),
        addon: Path | None = ADDON_SCRIPT,
        rules_file: Path | None = None,
    ) -> Mitmdump:
        m = Mitmdump(
            upstream or registry.url,
            ca,
            rules_text,
            rules_file=rules_file,
            tls=tls,
            addon=addon,
            extra_args=extra_args,
        )
        started.append(m)
        return m.start()

    yield start

    failed = _failed(request)
    for m in started:
        m.stop()
        if failed:
            print(f"----- mitmdump {m.host} log (last {_LOG_TAIL_LINES} lines) -----")
            print(_tail(m.log_text()))
        m.cleanup()


@pytest.fixture
def containerd(registry):
    """A private containerd (CRI off) for ctr; test modules may configure it further."""
    require_tools(*CONTAINERD_TOOLS)
    with Containerd() as c:
        yield c
