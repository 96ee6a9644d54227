"""Benchmark: what the addon costs on top of mitmdump, and mitmdump's memory per blob size.

    .venv/bin/python bench/run.py            # full run (~20 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # small sizes, fewer requests (< 2 minutes)

Starts the same real upstream as the end-to-end tests (tests/e2e/upstream.py: test CA,
token server, distribution 2.8 with TLS and token auth), then, side by side, the
variants a client can talk to:

- direct: the registry itself (TLS), upstream names;
- bare: `mitmdump --mode reverse --set stream_large_bodies=1`, no addon, upstream names
  (its token requests go through a second bare mitmdump in front of the token server);
- addon: mitmdump with the addon and a 100-rule rules file, client names `team/...`
  (no stream_large_bodies: the addon must stream by itself);
- nginx: bench/nginx.conf (rewrite + proxy_pass, no buffering), client names;

each proxy with plain HTTP and with TLS to the client.  Variants are run in rotating
order within every repetition, so drift of the (shared, noisy) machine spreads evenly.
Results go to bench/results/latest.md (and .json) and are printed.  Everything listens
on 127.0.0.1 only; every loop is bounded in count and by --max-minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import hookcost  # noqa: E402
from tests.e2e.blobstream import (  # noqa: E402
    BlobClient,
    MiB,
    fetch_token,
    make_blob_file,
    peak_rss,
    reset_peak_rss,
)
from tests.e2e.images import OCI_MANIFEST, build_image  # noqa: E402
from tests.e2e.upstream import (  # noqa: E402
    ADDON_SCRIPT,
    ALICE,
    LOOPBACK,
    LaunchError,
    Mitmdump,
    Registry,
    Skopeo,
    TestCA,
    TokenServer,
    _TokenHandler,
    default_acl,
    free_port,
    wait_for_port,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
NGINX_TEMPLATE = REPO_ROOT / "bench" / "nginx.conf"
ADDON_RULES = 100  # rules in the addon variant's rules file (the team rule is last)


@dataclass(frozen=True)
class Plan:
    sizes_mib: tuple[int, ...]
    reps: dict[int, int]  # repetitions per blob size
    latency_requests: int  # per variant and request kind
    latency_rounds: int
    hook_flows: int
    hook_passes: int
    hook_rules: tuple[int, ...]
    skopeo_layers: int
    skopeo_layer_size: int
    skopeo_reps: int
    max_minutes: float


FULL = Plan(
    sizes_mib=(64, 256, 1024),
    reps={64: 5, 256: 3, 1024: 3},
    latency_requests=1000,
    latency_rounds=10,
    hook_flows=3000,
    hook_passes=3,
    hook_rules=(1, 100, 1000),
    skopeo_layers=30,
    skopeo_layer_size=2 * MiB,
    skopeo_reps=3,
    max_minutes=45,
)
QUICK = Plan(
    sizes_mib=(8, 32),
    reps={8: 2, 32: 2},
    latency_requests=100,
    latency_rounds=2,
    hook_flows=300,
    hook_passes=1,
    hook_rules=(1, 100, 1000),
    skopeo_layers=5,
    skopeo_layer_size=256 * 1024,
    skopeo_reps=1,
    max_minutes=2,
)


class Deadline:
    def __init__(self, minutes: float):
        self.end = time.monotonic() + minutes * 60
        self.skipped: list[str] = []

    def passed(self, what: str) -> bool:
        if time.monotonic() < self.end:
            return False
        self.skipped.append(what)
        return True


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------


class Nginx:
    """nginx from bench/nginx.conf in front of the registry and the token server."""

    def __init__(self, ca: TestCA, registry: Registry, tokens: TokenServer):
        self.ca, self.registry, self.tokens = ca, registry, tokens
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        self.http_port = self.https_port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nginx:
        self.http_port, self.https_port = free_port(), free_port()
        values = {
            "@USER@": "user root root;" if os.geteuid() == 0 else "",
            "@DIR@": str(self.dir),
            "@HTTP_PORT@": str(self.http_port),
            "@HTTPS_PORT@": str(self.https_port),
            "@REGISTRY@": self.registry.host,
            "@TOKENS@": f"{LOOPBACK}:{self.tokens.port}",
            "@CERT@": str(self.ca.cert_pem),
            "@KEY@": str(self.ca.key_pem),
            "@CA@": str(self.ca.ca_pem),
        }
        text = NGINX_TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace(key, value)
        conf = self.dir / "nginx.conf"
        conf.write_text(text)
        log_path = self.dir / "stderr.log"
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def describe() -> str:
            return log_path.read_text(errors="replace") + _read(self.dir / "error.log")

        wait_for_port(self.http_port, proc=self.proc, describe=describe)
        wait_for_port(self.https_port, proc=self.proc, describe=describe)
        return self

    def pids(self) -> list[int]:
        """The master and its workers."""
        if self.proc is None:
            return []
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *map(int, children)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str  # direct, bare-http, addon-tls, ...
    kind: str  # direct | bare | addon | nginx
    tls: bool  # TLS between client and this endpoint
    url: str
    token_url: str
    renames: bool  # clients use team/... (the proxy maps it) rather than acme_team/...
    pids: list[int] = field(default_factory=list)  # processes whose peak RSS we report

    def name(self, logical: str) -> str:
        return ("team/" if self.renames else "acme_team/") + logical

    @property
    def transport(self) -> str:
        return "tls" if self.tls else "http"


class Bench:
    def __init__(self, plan: Plan, work: Path, use_nginx: bool):
        self.plan = plan
        self.work = work
        self.use_nginx = use_nginx
        self.stack = contextlib.ExitStack()
        self.deadline = Deadline(plan.max_minutes)
        self.results: dict = {"plan": plan.__dict__ | {"reps": dict(plan.reps)}}

    # -- set-up --------------------------------------------------------------------

    def start(self) -> None:
        s = self.stack
        # The fixture token server writes headers and body separately; without
        # TCP_NODELAY every keep-alive token request waits out a delayed ACK (~40 ms),
        # which no real token service does and which would drown what is measured.
        _TokenHandler.disable_nagle_algorithm = True
        self.ca = TestCA(self.work / "ca").start()
        s.callback(self.ca.stop)
        self.tokens = TokenServer(self.ca, default_acl(), expires_in=6 * 3600).start()
        s.callback(self.tokens.stop)
        self.registry = Registry(self.ca, self.tokens).start()
        s.callback(self.registry.cleanup)
        self.ctx = self.ca.client_context()
        rules = hookcost.rules_yaml(ADDON_RULES)

        def mitmdump(upstream: str, tls: bool, addon: bool) -> Mitmdump:
            m = Mitmdump(
                upstream,
                self.ca,
                rules if addon else None,
                tls=tls,
                addon=ADDON_SCRIPT if addon else None,
                extra_args=() if addon else ("--set", "stream_large_bodies=1"),
            )
            s.callback(m.cleanup)
            return m.start()

        reg = self.registry
        self.variants = [
            Variant("direct", "direct", True, reg.url, self.tokens.realm, False),
        ]
        for tls in (False, True):
            t = "tls" if tls else "http"
            bare = mitmdump(reg.url, tls, addon=False)
            bare_tokens = mitmdump(self.tokens.url, tls, addon=False)
            addon = mitmdump(reg.url, tls, addon=True)
            self.variants.append(
                Variant(f"bare-{t}", "bare", tls, bare.url, bare_tokens.url + "/auth", False)
            )
            self.variants[-1].pids = [bare.proc.pid]
            self.variants.append(
                Variant(f"addon-{t}", "addon", tls, addon.url, addon.url + "/auth", True)
            )
            self.variants[-1].pids = [addon.proc.pid]
        if self.use_nginx:
            nginx = Nginx(self.ca, reg, self.tokens).start()
            s.callback(nginx.stop)
            for tls, port in ((False, nginx.http_port), (True, nginx.https_port)):
                url = f"{'https' if tls else 'http'}://{LOOPBACK}:{port}"
                v = Variant(
                    f"nginx-{'tls' if tls else 'http'}", "nginx", tls, url, url + "/auth", True
                )
                v.pids = nginx.pids()[1:]  # the worker(s)
                self.variants.append(v)
        self.results["variants"] = {v.key: v.url for v in self.variants}
        self.results["idle_rss_mb"] = {
            v.key: sum(peak_rss(p) for p in v.pids) / 1e6 for v in self.variants if v.pids
        }
        # Sanity: every variant answers the token dance and the registry behind it.
        for v in self.variants:
            self.token(v, "bench/ping", "pull")

    def close(self) -> None:
        self.stack.close()

    def token(self, v: Variant, logical: str, actions: str = "pull,push") -> str:
        return fetch_token(
            v.token_url,
            [f"repository:{v.name(logical)}:{actions}"],
            service=self.registry.service,
            creds=ALICE,
            ssl_context=self.ctx,
        )

    def client(self, v: Variant, logical: str, actions: str = "pull,push") -> BlobClient:
        return BlobClient(v.url, ssl_context=self.ctx, token=self.token(v, logical, actions))

    def ordered(self, rep: int) -> list[Variant]:
        k = rep % len(self.variants)
        return self.variants[k:] + self.variants[:k]

    # -- throughput and peak RSS ---------------------------------------------------

    def throughput(self) -> None:
        out = self.results.setdefault("throughput", {})  # size -> dir -> variant -> [MB/s]
        rss = self.results.setdefault("peak_rss_mb", {})  # variant -> size -> dir -> MB
        direct = self.variants[0]
        for size_mib in self.plan.sizes_mib:
            if self.deadline.passed(f"throughput {size_mib} MiB"):
                continue
            size = size_mib * MiB
            path = self.work / f"blob-{size_mib}.bin"
            log(f"generating a {size_mib} MiB blob")
            digest = make_blob_file(path, size)
            src = f"bench/blobs{size_mib}"
            seed = self.client(direct, src)
            seed.upload(direct.name(src), path, digest)
            seed.close()
            reps = self.plan.reps.get(size_mib, 1)
            for rep in range(reps):
                if rep and self.deadline.passed(f"throughput {size_mib} MiB rep {rep + 1}"):
                    break
                for direction in ("down", "up"):
                    for v in self.ordered(rep + (direction == "up")):
                        logical = src if direction == "down" else f"bench/up-{v.key}"
                        c = self.client(v, logical)
                        for pid in v.pids:
                            reset_peak_rss(pid)
                        if direction == "down":
                            t = c.download(v.name(logical), digest, size)
                        else:
                            t = c.upload(v.name(logical), path, digest)
                        c.close()
                        peak = sum(peak_rss(pid) for pid in v.pids) / 1e6
                        out.setdefault(str(size_mib), {}).setdefault(direction, {}).setdefault(
                            v.key, []
                        ).append(t.mb_per_s)
                        if v.pids:
                            cell = rss.setdefault(v.key, {}).setdefault(str(size_mib), {})
                            cell[direction] = max(cell.get(direction, 0.0), peak)
                        log(
                            f"{size_mib:5} MiB {direction:4} {v.key:10} {t.mb_per_s:7.1f} MB/s"
                            + (f"  peak RSS {peak:.0f} MB" if v.pids else "")
                        )
            path.unlink()

    # -- small-request latency -----------------------------------------------------

    def seed_image(self, logical: str, layers: int, layer_size: int) -> str:
        image = build_image(
            self.work / f"oci-{logical.replace('/', '-')}", layers=layers, layer_size=layer_size
        )
        sk = Skopeo(self.ca, directory=self.work / f"skopeo-seed-{logical.replace('/', '-')}")
        try:
            sk.copy(
                image.ref,
                f"docker://{self.registry.host}/acme_team/{logical}:latest",
                dest_creds=ALICE,
            )
        finally:
            sk.cleanup()
        shutil.rmtree(image.layout, ignore_errors=True)
        return image.digest

    def latency(self) -> None:
        logical = "bench/small"
        self.seed_image(logical, 1, 4096)
        n, rounds = self.plan.latency_requests, self.plan.latency_rounds
        per_round = -(-n // rounds)
        accept = {"Accept": OCI_MANIFEST}
        kinds = ("manifest HEAD", "manifest GET", "token GET")
        clients: dict[tuple[str, str], tuple[BlobClient, str, dict]] = {}
        for v in self.variants:
            target = f"/v2/{v.name(logical)}/manifests/latest"
            manifest = self.client(v, logical, "pull")
            clients[(v.key, "manifest HEAD")] = (manifest, target, accept)
            clients[(v.key, "manifest GET")] = (manifest, target, accept)
            tparts = urllib.parse.urlsplit(v.token_url)
            query = urllib.parse.urlencode(
                {"service": self.registry.service, "scope": f"repository:{v.name(logical)}:pull"}
            )
            basic = _basic(ALICE)
            token_client = BlobClient(f"{tparts.scheme}://{tparts.netloc}", ssl_context=self.ctx)
            clients[(v.key, "token GET")] = (
                token_client,
                f"{tparts.path}?{query}",
                {"Authorization": basic},
            )
        samples: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}

        def one(v: Variant, kind: str) -> float:
            c, target, headers = clients[(v.key, kind)]
            method = "HEAD" if kind == "manifest HEAD" else "GET"
            t0 = time.perf_counter_ns()
            resp, _ = c.request(method, target, headers=headers)
            dt = (time.perf_counter_ns() - t0) / 1e6
            if resp.status != 200:
                raise RuntimeError(f"{v.key} {kind}: {resp.status}")
            return dt

        for v in self.variants:  # warm-up: connections, caches, the addon's realm
            for kind in kinds:
                for _ in range(10):
                    one(v, kind)
        # Request by request, the variants take turns (in a rotating order), so that
        # whatever else the machine does hits them all alike; per-round medians are
        # kept to show how stable the addon-bare difference is.
        round_medians: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
        for r in range(rounds):
            if r and self.deadline.passed(f"latency round {r + 1}"):
                break
            for kind in kinds:
                this_round: dict[str, list[float]] = {v.key: [] for v in self.variants}
                for i in range(per_round):
                    for v in self.ordered(r + i):
                        this_round[v.key].append(one(v, kind))
                for key, xs in this_round.items():
                    samples[kind].setdefault(key, []).extend(xs)
                    round_medians[kind].setdefault(key, []).append(statistics.median(xs))
            log(f"latency round {r + 1}/{rounds} done")
        for c, _, _ in clients.values():
            c.close()
        self.results["latency_ms"] = {
            kind: {
                key: {
                    "n": len(xs),
                    "median": statistics.median(xs),
                    "p99": _percentile(xs, 99),
                    "round_medians": round_medians[kind][key],
                }
                for key, xs in by_variant.items()
            }
            for kind, by_variant in samples.items()
        }

    # -- skopeo whole-image pull ---------------------------------------------------

    def skopeo_pull(self) -> None:
        logical = "bench/many"
        layers = self.plan.skopeo_layers
        log(f"building and pushing a {layers}-layer image")
        self.seed_image(logical, layers, self.plan.skopeo_layer_size)
        tls_variants = [v for v in self.variants if v.tls]
        times: dict[str, list[float]] = {}
        for rep in range(self.plan.skopeo_reps):
            if rep and self.deadline.passed(f"skopeo rep {rep + 1}"):
                break
            for v in self.ordered(rep):
                if v not in tls_variants:
                    continue
                d = self.work / f"skopeo-{v.key}-{rep}"
                sk = Skopeo(self.ca, directory=d)
                dest = d / "image"
                host = urllib.parse.urlsplit(v.url).netloc
                t0 = time.perf_counter()
                sk.copy(f"docker://{host}/{v.name(logical)}:latest", f"dir:{dest}", src_creds=ALICE)
                seconds = time.perf_counter() - t0
                got = len([p for p in dest.iterdir() if len(p.name) == 64])
                if got != layers + 1:
                    raise RuntimeError(f"skopeo via {v.key}: {got} blobs, wanted {layers + 1}")
                sk.cleanup()
                times.setdefault(v.key, []).append(seconds)
                log(f"skopeo pull via {v.key:10} {seconds:.2f} s")
        self.results["skopeo"] = {
            "layers": layers,
            "layer_size": self.plan.skopeo_layer_size,
            "seconds": {k: statistics.median(xs) for k, xs in times.items()},
            "n": {k: len(xs) for k, xs in times.items()},
        }


def _basic(creds: tuple[str, str]) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"

    def version(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr) else "?"

    from mitmproxy.version import VERSION

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mitmproxy": VERSION,
        "registry": version(["docker-registry", "--version"]),
        "nginx": version(["nginx", "-v"]),
        "skopeo": version(["skopeo", "--version"]),
        "load_before": os.getloadavg(),
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TARGET_RATIO = 0.97
TARGET_LATENCY_MS = 0.1
TARGET_RSS_MB = 150
TARGET_HOOK_US = 50


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or not b else f"{a / b:.2f}"


def report(r: dict) -> tuple[str, list[str]]:
    """The markdown report and the list of missed targets."""
    m = r["machine"]
    lines = [
        f"# registry-rewrite benchmark ({'quick' if r['quick'] else 'full'} run)",
        "",
        f"Run {r['started']} · {r['elapsed_s'] / 60:.1f} min · `{r['command']}`",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM",
        f"- Kernel: {m['kernel']}; Python {m['python']}; mitmproxy {m['mitmproxy']}",
        f"- Upstream: {m['registry']} (TLS, token auth); {m['nginx']}; {m['skopeo']}",
        f"- Registry storage and blob files: {r['storage']}",
        f"- Load average before / after: {' '.join(f'{x:.2f}' for x in m['load_before'])} / "
        f"{' '.join(f'{x:.2f}' for x in m['load_after'])}",
        "- All traffic over 127.0.0.1; client, proxies and registry share the cores.",
        "",
    ]
    missed: list[str] = []
    have = {k for k in r["variants"]}
    nginx = any(k.startswith("nginx") for k in have)

    # Throughput
    tp = r.get("throughput", {})
    if tp:
        lines += [
            "## Blob throughput (MB/s, median over repetitions)",
            "",
            "One blob per request: download = GET streamed into sha256 (checked); upload = "
            "POST + monolithic PUT streamed from a file. `direct` is always TLS. Ratios are "
            "addon ÷ other; addon/bare is the median of the per-repetition ratios (range in "
            "brackets), the others are ratios of medians.",
            "",
        ]
        for t, title in (("http", "plain HTTP to the proxy"), ("tls", "TLS to the proxy")):
            cols = ["direct", f"bare-{t}", f"addon-{t}"] + ([f"nginx-{t}"] if nginx else [])
            head = ["blob", "dir", "n"] + cols + ["addon/bare", "addon/direct"]
            head += ["addon/nginx"] if nginx else []
            lines += [f"### {title}", "", "| " + " | ".join(head) + " |"]
            lines.append("|" + "---|" * len(head))
            for size, by_dir in tp.items():
                for direction, by_v in by_dir.items():
                    med = {k: statistics.median(v) for k, v in by_v.items()}
                    n = min(len(v) for v in by_v.values())
                    row = [f"{size} MiB", direction, str(n)] + [_fmt(med.get(c), 0) for c in cols]
                    a = med.get(f"addon-{t}")
                    # addon/bare per repetition (both ran within it), then the median.
                    pairs = [
                        x / y
                        for x, y in zip(
                            by_v.get(f"addon-{t}", []), by_v.get(f"bare-{t}", []), strict=False
                        )
                        if y
                    ]
                    ratio_bare = statistics.median(pairs) if pairs else None
                    row.append(
                        "–"
                        if ratio_bare is None
                        else f"{ratio_bare:.2f} ({min(pairs):.2f}–{max(pairs):.2f})"
                    )
                    row.append(_ratio(a, med.get("direct")))
                    if nginx:
                        row.append(_ratio(a, med.get(f"nginx-{t}")))
                    lines.append("| " + " | ".join(row) + " |")
                    if ratio_bare is not None and ratio_bare < TARGET_RATIO:
                        missed.append(
                            f"throughput {size} MiB {direction} ({t}): addon/bare = "
                            f"{ratio_bare:.2f} < {TARGET_RATIO}"
                        )
            lines.append("")

    rss = r.get("peak_rss_mb", {})
    if rss:
        sizes = list(tp)
        head = ["process"] + [f"{s} MiB {d}" for s in sizes for d in ("down", "up")]
        lines += [
            "## Peak RSS (MB, VmHWM, reset before each transfer, max over repetitions)",
            "",
            "mitmdump: the one process; nginx: its worker. Idle after start: "
            + ", ".join(f"{k} {v:.0f}" for k, v in r.get("idle_rss_mb", {}).items())
            + ".",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for key, by_size in rss.items():
            row = [key]
            for s in sizes:
                for d in ("down", "up"):
                    val = by_size.get(s, {}).get(d)
                    row.append(_fmt(val, 0))
                    if key.startswith("addon") and val is not None and val >= TARGET_RSS_MB:
                        missed.append(f"peak RSS {key} {s} MiB {d}: {val:.0f} MB")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    lat = r.get("latency_ms", {})
    if lat:
        lines += [
            "## Small-request latency (ms, sequential on one keep-alive connection)",
            "",
            "Variants take turns request by request. "
            "Manifest of a 1-layer image (OCI, ~0.5 KiB); token GET with Basic credentials "
            "and one repository scope (the bare mitmdump relays tokens through a second bare "
            "mitmdump in front of the token server; the addon answers them itself, asking "
            "the realm).",
            "",
        ]
        for t, title in (("http", "plain HTTP to the proxy"), ("tls", "TLS to the proxy")):
            cols = ["direct", f"bare-{t}", f"addon-{t}"] + ([f"nginx-{t}"] if nginx else [])
            head = ["request", "n"] + [f"{c} med / p99" for c in cols]
            head.append("addon−bare (med; per-round range)")
            lines += [f"### {title}", "", "| " + " | ".join(head) + " |"]
            lines.append("|" + "---|" * len(head))
            for kind, by_v in lat.items():
                n = min(x["n"] for x in by_v.values())
                row = [kind, str(n)]
                for c in cols:
                    x = by_v.get(c)
                    row.append("–" if x is None else f"{x['median']:.2f} / {x['p99']:.2f}")
                a, b = by_v.get(f"addon-{t}"), by_v.get(f"bare-{t}")
                diff = a["median"] - b["median"] if a and b else None
                per_round = (
                    [x - y for x, y in zip(a["round_medians"], b["round_medians"], strict=False)]
                    if a and b
                    else []
                )
                row.append(
                    "–"
                    if diff is None
                    else f"{diff:+.2f} ({min(per_round):+.2f}…{max(per_round):+.2f})"
                    if per_round
                    else f"{diff:+.2f}"
                )
                lines.append("| " + " | ".join(row) + " |")
                if diff is not None and diff > TARGET_LATENCY_MS:
                    missed.append(
                        f"latency {kind} ({t}): addon median {a['median']:.2f} ms vs bare "
                        f"{b['median']:.2f} ms (+{diff:.2f} ms > {TARGET_LATENCY_MS})"
                    )
            lines.append("")

    hooks = r.get("hooks")
    if hooks:
        counts = hooks["rule_counts"]
        head = ["flow"] + [f"{c} rules" for c in counts] + [f"{c} rules cached" for c in counts]
        lines += [
            "## The addon's own cost (µs per flow, in-process)",
            "",
            f"requestheaders + responseheaders + response on prepared flows ({hooks['flows']} "
            f"per scenario, median of {hooks['passes']} passes); uncached = a new repository "
            "name for every flow (the mapping cache never hits), cached = one name. Rules: see "
            "bench/hookcost.py (the matching rule is the last one). Rules load: "
            + ", ".join(f"{c} rules {ms:.0f} ms" for c, ms in hooks["load_ms"].items())
            + ".",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        scenarios = sorted(
            {k.split("|")[0] for k in hooks["cases"]},
            key=list(dict.fromkeys(k.split("|")[0] for k in hooks["cases"])).index,
        )
        for s in scenarios:
            un = hooks["cases"][f"{s}|uncached"]
            ca = hooks["cases"][f"{s}|cached"]
            row = [s] + [f"{un[str(c)]:.1f}" for c in counts]
            row += [f"{ca[str(c)]:.1f}" for c in counts]
            lines.append("| " + " | ".join(row) + " |")
            worst = un[str(counts[-1])]
            if counts[-1] >= 1000 and worst > TARGET_HOOK_US:
                missed.append(f"hook cost {s} at {counts[-1]} rules: {worst:.1f} µs")
        lines.append("")

    sk = r.get("skopeo")
    if sk:
        secs = sk["seconds"]
        lines += [
            f"## Whole-image pull with skopeo ({sk['layers']} layers × "
            f"{sk['layer_size'] / MiB:g} MiB, TLS, seconds, median)",
            "",
            "`skopeo copy docker://… dir:…` with a fresh blob-info cache each time.",
            "",
            "| "
            + " | ".join(
                list(secs)
                + ["addon/bare", "addon/direct"]
                + (["addon/nginx"] if "nginx-tls" in secs else [])
            )
            + " |",
            "|" + "---|" * (len(secs) + 2 + ("nginx-tls" in secs)),
        ]
        row = [f"{x:.2f}" for x in secs.values()]
        a = secs.get("addon-tls")
        row += [_ratio(a, secs.get("bare-tls")), _ratio(a, secs.get("direct"))]
        if "nginx-tls" in secs:
            row.append(_ratio(a, secs.get("nginx-tls")))
        lines += ["| " + " | ".join(row) + " |", "", "(time ratios: lower is faster)", ""]

    lines += ["## Targets (issue 4)", ""]
    if missed:
        lines += [f"- MISSED: {x}" for x in missed]
    else:
        lines.append("- all met")
    if r.get("skipped"):
        lines.append(f"- not run (time limit): {', '.join(r['skipped'])}")
    lines.append("")
    return "\n".join(lines), missed


# --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="registry-rewrite benchmark (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="small sizes, few requests (< 2 min)")
    ap.add_argument("--sizes", help="blob sizes in MiB, comma-separated (overrides the plan)")
    ap.add_argument("--max-minutes", type=float, help="stop starting new work after this")
    ap.add_argument("--no-nginx", action="store_true", help="leave the nginx variants out")
    ap.add_argument(
        "--storage",
        choices=("tmpfs", "disk"),
        default="tmpfs",
        help="registry storage and blob files in /dev/shm (default) or the temp dir",
    )
    ap.add_argument(
        "--only",
        default="throughput,latency,hooks,skopeo",
        help="sections to run, comma-separated",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="MINUTES",
        help="first wait (at most this long) for the 1-minute load average to drop below 0.5",
    )
    ap.add_argument("--out", type=Path, help="report path (default bench/results/latest.md)")
    args = ap.parse_args()

    plan = QUICK if args.quick else FULL
    if args.sizes:
        sizes = tuple(int(x) for x in args.sizes.split(","))
        plan = Plan(
            **(
                plan.__dict__
                | {"sizes_mib": sizes, "reps": {s: plan.reps.get(s, 3) for s in sizes}}
            )
        )
    if args.max_minutes:
        plan = Plan(**(plan.__dict__ | {"max_minutes": args.max_minutes}))
    sections = set(args.only.split(","))
    out = args.out or (RESULTS_DIR / ("quick.md" if args.quick else "latest.md"))

    missing = [t for t in ("docker-registry", "skopeo") if not shutil.which(t)]
    if missing:
        print(f"bench: {', '.join(missing)} not installed (apt-get install ...)", file=sys.stderr)
        return 2
    use_nginx = not args.no_nginx and shutil.which("nginx") is not None

    base = None
    if args.storage == "tmpfs" and Path("/dev/shm").is_dir():
        need = 3 * max(plan.sizes_mib) * MiB + (1 << 30)
        if shutil.disk_usage("/dev/shm").free > need:
            base = "/dev/shm"
    work = Path(tempfile.mkdtemp(prefix="registry-rewrite-bench-", dir=base))
    # Every launcher (registry storage, mitmdump confdir, skopeo) puts its files there.
    tempfile.tempdir = str(work)

    if args.wait_quiet > 0:
        until = time.monotonic() + args.wait_quiet * 60
        while os.getloadavg()[0] >= 0.5 and time.monotonic() < until:
            log(f"waiting for a quiet machine (load {os.getloadavg()[0]:.2f})")
            time.sleep(min(30.0, max(1.0, until - time.monotonic())))
    started = time.time()
    r: dict = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "machine": machine(),
        "storage": "tmpfs (/dev/shm)" if base else "disk (page cache)",
    }
    bench = Bench(plan, work, use_nginx)
    try:
        if "hooks" in sections:
            log("addon hook cost, in-process")
            r["hooks"] = hookcost.run(plan.hook_rules, plan.hook_flows, plan.hook_passes)
        log("starting CA, token server, registry, mitmdumps" + (", nginx" if use_nginx else ""))
        bench.start()
        if "latency" in sections:
            log("small-request latency")
            bench.latency()
        if "throughput" in sections:
            log("blob throughput and peak RSS")
            bench.throughput()
        if "skopeo" in sections:
            bench.skopeo_pull()
    except (LaunchError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    r.update(bench.results)
    r["machine"]["load_after"] = os.getloadavg()
    r["elapsed_s"] = time.time() - started
    r["skipped"] = bench.deadline.skipped
    text, missed = report(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    print(text)
    log(f"written to {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
