"""The addon's own cost per flow, in microseconds, measured in-process.

The addon is constructed in mitmproxy's test context (``taddons``) with a generated
rules file of 1, 100 or 1,000 rules; prepared flows (``tflow``) go through
``requestheaders``, then get an upstream response attached (untimed) and go through
``responseheaders`` and ``response``, as mitmproxy would call them.  Requests carry a
Bearer JWT as real clients' do (except the /v2/ ping), responses the registry's headers.
"uncached" uses a different repository name for every flow, so the name-mapping LRU
cache never hits; "cached" repeats one name.

    .venv/bin/python bench/hookcost.py [--flows N] [--rules 1,100,1000] [--json]
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "addon"), str(REPO_ROOT)]

from mitmproxy.http import Response  # noqa: E402
from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

import registry_rewrite  # noqa: E402

UPSTREAM_HOST = "registry.upstream.test"
REALM = "https://auth.upstream.test/token"
DIGEST = "sha256:" + "ab" * 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Clients send their Bearer token (an RS256 JWT, ~1 KiB) with every registry request.
_JWT_CLAIMS = {
    "iss": "registry-token-issuer",
    "sub": "alice",
    "aud": "registry.upstream.test",
    "exp": 1893456000,
    "nbf": 1893455690,
    "iat": 1893455700,
    "jti": "4f1c2b7d9e8a4b6c8d0e1f2a3b4c5d6e",
    "access": [{"type": "repository", "name": "acme_team/app/api", "actions": ["pull", "push"]}],
}
BEARER = "Bearer " + ".".join(
    (
        _b64(json.dumps({"typ": "JWT", "alg": "RS256", "kid": "ABCD:EFGH:IJKL"}).encode()),
        _b64(json.dumps(_JWT_CLAIMS).encode()),
        _b64(bytes(range(256))),
    )
)


def rules_yaml(count: int) -> str:
    """A realistic rules file: `count - 2` assorted rules, then `{name}` <-> `library/{name}`
    and, last (the worst place for a linear scan), `team/{r:path}` <-> `acme_team/{r:path}`.
    With count == 1 only the team rule."""
    lines = ["token_path: /auth", "unmatched: deny", "rules:"]

    def rule(client: str, upstream: str) -> None:
        lines.append(f'  - client: "{client}"\n    upstream: "{upstream}"')

    for i in range(max(0, count - 2)):
        kind = i % 4
        if kind == 0:
            rule(f"ns{i}/{{r:path}}", f"acme_ns{i}/{{r:path}}")
        elif kind == 1:
            rule(f"svc{i}-{{svc}}/{{r:path}}", f"acme_svc{i}-{{svc}}/{{r:path}}")
        elif kind == 2:
            rule(f"proj{i}/{{name}}", f"acme/proj{i}-{{name}}")
        else:
            rule(f"mirror{i}/{{r:path}}", f"mirrors/m{i}/{{r:path}}")
    if count >= 2:
        rule("{name}", "library/{name}")
    rule("team/{r:path}", "acme_team/{r:path}")
    return "\n".join(lines) + "\n"


def _request(path: str, method: str = "GET", headers=()):
    req = tutils.treq(
        method=method.encode(),
        scheme=b"https",
        host=UPSTREAM_HOST,
        port=443,
        path=path.encode(),
        headers=[
            (b"host", UPSTREAM_HOST.encode()),
            (b"user-agent", b"containerd/2.0"),
            (b"authorization", BEARER.encode()),
        ]
        + [(k.encode(), v.encode()) for k, v in headers],
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.sockname = ("127.0.0.1", 5000)
    f.client_conn.tls = False
    f.client_conn.sni = None
    f.client_conn.timestamp_tls_setup = None
    return f


def _response(status: int, headers: dict[str, str], content: bytes = b"") -> Response:
    base = {
        "Docker-Distribution-Api-Version": "registry/2.0",
        "X-Content-Type-Options": "nosniff",
        "Date": "Mon, 01 Jan 2024 00:00:00 GMT",
    }
    return Response.make(status, content, {**base, **headers})


# Each scenario: (name -> request flow, upstream name -> response).
def _manifest_get(name: str):
    return _request(
        f"/v2/{name}/manifests/latest",
        headers=[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )


def _manifest_resp(upstream: str) -> Response:
    return _response(
        200,
        {
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            "Content-Length": "1234",
            "Docker-Content-Digest": DIGEST,
            "Etag": f'"{DIGEST}"',
        },
        b"{}",
    )


def _blob_get(name: str):
    return _request(f"/v2/{name}/blobs/{DIGEST}")


def _blob_resp(upstream: str) -> Response:
    return _response(
        200,
        {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(1 << 30),
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
            "Docker-Content-Digest": DIGEST,
            "Etag": f'"{DIGEST}"',
        },
    )


def _challenge_head(name: str):
    return _request(f"/v2/{name}/manifests/latest", "HEAD")


def _challenge_resp(upstream: str) -> Response:
    return _response(
        401,
        {
            "Content-Type": "application/json; charset=utf-8",
            "Content-Length": "150",
            "Www-Authenticate": f'Bearer realm="{REALM}",service="registry.upstream.test",'
            f'scope="repository:{upstream}:pull"',
        },
    )


def _upload_post(name: str):
    return _request(f"/v2/{name}/blobs/uploads/", "POST", [("Content-Length", "0")])


def _upload_resp(upstream: str) -> Response:
    uuid = "5e4a7b0c-1d2e-4f30-8a9b-0c1d2e3f4a5b"
    return _response(
        202,
        {
            "Content-Length": "0",
            "Location": f"https://{UPSTREAM_HOST}/v2/{upstream}/blobs/uploads/{uuid}"
            "?_state=q8Zx2mNwP0aLrT5uVbE3yK7sH1jD9fGcW4oIeQnRzXM%3D",
            "Range": "0-0",
            "Docker-Upload-Uuid": uuid,
        },
    )


def _error_get(name: str):
    return _request(f"/v2/{name}/manifests/missing")


def _error_resp(upstream: str) -> Response:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "MANIFEST_UNKNOWN",
                    "message": "manifest unknown",
                    "detail": {"Tag": "missing", "Name": upstream},
                }
            ]
        }
    ).encode()
    return _response(
        404,
        {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body))},
        body,
    )


def _ping(name: str):
    f = _request("/v2/")
    del f.request.headers["authorization"]  # the first request of a session
    return f


def _ping_resp(upstream: str) -> Response:
    return _response(
        401,
        {
            "Content-Type": "application/json; charset=utf-8",
            "Content-Length": "87",
            "Www-Authenticate": f'Bearer realm="{REALM}",service="registry.upstream.test"',
        },
    )


SCENARIOS = {
    "manifest GET 200": (_manifest_get, _manifest_resp),
    "blob GET 200 (1 GiB, streamed)": (_blob_get, _blob_resp),
    "manifest HEAD 401 challenge": (_challenge_head, _challenge_resp),
    "upload POST 202 Location": (_upload_post, _upload_resp),
    "manifest GET 404 JSON error": (_error_get, _error_resp),
    "/v2/ ping 401 (no name)": (_ping, _ping_resp),
}


def _names(count: int, cached: bool) -> list[tuple[str, str]]:
    """(client, upstream) names, all through the last rule of the file."""
    if cached:
        return [("team/app/api", "acme_team/app/api")] * count
    return [(f"team/app{i}/svc{i % 7}", f"acme_team/app{i}/svc{i % 7}") for i in range(count)]


def _complete(coroutine) -> None:
    """Run the core's async response hook to its end without an event loop: with the
    small bodies measured here it never suspends (only JSON over 64 KiB goes to a thread)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the response hook suspended: a body too big for this benchmark")


def measure_case(addon, scenario: str, flows: int, cached: bool, passes: int = 3) -> float:
    """Microseconds per flow for one scenario (median of `passes` passes over fresh flows)."""
    make_req, make_resp = SCENARIOS[scenario]
    per_flow = []
    for rep in range(passes):
        names = _names(flows, cached)
        if not cached:  # a fresh set each pass, so nothing is cached from the last one
            names = [
                (c.replace("app", f"app{rep}x"), u.replace("app", f"app{rep}x")) for c, u in names
            ]
        fs = [make_req(c) for c, _ in names]
        resps = [make_resp(u) for _, u in names]
        gc.collect()
        t0 = time.process_time()
        for f in fs:
            addon.requestheaders(f)
        t1 = time.process_time()
        for f, r in zip(fs, resps, strict=True):
            assert f.response is None, f.response and f.response.content
            f.response = r
        t2 = time.process_time()
        for f in fs:
            addon.responseheaders(f)
            _complete(addon.response(f))
        t3 = time.process_time()
        per_flow.append(((t1 - t0) + (t3 - t2)) / flows * 1e6)
    return statistics.median(per_flow)


def run(rule_counts=(1, 100, 1000), flows: int = 3000, passes: int = 3) -> dict:
    results: dict = {
        "flows": flows,
        "passes": passes,
        "rule_counts": list(rule_counts),
        "cases": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    for count in rule_counts:
        rules = tmp / f"rules-{count}.yaml"
        rules.write_text(rules_yaml(count))
        addon = registry_rewrite.RegistryRewrite()
        with taddons.context(addon) as tctx:
            t0 = time.process_time()
            tctx.configure(addon, registry_rules=str(rules))
            load_ms = (time.process_time() - t0) * 1e3
            assert len(addon.rules.names.rules) == count, "rules file did not load"
            results.setdefault("load_ms", {})[str(count)] = load_ms
            for scenario in SCENARIOS:
                for cached in (False, True):
                    us = measure_case(addon, scenario, flows, cached, passes)
                    key = f"{scenario}|{'cached' if cached else 'uncached'}"
                    results["cases"].setdefault(key, {})[str(count)] = us
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flows", type=int, default=3000, help="flows per scenario and pass")
    ap.add_argument("--passes", type=int, default=3, help="passes per scenario (median)")
    ap.add_argument("--rules", default="1,100,1000", help="rule counts, comma-separated")
    ap.add_argument("--json", action="store_true", help="print JSON (for bench/run.py)")
    args = ap.parse_args()
    counts = tuple(int(x) for x in args.rules.split(","))
    results = run(counts, min(max(args.flows, 100), 100_000), min(max(args.passes, 1), 20))
    if args.json:
        print(json.dumps(results))
        return
    print(f"µs per flow (requestheaders + responseheaders + response), {args.flows} flows")
    print(f"{'scenario':45} " + " ".join(f"{c:>9} rules" for c in counts))
    for key, by_count in results["cases"].items():
        print(f"{key:45} " + " ".join(f"{by_count[str(c)]:15.1f}" for c in counts))
    print("rules load (ms): " + ", ".join(f"{c}: {ms:.0f}" for c, ms in results["load_ms"].items()))


if __name__ == "__main__":
    main()
