"""Shared checks for the client tests through the proxy (docker, containerd, raw HTTP).

All of them run mitmdump + the addon with `RULES`: clients say `team/...` and `{name}`,
the registry holds `acme_team/...` and `library/{name}`. These helpers look at what
reached the upstream registry and the token server, so a test can tell that the proxy
renamed everything, not merely that the client was happy.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.e2e.images import OciImage

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
  - client: "{name}"
    upstream: "library/{name}"
"""

UPSTREAM_PREFIXES = ("acme_team/", "library/")

# `proxy(RULES, extra_args=TRANSPORT_PROBE)` logs how each request reached mitmdump.
TRANSPORT_PROBE = ["-s", str(Path(__file__).with_name("transport_probe.py"))]
_TRANSPORT_LINE = re.compile(r"e2e-transport (https?) (\S+) (\S+)")


def client_transports(mitmdump) -> list[tuple[str, str, str]]:
    """(scheme, method, path) of every request that reached a mitmdump started with
    TRANSPORT_PROBE: scheme "https" when the client spoke TLS to it."""
    return _TRANSPORT_LINE.findall(mitmdump.log_text())


_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")


def repository_of(path: str) -> str | None:
    """The repository name in a /v2/ request path, or None (/v2/, _catalog, ...)."""
    m = _REPO_PATH.match(path)
    return m.group(1) if m else None


def names_in_access_log(entries) -> list[str]:
    """Every repository name the registry was addressed with: in paths and in `from=`."""
    names = []
    for e in entries:
        name = repository_of(e.path)
        if name is not None:
            names.append(name)
        names.extend(e.query.get("from", []))
    return names


def assert_only_upstream_names(entries, *must_see: str) -> list[str]:
    """No request reached the registry under a client-side name, and each of `must_see`
    (upstream names) was addressed at least once. Returns the names seen."""
    names = names_in_access_log(entries)
    wrong = sorted({n for n in names if not n.startswith(UPSTREAM_PREFIXES)})
    assert not wrong, f"client-side names reached the upstream: {wrong}"
    missing = sorted(set(must_see) - set(names))
    assert not missing, f"the upstream never saw {missing}; it saw {sorted(set(names))}"
    return names


def token_requests_for(token_server, *needles: str):
    """Token requests (oldest first) with a scope naming one of `needles` (substrings)."""
    return [r for r in token_server.requests() if any(n in s for s in r.scopes for n in needles)]


def scope_names(scopes: Iterable[str]) -> list[str]:
    """The resource names of `type:name:actions` scopes."""
    return [s.split(":", 1)[1].rsplit(":", 1)[0] for s in scopes]


def assert_anonymous_pull_tokens(token_server, upstream_name: str) -> None:
    """The token server got only anonymous GETs for pulling `upstream_name`, and granted."""
    reqs = token_server.requests()
    assert_scopes_mapped(reqs)
    assert {(r.method, r.basic_auth, r.subject, r.scopes) for r in reqs} == {
        ("GET", False, None, (f"repository:{upstream_name}:pull",))
    }
    assert all(r.status == 200 and r.granted for r in reqs)


def assert_scopes_mapped(requests: Sequence) -> None:
    """Every repository scope the token server was asked for names an upstream repository."""
    assert requests, "no token request at all"
    for r in requests:
        for s in r.scopes:
            if s.startswith("repository"):
                name = scope_names([s])[0]
                assert name.startswith(UPSTREAM_PREFIXES), f"unmapped scope {s!r} in {r}"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image_raw(client, repo: str, image: OciImage, tag: str) -> None:
    """Push an OCI image from its layout with a `RegistryHTTP` client: each blob by POST
    then one PUT (monolithic), then the manifest. Works directly or through the proxy."""
    scopes = [f"repository:{repo}:pull,push"]
    blobs_dir = image.layout / "blobs" / "sha256"
    for blob in (image.config, *image.layers):
        data = (blobs_dir / blob.digest.split(":", 1)[1]).read_bytes()
        head = client.request("HEAD", f"/v2/{repo}/blobs/{blob.digest}", scopes=scopes)
        if head.status == 200:
            continue
        start = client.request("POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes)
        assert start.status == 202, (start.status, start.body)
        location = start.header("Location")
        sep = "&" if "?" in location else "?"
        put = client.request(
            "PUT",
            f"{location}{sep}digest={blob.digest}",
            headers={"Content-Type": "application/octet-stream"},
            body=data,
            scopes=scopes,
        )
        assert put.status == 201, (put.status, put.body)
    put = client.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        headers={"Content-Type": image.manifest.media_type},
        body=image.manifest_bytes,
        scopes=scopes,
    )
    assert put.status == 201, (put.status, put.body)
