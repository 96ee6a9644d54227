"""What one request on a new connection costs the proxy: the part of a warm pull that
the blob cache cannot remove (issue 14).

    .venv/bin/python bench/connections.py [--rounds 200]

skopeo opens a new connection for every request, so a warm pull through the cache is
eight new connections to the proxy (ping, token, manifest, four layers answered 307,
config) and four to the blob server; the four layer requests arrive together. This
measures that pattern on three servers, each answering a blob request on a connection of
its own, one at a time and four at once, over TLS and plain HTTP (what a balancer that
ends TLS sends):

- the proxy with a warm cache: the hit's 307 (grant remembered, as after asking ahead),
  as mitmdump starts it (flow_detail 1), with flow_detail=0 (the Kubernetes
  Deployment's: one JSON access-log line per request instead), and with
  registry_unload_idle_addons=false (every one of mitmproxy's addons kept loaded);
- bare mitmdump with a script that answers every request with a fixed 307 in
  ``requestheaders``: mitmproxy's own floor, no addon of ours loaded;
- distribution 2.8 (the test registry, Go) answering ``HEAD`` of the blob (no body).

Figures: the median time of a round (all its requests answered, measured by a Python
client, whose own TLS work is in it too) and the CPU the server process used per
request (``/proc``, user + system, over all rounds: steadier than times on a shared
machine). The variants take turns round by round. Loopback only; bounded in rounds.
Prints a table and writes bench/results/connections.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.cache import CLIENT_REPO, UPSTREAM_REPO, Bench, _now, at_once  # noqa: E402
from bench.results_file import write_keeping_reading  # noqa: E402
from tests.e2e.regclient import RegistryHTTP  # noqa: E402
from tests.e2e.upstream import ALICE, LOOPBACK, Mitmdump  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "connections.md"

# mitmproxy's floor: no addon of ours, one fixed answer before any upstream connection.
FIXED_307 = """\
from mitmproxy import http

def requestheaders(flow):
    flow.response = http.Response.make(307, b"", {"Location": "http://127.0.0.1:9/x"})
"""


@dataclass
class Target:
    name: str
    port: int
    pid: int
    path: str
    headers: dict[str, str]
    method: str
    expect: int
    rounds: dict[tuple[bool, int], list[float]] = field(default_factory=dict)
    cpu_ms: dict[tuple[bool, int], float] = field(default_factory=dict)


def cpu_ms(pid: int) -> float:
    """User + system CPU of process `pid` so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def one_request(t: Target, tls: ssl.SSLContext | None) -> None:
    if tls is None:
        conn = http.client.HTTPConnection(LOOPBACK, t.port, timeout=30)
    else:
        conn = http.client.HTTPSConnection(LOOPBACK, t.port, timeout=30, context=tls)
    try:
        conn.request(t.method, t.path, headers=t.headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != t.expect:
            raise AssertionError(f"{t.name}: {resp.status}, expected {t.expect}")
    finally:
        conn.close()


def one_round(t: Target, tls: ssl.SSLContext | None, parallel: int) -> float:
    """Seconds until `parallel` requests, each on a new connection, are all answered."""
    return at_once(lambda: one_request(t, tls), parallel, timeout=60)


def measure(targets: list[Target], tls: ssl.SSLContext, rounds: int) -> None:
    for scheme_tls in (True, False):
        for parallel in (1, 4):
            key = (scheme_tls, parallel)
            for t in targets:
                t.rounds[key] = []
                t.cpu_ms[key] = 0.0
            for _ in range(rounds):
                for t in targets:
                    if not scheme_tls and t.name.startswith("distribution"):
                        continue  # (it serves TLS only)
                    before = cpu_ms(t.pid)
                    t.rounds[key].append(one_round(t, tls if scheme_tls else None, parallel))
                    t.cpu_ms[key] += cpu_ms(t.pid) - before
                time.sleep(0.02)  # let background work of the round settle


def report(targets: list[Target], rounds: int) -> str:
    lines = [
        "# One request on a new connection (bench/connections.py)",
        "",
        f"Blob requests, each on a new connection, {rounds} rounds per row taken in turns, "
        f"{os.cpu_count()} cores shared, {_now()}. Round: all requests of the round "
        "answered (Python client). CPU: the serving process's user + system time per "
        "request, over all rounds.",
        "",
        "| server | answer | connection | at once | round median ms | CPU ms per request |",
        "|---|---|---|---:|---:|---:|",
    ]
    for scheme_tls, parallel in ((True, 1), (True, 4), (False, 1), (False, 4)):
        for t in targets:
            times = t.rounds.get((scheme_tls, parallel))
            if not times:
                continue
            per_request = t.cpu_ms[scheme_tls, parallel] / (len(times) * parallel)
            lines.append(
                f"| {t.name} | {t.method} {t.expect} | {'TLS' if scheme_tls else 'plain'} | "
                f"{parallel} | {statistics.median(times) * 1000:.1f} | {per_request:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="rounds per row")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    # bench/cache.py's upstream (registry, token server, link) with a small image.
    setup = argparse.Namespace(size_mib=4, rate=25e6, delay=0.02)
    with tempfile.TemporaryDirectory(prefix="bench-conn-") as tmp, contextlib.ExitStack() as s:
        work = Path(tmp)
        bench = Bench(setup, s, work)
        bench.setup()
        layer = bench.image.layers[0].digest
        path = f"/v2/{CLIENT_REPO}/blobs/{layer}"
        scopes = [f"repository:{CLIENT_REPO}:pull"]

        def warm_proxy(name: str, *extra: str) -> Target:
            proxy = bench.proxy(bench.fresh("cache"), *extra, tls=True)
            client = RegistryHTTP(proxy.url, ALICE, bench.ca.client_context(), timeout=60)
            assert client.request("GET", path, scopes=scopes).status == 200  # the miss
            time.sleep(0.5)  # its rename
            assert client.request("GET", path, scopes=scopes).status == 307  # a hit
            auth = {"Authorization": f"Bearer {client._tokens[tuple(scopes)]}"}
            return Target(name, proxy.port, proxy.proc.pid, path, auth, "GET", 307)

        script = work / "fixed307.py"
        script.write_text(FIXED_307)
        bare = Mitmdump(
            bench.link.url,
            bench.ca,
            tls=True,
            addon=script,
            extra_args=["--set", "connection_strategy=lazy", "--set", "http2=false"],
        ).start()
        s.callback(bare.cleanup)
        direct = RegistryHTTP(bench.registry.url, ALICE, bench.ca.client_context(), timeout=60)
        upstream_path = f"/v2/{UPSTREAM_REPO}/blobs/{layer}"
        upstream_scopes = [f"repository:{UPSTREAM_REPO}:pull"]
        assert direct.request("HEAD", upstream_path, scopes=upstream_scopes).status == 200
        upstream_token = direct._tokens[tuple(upstream_scopes)]
        targets = [
            warm_proxy("proxy, cache hit"),
            warm_proxy("proxy, cache hit, flow_detail=0", "--set", "flow_detail=0"),
            # The same with every mitmproxy addon loaded (registry_unload_idle_addons).
            warm_proxy("proxy, idle addons kept", "--set", "registry_unload_idle_addons=false"),
            Target("bare mitmdump, fixed answer", bare.port, bare.proc.pid, path, {}, "GET", 307),
            Target(
                "distribution (Go)",
                bench.registry.port,
                bench.registry.proc.pid,
                upstream_path,
                {"Authorization": f"Bearer {upstream_token}"},
                "HEAD",
                200,
            ),
        ]
        measure(targets, bench.ca.client_context(), args.rounds)
        text = report(targets, args.rounds)
    print(text)
    if not args.no_write:
        write_keeping_reading(RESULTS, text)
        print(f"written to {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
