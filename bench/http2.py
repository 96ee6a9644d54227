"""Issue 14 item 8: HTTP/2 on mitmproxy's data path, measured.

    .venv/bin/python bench/http2.py          # ~3 minutes on 2 shared cores

Against the e2e registry (distribution 2.8, TLS, token auth) with one --size-mib blob,
curl downloads it to /dev/null through mitmdump variants, all started at once and run in
a rotating order in each repetition, TLS on both sides:
- bare `mitmdump --mode reverse` (default, `--set http2=false`), curl with --http2 and
  --http1.1;
- HTTP/2 on one side only, with supported hooks and options (bench/http2_alpn.py);
- UNSUPPORTED patches of mitmproxy/h2 internals, for what they would gain
  (bench/http2_unsupported.py): larger advertised frame size, a cheap DataFrame repr;
- the addon loaded (registry_rewrite.py, proxycheck.RULES) with the default and with
  `http2=false`;
- the registry directly.
The protocol of each side is read from curl (client side) and from the registry's access
log (upstream side). Then a probe run (bench/http2_probe.py) logs what the client, the
proxy and the registry advertise on HTTP/2 connections (SETTINGS, WINDOW_UPDATE, DATA
frame sizes), and which protocol skopeo, ctr and docker negotiate with the proxy and with
the registry directly.
Prints the figures and writes bench/results/http2.md. Loopback only; bounded repetitions
and a --max-minutes budget for the timed part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.results_file import write_keeping_reading  # noqa: E402
from tests.e2e.clients import Containerd, Dockerd  # noqa: E402
from tests.e2e.faultkit import push_image  # noqa: E402
from tests.e2e.images import build_image  # noqa: E402
from tests.e2e.proxycheck import RULES  # noqa: E402
from tests.e2e.regclient import RegistryHTTP  # noqa: E402
from tests.e2e.upstream import (  # noqa: E402
    ALICE,
    Mitmdump,
    Registry,
    Skopeo,
    TestCA,
    TokenServer,
    default_acl,
)

RESULTS = REPO_ROOT / "bench" / "results" / "http2.md"
BENCH = Path(__file__).parent
PROBE = BENCH / "http2_probe.py"
ALPN = BENCH / "http2_alpn.py"
UNSUPPORTED = BENCH / "http2_unsupported.py"
MiB = 1 << 20
STREAM = ["--set", "stream_large_bodies=1"]
# distribution's access log: `... "GET /v2/... HTTP/2.0" 200 ... "user agent"`
_REG_LINE = re.compile(r'"(GET|HEAD) (\S+) (HTTP/[\d.]+)" (\d{3}) .*"([^"]*)"\s*$')


@dataclass(frozen=True)
class Variant:
    name: str
    group: str  # baseline / supported / UNSUPPORTED / addon / reference
    curl: str  # --http2 or --http1.1
    addon: bool = False  # registry_rewrite.py with RULES (client name team/h2)
    args: tuple[str, ...] = ()
    direct: bool = False  # the registry itself, no proxy


VARIANTS = (
    Variant("bare default", "baseline", "--http2", args=tuple(STREAM)),
    Variant("bare default, curl --http1.1", "reference", "--http1.1", args=tuple(STREAM)),
    Variant("bare http2=false", "supported", "--http2", args=(*STREAM, "--set", "http2=false")),
    Variant(
        "bare, upstream h1 only (lazy + server_connect)",
        "supported",
        "--http2",
        args=(*STREAM, "-s", str(ALPN), "--set", "h2bench_alpn=upstream-h1")
        + ("--set", "connection_strategy=lazy"),
    ),
    Variant(
        "bare, client h1 only, upstream h2 (lazy + http2=false + server_connect)",
        "supported",
        "--http2",
        args=(*STREAM, "-s", str(ALPN), "--set", "h2bench_alpn=upstream-h2")
        + ("--set", "connection_strategy=lazy", "--set", "http2=false"),
    ),
    Variant(
        "bare + max frame size 2**24-1",
        "UNSUPPORTED",
        "--http2",
        args=(*STREAM, "-s", str(UNSUPPORTED), "--set", "h2bench_unsupported=frames"),
    ),
    Variant(
        "bare + cheap DataFrame repr",
        "UNSUPPORTED",
        "--http2",
        args=(*STREAM, "-s", str(UNSUPPORTED), "--set", "h2bench_unsupported=repr"),
    ),
    Variant(
        "bare + both patches",
        "UNSUPPORTED",
        "--http2",
        args=(*STREAM, "-s", str(UNSUPPORTED), "--set", "h2bench_unsupported=frames,repr"),
    ),
    Variant("addon default", "addon", "--http2", addon=True),
    Variant("addon http2=false", "addon", "--http2", addon=True, args=("--set", "http2=false")),
    Variant("registry direct", "reference", "--http2", direct=True),
    Variant("registry direct, curl --http1.1", "reference", "--http1.1", direct=True),
)


def curl(url: str, token: str, ca: Path, flag: str, first_bytes: int = 0) -> tuple[str, float]:
    """GET `url` with curl to /dev/null: (HTTP version, MB/s). `first_bytes`: only those."""
    ranged = ["-r", f"0-{first_bytes - 1}"] if first_bytes else []
    out = subprocess.run(
        ["curl", "-sS", flag, "--cacert", str(ca), "-o", "/dev/null", *ranged]
        + ["-H", f"Authorization: Bearer {token}"]
        + ["-w", "%{http_version} %{http_code} %{speed_download}", url],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out[1] == ("206" if first_bytes else "200"), out
    return out[0], float(out[2]) / 1e6


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU time of process `pid` so far (of this process's waited children
    for None)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def registry_lines(reg: Registry) -> list[tuple[str, str, str, str]]:
    """(method, path, protocol, user agent) of each request in the registry's access log."""
    reg._sync_log()  # distribution logs a request after answering it
    out = []
    for line in reg.log_text().splitlines():
        if (m := _REG_LINE.search(line)) and "e2e-log-sync" not in m.group(2):
            out.append((m.group(1), m.group(2), m.group(3), m.group(5)))
    return out


def proto(version: str) -> str:
    """curl's "2" / "1.1", distribution's and mitmproxy's "HTTP/2.0" / "HTTP/1.1": alike."""
    version = version.removeprefix("HTTP/")
    return "HTTP/" + ("2" if version in ("2", "2.0") else version)


def tool_versions() -> str:
    out = []
    for argv in (["curl", "--version"], ["skopeo", "--version"], ["ctr", "--version"]) + (
        ["dockerd", "--version"],
    ):
        try:
            first = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            line = first.splitlines()[0].strip()
            if argv[0] == "curl":  # its first line lists every library
                line = " ".join(line.split()[:2] + [w for w in line.split() if "nghttp2" in w])
            out.append(line)
        except (OSError, IndexError, subprocess.SubprocessError):
            out.append(f"{argv[0]} (version unknown)")
    return "; ".join(out)


def agent_name(agent: str) -> str:
    return agent.split("/")[0] or "?"


def median_table(speeds, negotiated, cpu) -> list[str]:
    base = statistics.median(speeds["bare default"])
    lines = [
        "| variant | kind | client side | upstream side | median MB/s | vs bare default "
        "| all MB/s | server CPU s/GiB | curl CPU s/GiB |",
        "|---|---|---|---|---:|---:|---|---:|---:|",
    ]
    for v in VARIANTS:
        values = speeds.get(v.name)
        if not values:
            continue
        med = statistics.median(values)
        client, upstream = negotiated[v.name]
        lines.append(
            f"| {v.name} | {v.group} | {client} | {upstream} | {med:.0f} | "
            f"{med / base:.2f}x | "
            + ", ".join(f"{x:.0f}" for x in values)
            + f" | {statistics.median(c[0] for c in cpu[v.name]):.1f}"
            + f" | {statistics.median(c[1] for c in cpu[v.name]):.1f} |"
        )
    return lines


def settings_lines(reports: list[dict]) -> list[str]:
    def fmt(settings: list[dict]) -> str:
        return "; ".join(", ".join(f"{k}={v}" for k, v in s.items()) for s in settings) or "-"

    def wu(w: dict) -> str:
        if not w["count"]:
            return "none"
        return f"{w['count']} (first +{w['first']}, total +{w['sum']})"

    lines = []
    for r in reports:
        if r["side"] == "client":
            me, peer = "mitmproxy to client", "client (curl: no other client spoke HTTP/2)"
        else:
            me, peer = "mitmproxy to upstream", "upstream (distribution)"
        lines += [
            f"- **{peer}** sent SETTINGS: {fmt(r['settings_received'])}; "
            f"WINDOW_UPDATE on the connection: {wu(r['window_updates']['received']['connection'])}"
            f", on streams: {wu(r['window_updates']['received']['streams'])}; "
            f"DATA frames: {r['data']['received']['frames']}, largest "
            f"{r['data']['received']['largest']} bytes",
            f"- **{me}** sent SETTINGS: {fmt(r['settings_sent'])}; "
            f"WINDOW_UPDATE on the connection: {wu(r['window_updates']['sent']['connection'])}"
            f", on streams: {wu(r['window_updates']['sent']['streams'])}; "
            f"DATA frames: {r['data']['sent']['frames']}, largest "
            f"{r['data']['sent']['largest']} bytes",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-minutes", type=float, default=8.0, help="budget of the timed part")
    ap.add_argument("--no-clients", action="store_true", help="skip skopeo/ctr/docker probes")
    args = ap.parse_args()
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-h2-") as tmp, contextlib.ExitStack() as s:
        work = Path(tmp)
        ca = TestCA(work / "ca").start()
        s.callback(ca.stop)
        tokens = TokenServer(ca, default_acl()).start()
        s.callback(tokens.stop)
        reg = Registry(ca, tokens).start()
        s.callback(reg.cleanup)
        image = build_image(work / "img", layers=1, layer_size=args.size_mib * MiB)
        pusher = RegistryHTTP(reg.url, ALICE, ca.client_context(), timeout=300)
        push_image(pusher, "acme_team/h2", image, "v1")
        small = build_image(work / "small", layers=1, layer_size=MiB)
        push_image(pusher, "acme_team/h2small", small, "v1")
        digest = image.layers[0].digest
        scopes = ["repository:acme_team/h2:pull"]
        direct = RegistryHTTP(reg.url, ALICE, ca.client_context())
        direct.request("HEAD", f"/v2/acme_team/h2/blobs/{digest}", scopes=scopes)
        token = direct._tokens[tuple(scopes)]

        targets: dict[str, tuple[str, str]] = {}  # variant -> (url, token)
        pids: dict[str, int] = {}  # variant -> the process serving it
        for v in VARIANTS:
            if v.direct:
                targets[v.name] = (f"{reg.url}/v2/acme_team/h2/blobs/{digest}", token)
                pids[v.name] = reg.proc.pid
                continue
            if v.addon:
                m = Mitmdump(reg.url, ca, RULES, tls=True, extra_args=list(v.args)).start()
                s.callback(m.cleanup)
                via = RegistryHTTP(m.url, ALICE, ca.client_context())
                team = ["repository:team/h2:pull"]
                via.request("HEAD", f"/v2/team/h2/blobs/{digest}", scopes=team)
                targets[v.name] = (f"{m.url}/v2/team/h2/blobs/{digest}", via._tokens[tuple(team)])
                pids[v.name] = m.proc.pid
            else:
                m = Mitmdump(reg.url, ca, addon=None, tls=True, extra_args=list(v.args)).start()
                s.callback(m.cleanup)
                targets[v.name] = (f"{m.url}/v2/acme_team/h2/blobs/{digest}", token)
                pids[v.name] = m.proc.pid

        # The first 1 MiB of the blob through each variant first, untimed: a fresh
        # mitmdump's first request pays for imports and the first handshakes.
        for v in VARIANTS:
            url, tok = targets[v.name]
            curl(url, tok, ca.ca_pem, v.curl, first_bytes=MiB)

        speeds: dict[str, list[float]] = {}
        negotiated: dict[str, tuple[str, str]] = {}
        cpu: dict[str, list[tuple[float, float]]] = {}  # CPU s per GiB: server, curl
        order = list(VARIANTS)
        reps_done = 0
        for rep in range(args.reps):
            if time.monotonic() > deadline:
                print(f"time budget spent after {rep} repetitions", file=sys.stderr)
                break
            for v in order[rep % len(order) :] + order[: rep % len(order)]:
                url, tok = targets[v.name]
                before = cpu_seconds(pids[v.name]), cpu_seconds(None)
                version, mbs = curl(url, tok, ca.ca_pem, v.curl)
                after = cpu_seconds(pids[v.name]), cpu_seconds(None)
                gib = args.size_mib / 1024
                cpu.setdefault(v.name, []).append(
                    ((after[0] - before[0]) / gib, (after[1] - before[1]) / gib)
                )
                blob_gets = [x for x in registry_lines(reg) if x[0] == "GET" and digest in x[1]]
                negotiated[v.name] = (proto(version), proto(blob_gets[-1][2]))
                speeds.setdefault(v.name, []).append(mbs)
                print(f"rep {rep + 1} {v.name}: {mbs:.0f} MB/s", file=sys.stderr)
            reps_done += 1
        timed_s = time.monotonic() - started
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load = Path("/proc/loadavg").read_text().split()[:3]
        lines += [
            "# HTTP/2 on mitmproxy's data path (bench/http2.py)",
            "",
            f"One {args.size_mib} MiB blob, curl 7.88 to /dev/null, TLS on both sides, "
            f"mitmdump 12.3.1 (h2 4.4.1) in reverse mode in front of distribution 2.8; "
            f"median of {reps_done} repetitions, variants in a rotating order; 2 shared "
            f"cores, load average {' '.join(load)} at the end; {now}; "
            f"setup and timed part {timed_s:.0f} s.",
            "",
            "Kinds: *baseline* and *supported* use mitmproxy options and hooks only; "
            "*UNSUPPORTED* patch mitmproxy/h2 internals (bench/http2_unsupported.py) to show "
            "what they would gain, never for deployment; *addon* loads "
            "addon/registry_rewrite.py (no `stream_large_bodies`, it streams itself); "
            "the bare variants run with `--set stream_large_bodies=1`.",
            "",
            *median_table(speeds, negotiated, cpu),
        ]

        # What each side advertises, and what real clients negotiate (not timed).
        p = Mitmdump(reg.url, ca, RULES, tls=True, extra_args=["-s", str(PROBE)]).start()
        s.callback(p.cleanup)
        via = RegistryHTTP(p.url, ALICE, ca.client_context())
        team = ["repository:team/h2:pull"]
        via.request("HEAD", f"/v2/team/h2/blobs/{digest}", scopes=team)
        curl(f"{p.url}/v2/team/h2/blobs/{digest}", via._tokens[tuple(team)], ca.ca_pem, "--http2")
        direct_seen: dict[str, set[str]] = {}

        def directly(action) -> None:
            # The registry logs the client's user agent for proxied requests as well: keep
            # only the lines this direct action added.
            before = len(registry_lines(reg))
            action()
            for _, _, version, agent in registry_lines(reg)[before:]:
                direct_seen.setdefault(agent_name(agent), set()).add(proto(version))

        directly(lambda: curl(targets["registry direct"][0], token, ca.ca_pem, "--http2"))
        if not args.no_clients:
            skopeo = Skopeo(ca, directory=work / "skopeo")

            def skopeo_copy(host: str, repo: str) -> None:
                out = work / "skopeo-out" / host.replace(":", "_")
                out.parent.mkdir(exist_ok=True)
                skopeo.copy(f"docker://{host}/{repo}:v1", f"dir:{out}", src_creds=ALICE)

            skopeo_copy(p.host, "team/h2small")
            directly(lambda: skopeo_copy(reg.host, "acme_team/h2small"))
            with Containerd() as c:
                for host in (p.host, reg.host):
                    c.configure_host(host, ca=ca.ca_pem)
                user = ":".join(ALICE)
                c.pull(f"{p.host}/team/h2small:v1", user=user, timeout=300)
                directly(lambda: c.pull(f"{reg.host}/acme_team/h2small:v1", user=user))
            with Dockerd() as d:
                d.login(p.host, *ALICE)
                d.pull(f"{p.host}/team/h2small:v1", timeout=300)

                def docker_direct() -> None:
                    d.login(reg.host, *ALICE)
                    d.pull(f"{reg.host}/acme_team/h2small:v1", timeout=300)

                directly(docker_direct)
        p.stop()  # closes every connection: the h2-settings reports are logged on close
        via_proxy: dict[str, set[str]] = {}
        reports = []
        for line in p.log_text().splitlines():
            if "h2-probe" in line:
                fields = line.split("h2-probe", 1)[1].strip().split("|")
                _, agent, client_v, upstream_v, tls = fields
                if agent:  # not the bench's own token fetch (http.client sends no agent)
                    sides = f"{proto(client_v)} / {proto(upstream_v)} ({tls})"
                    via_proxy.setdefault(agent_name(agent), set()).add(sides)
            elif "h2-settings " in line:
                reports.append(json.loads(line.split("h2-settings ", 1)[1]))

        # Does a larger advertised frame size change what the upstream sends? (UNSUPPORTED
        # patch, 16 MiB of the blob.)
        f = Mitmdump(
            reg.url,
            ca,
            addon=None,
            tls=True,
            extra_args=["-s", str(PROBE), "-s", str(UNSUPPORTED)]
            + ["--set", "h2bench_unsupported=frames", *STREAM],
        ).start()
        s.callback(f.cleanup)
        curl(f"{f.url}/v2/acme_team/h2/blobs/{digest}", token, ca.ca_pem, "--http2", 16 * MiB)
        f.stop()
        frames_reports = [
            json.loads(line.split("h2-settings ", 1)[1])
            for line in f.log_text().splitlines()
            if "h2-settings " in line
        ]
        lines += [
            "",
            "## What each side advertises (curl --http2 through mitmdump + addon, one blob)",
            "",
            "From h2's frames on mitmproxy's two connections (bench/http2_probe.py):",
            "",
            *settings_lines(reports),
            "",
            "With the UNSUPPORTED `frames` patch (mitmproxy advertises MAX_FRAME_SIZE 2**24-1; "
            "bare mitmdump, the first 16 MiB of the blob):",
            "",
            *settings_lines(frames_reports),
            "",
            "## Protocols negotiated over TLS (ALPN)",
            "",
            f"Clients: {tool_versions()}.",
            "",
            "Through the proxy (mitmdump + addon, default options), client side / upstream "
            "side (the client's TLS version and ALPN offers), from each flow:",
            "",
        ]
        for agent, versions in sorted(via_proxy.items()):
            lines.append(f"- {agent}: {', '.join(sorted(versions))}")
        lines += [
            "",
            "Directly to the registry (its access log, the lines each direct client added):",
            "",
        ]
        for agent, versions in sorted(direct_seen.items()):
            lines.append(f"- {agent}: {', '.join(sorted(versions))}")
    text = "\n".join(lines) + "\n"
    print(text)
    write_keeping_reading(RESULTS, text)


if __name__ == "__main__":
    main()
