"""What the operations addons (health, trusted proxies, metrics, access log) add per flow,
in microseconds, measured in-process on prepared flows (as bench/hookcost.py does for the
core; the core's own hooks are not timed here).

- "off": no registry_metrics, no registry_access_log, no registry_trusted_proxies (the
  defaults): the hooks' guards only.
- "on": metrics served (127.0.0.1, a free port), the access log written to a temporary
  file, trusted proxies with forwarding headers from a trusted peer.
Also: the cost of counting one streamed chunk, and how fast the access log's writer
thread drains its queue.

    .venv/bin/python bench/opscost.py [--flows N]
"""

from __future__ import annotations

import argparse
import gc
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
from regrewrite.addons.accesslog import AccessLog  # noqa: E402
from regrewrite.addons.health import Health  # noqa: E402
from regrewrite.addons.metrics import Metrics  # noqa: E402
from regrewrite.addons.trusted import TrustedProxies  # noqa: E402

RULES = 'unmatched: deny\nrules:\n  - client: "team/{r:path}"\n    upstream: "acme_team/{r:path}"\n'
DIGEST = "sha256:" + "ab" * 32
CORE_METADATA = {  # what the core records on a mapped blob GET
    "registry_endpoint": "blobs",
    "registry_decision": "mapped",
    "registry_upstream_key": "default",
    "registry_client_name": "team/app",
    "registry_upstream_name": "acme_team/app",
    "registry_user": "alice",
}


def make_flow():
    req = tutils.treq(
        method=b"GET",
        scheme=b"https",
        host="upstream.test",
        port=443,
        path=f"/v2/acme_team/app/blobs/{DIGEST}".encode(),
        headers=[
            (b"host", b"upstream.test"),
            (b"user-agent", b"containerd/2.0"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"registry.example.com"),
        ],
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.peername = ("10.0.0.5", 40000)
    f.client_conn.sockname = ("10.0.0.9", 5000)
    f.request.stream = True
    return f


def per_flow(addons, flows: int) -> float:
    health, trusted, metrics, alog = addons
    fs = [make_flow() for _ in range(flows)]
    resps = [
        Response.make(200, b"", {"Content-Length": str(1 << 20), "Content-Type": "x"}) for _ in fs
    ]
    gc.collect()
    gc.disable()
    try:
        total = 0.0
        for f, resp in zip(fs, resps, strict=True):
            t0 = time.perf_counter()
            health.requestheaders(f)
            trusted.requestheaders(f)
            f.metadata.update(CORE_METADATA)  # (the core's work, not timed: see hookcost)
            metrics.requestheaders(f)
            f.response = resp
            resp.stream = True
            metrics.responseheaders(f)
            alog.responseheaders(f)
            metrics.response(f)
            alog.response(f)
            total += time.perf_counter() - t0
    finally:
        gc.enable()
    return total / flows * 1e6


def chunk_cost(chunks: int) -> float:
    f = make_flow()
    f.response = Response.make(200)
    f.response.stream = True
    from regrewrite.addons import count_body

    count_body(f, "response")
    stream = f.response.stream
    data = b"x" * 65536
    t0 = time.perf_counter()
    for _ in range(chunks):
        stream(data)
    return (time.perf_counter() - t0) / chunks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flows", type=int, default=20_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="opscost-"))
    (tmp / "rules.yaml").write_text(RULES)
    core = registry_rewrite.RegistryRewrite()
    addons = (Health(), TrustedProxies(), Metrics(), AccessLog())
    with taddons.context(core, *addons) as tctx:
        tctx.configure(core, registry_rules=str(tmp / "rules.yaml"))
        for a in addons:
            if hasattr(a, "running"):
                a.running()
        results = {
            "all off (defaults)": statistics.median(per_flow(addons, args.flows) for _ in range(3))
        }
        settings = {
            "trusted proxies only": {"registry_trusted_proxies": "10.0.0.0/8"},
            "metrics only": {"registry_metrics": "127.0.0.1:0"},
            "access log only": {"registry_access_log": str(tmp / "access.log")},
            "all on": {
                "registry_trusted_proxies": "10.0.0.0/8",
                "registry_metrics": "127.0.0.1:0",
                "registry_access_log": str(tmp / "access.log"),
            },
        }
        for name, options in settings.items():
            tctx.options.update(
                registry_trusted_proxies="", registry_metrics="", registry_access_log=""
            )
            tctx.options.update(**options)
            addons[2].running()
            results[name] = statistics.median(per_flow(addons, args.flows) for _ in range(3))
            if addons[3].writer is not None:
                writer = addons[3].writer
                t0 = time.perf_counter()
                while writer.queue.qsize():
                    time.sleep(0.001)
                drained = time.perf_counter() - t0
                dropped = writer.dropped
        for a in addons:
            if hasattr(a, "done"):
                a.done()
    lines = len((tmp / "access.log").read_text().splitlines())
    print(f"flows per run: {args.flows} (blob GET, streamed, three runs, median)")
    for name, micros in results.items():
        print(f"{name:24} {micros:7.2f} us per flow")
    print(f"counting one 64 KiB streamed chunk: {chunk_cost(100_000):.3f} us")
    print(
        f"access log: {lines} lines written, {dropped} dropped, queue drained "
        f"{drained * 1000:.0f} ms after the last flow"
    )


if __name__ == "__main__":
    main()
