"""Benchmark of the blob cache (issue 14) behind a WAN-like link.

    .venv/bin/python bench/cache.py              # 64 MiB image, skopeo and ctr (~10 min)
    .venv/bin/python bench/cache.py --no-ctr --size-mib 16   # quicker

Starts the e2e upstream (test CA, token server, distribution 2.8 with TLS and token
auth), pushes one image of --size-mib (4 layers of random data) straight into it, and
puts tests/e2e/throttle.ThrottleRelay in front: --rate bytes/s shared by every
connection, --delay seconds added to each new connection. Then pulls the image with
skopeo (into a fresh OCI layout), `ctr images pull` and `ctr content fetch` (the
registry traffic without unpacking; both into a fresh containerd each time) from:

- the registry itself without the link (the floor: what the client takes on its own);
- link: the registry over the link, no proxy at all;
- proxy: mitmdump + the addon, no cache;
- cache cold / warm: mitmdump + the addon with --set registry_cache_dir (fresh dir);
- distribution cold / warm: Debian docker-registry with a `proxy:` section (pull-through
  cache, fresh storage) in front of the same link, over TLS to skopeo and plain HTTP to
  ctr (as the proxy is); once with clients that need no login (one account for all, its
  usual setup) and once with token auth towards its clients too;
- 10 concurrent cold skopeo pulls through a fresh cache (bytes over the link);

and measures hit throughput of one cached blob fetched with curl from: nginx serving
the cache directory (sendfile), the cache's own blob server (the 307 target, sendfile),
and mitmproxy relaying it (registry_cache_serve=through, the TLS-client path). Last,
production's shape: real HAProxy with deploy/haproxy.cfg ending TLS in front of the
proxy, hits relayed by the proxy (serve=auto) or 307s to /blobs/ that HAProxy routes to
the blob server (serve=public): skopeo warm pulls and curl -L of the blob through each.

Prints a table with the issue's targets computed from it and writes
bench/results/cache.md. Loopback only; every loop bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.results_file import write_keeping_reading  # noqa: E402
from tests.e2e.clients import Containerd  # noqa: E402
from tests.e2e.faultkit import push_image  # noqa: E402
from tests.e2e.images import build_image  # noqa: E402
from tests.e2e.proxycheck import RULES  # noqa: E402
from tests.e2e.regclient import RegistryHTTP  # noqa: E402
from tests.e2e.throttle import ThrottleRelay  # noqa: E402
from tests.e2e.upstream import (  # noqa: E402
    ALICE,
    LOOPBACK,
    Mitmdump,
    Registry,
    Skopeo,
    TestCA,
    TokenServer,
    default_acl,
    free_port,
    wait_for_port,
)

RESULTS = REPO_ROOT / "bench" / "results" / "cache.md"
UPSTREAM_REPO = "acme_team/bench/app"
CLIENT_REPO = "team/bench/app"
MiB = 1 << 20
PUBLIC = "blob server via HAProxy (serve=public)"  # production's shape, in the targets


class PullThroughRegistry(Registry):
    """distribution 2.8 as a pull-through cache (`proxy:`) of `remote` (TLS or plain
    HTTP, as the client speaks to the proxy); it logs in upstream as alice. Towards its
    clients no auth, or the test token server's when `tokens` is given (the clients then
    log in and fetch a token, as they do through the proxy)."""

    def __init__(self, ca: TestCA, remote: str, tls: bool, tokens: TokenServer | None = None):
        super().__init__(ca, tokens, tls=tls)
        self.remote = remote

    def config(self) -> dict:
        config = super().config()
        config["proxy"] = {"remoteurl": self.remote, "username": ALICE[0], "password": ALICE[1]}
        config["log"]["accesslog"] = {"disabled": True}
        return config

    def start(self, timeout: float = 30.0) -> PullThroughRegistry:
        self.port = free_port()
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env["SSL_CERT_FILE"] = str(self.ca.ca_pem)  # trust the upstream's test CA
        self._launch(["docker-registry", "serve", str(self.config_path)], env, timeout)
        return self


class Bench:
    def __init__(self, args, stack: contextlib.ExitStack, work: Path):
        self.args = args
        self.stack = stack
        self.work = work
        self.rows: list[dict] = []
        self.counter = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.work / f"{name}-{self.counter}"
        path.mkdir(parents=True)
        return path

    def setup(self) -> None:
        a = self.args
        self.ca = TestCA(self.work / "ca").start()
        self.stack.callback(self.ca.stop)
        self.tokens = TokenServer(self.ca, default_acl()).start()
        self.stack.callback(self.tokens.stop)
        self.registry = Registry(self.ca, self.tokens).start()
        self.stack.callback(self.registry.cleanup)
        layer = a.size_mib * MiB // 4
        self.image = build_image(self.work / "image", layers=4, layer_size=layer)
        direct = RegistryHTTP(self.registry.url, ALICE, self.ca.client_context(), timeout=300)
        push_image(direct, UPSTREAM_REPO, self.image, "v1")
        self.image_bytes = sum(b.size for b in self.image.layers) + self.image.config.size
        self.link = ThrottleRelay(self.registry.port, rate=a.rate, delay=a.delay).start()
        self.stack.callback(self.link.stop)

    # -- endpoints ---------------------------------------------------------------------

    def proxy(
        self, cache: Path | None, *extra: str, tls: bool = False, cache_port: int = 0
    ) -> Mitmdump:
        args = list(extra)
        if cache is not None:
            args += ["--set", f"registry_cache_dir={cache}"]
            args += ["--set", f"registry_cache_port={cache_port or free_port()}"]
        m = Mitmdump(self.link.url, self.ca, RULES, tls=tls, extra_args=args).start()
        self.stack.callback(m.cleanup)
        return m

    def pull_through(self, tls: bool, tokens: TokenServer | None = None) -> PullThroughRegistry:
        r = PullThroughRegistry(self.ca, self.link.url, tls, tokens).start()
        self.stack.callback(r.cleanup)
        return r

    # -- clients -----------------------------------------------------------------------

    def skopeo(self, host: str, repo: str, *, tls: bool, creds) -> None:
        skopeo = Skopeo(self.ca, directory=self.fresh("skopeo"))
        dest = self.fresh("oci")
        skopeo.copy(
            f"docker://{host}/{repo}:v1",
            f"oci:{dest}:x",
            src_creds=creds,
            tls_verify=tls,
            timeout=600,
        )
        skopeo.cleanup()

    def ctr(self, host: str, repo: str, *, tls: bool, creds, unpack: bool = True) -> float:
        """Seconds of `ctr images pull` (with unpacking) or `ctr content fetch` (the
        registry traffic alone) into a fresh containerd."""
        with Containerd() as c:
            if tls:
                c.configure_host(host, ca=self.ca.ca_pem)
            else:
                c.configure_host(host, plain_http=True)
            # A token realm that is not this host (distribution+login's) is reached with
            # Go's default trust: the test CA.
            os.environ["SSL_CERT_FILE"] = str(self.ca.ca_pem)
            try:
                ref = f"{host}/{repo}:v1"
                start = time.monotonic()
                if unpack:
                    c.pull(ref, user=":".join(creds) if creds else None, timeout=600)
                else:
                    auth = ["--user", ":".join(creds)] if creds else []
                    c.ctr("content", "fetch", *auth, ref, timeout=600)
                return time.monotonic() - start
            finally:
                del os.environ["SSL_CERT_FILE"]

    def record(self, client: str, variant: str, runs: list[float], moved: int) -> None:
        seconds = statistics.median(runs)
        self.rows.append(
            {
                "client": client,
                "variant": variant,
                "seconds": round(seconds, 3),
                "runs": [round(r, 3) for r in runs],
                "link_bytes": moved,
                "link_x_image": round(moved / self.image_bytes / len(runs), 2),
            }
        )
        every = ", ".join(f"{r:.2f}" for r in runs)
        print(f"  {client:7} {variant:28} {seconds:6.2f} s ({every})  {moved / MiB:7.1f} MiB")

    def timed(self, client: str, host: str, repo: str, tls: bool, creds) -> tuple[float, int]:
        """One pull into a fresh destination: (seconds, bytes over the link)."""
        self.link.reset_counts()
        if client == "skopeo":
            start = time.monotonic()
            self.skopeo(host, repo, tls=tls, creds=creds)
            seconds = time.monotonic() - start
        else:
            seconds = self.ctr(host, repo, tls=tls, creds=creds, unpack=client == "ctr")
        return seconds, self.link.bytes_down

    def pull(self, client: str, variant: str, host: str, repo: str, tls: bool, creds) -> None:
        seconds, moved = self.timed(client, host, repo, tls, creds)
        self.record(client, variant, [seconds], moved)

    # -- runs --------------------------------------------------------------------------

    def pulls(self, client: str) -> None:
        registry_host = f"{LOOPBACK}:{self.registry.port}"
        self.pull(client, "registry, no link (floor)", registry_host, UPSTREAM_REPO, True, ALICE)
        link_host = f"{LOOPBACK}:{self.link.port}"
        self.pull(client, "link, no proxy", link_host, UPSTREAM_REPO, True, ALICE)
        p = self.proxy(None)
        self.pull(client, "proxy, no cache", p.host, CLIENT_REPO, False, ALICE)
        p.stop()
        # Each cache is filled by its cold pull, then the warm pulls take turns, so that
        # the machine's drift (other sessions share it) spreads over all of them.
        warm: list[tuple[str, str, str, object]] = []
        c = self.proxy(self.fresh("cache"))
        self.pull(client, "proxy+cache cold", c.host, CLIENT_REPO, False, ALICE)
        warm.append(("proxy+cache warm", c.host, CLIENT_REPO, ALICE))
        if not self.args.no_distribution:
            # Over TLS to skopeo as the proxy is; plain HTTP to ctr, as the proxy is too.
            tls = client == "skopeo"
            d = self.pull_through(tls=tls)
            self.pull(client, "distribution cold", d.host, UPSTREAM_REPO, False, None)
            warm.append(("distribution warm", d.host, UPSTREAM_REPO, None))
            # The same with clients that must log in, as every client of the proxy does.
            dl = self.pull_through(tls=tls, tokens=self.tokens)
            self.pull(client, "distribution+login cold", dl.host, UPSTREAM_REPO, False, ALICE)
            warm.append(("distribution+login warm", dl.host, UPSTREAM_REPO, ALICE))
        time.sleep(0.5)  # the last blob's rename
        runs: dict[str, list[float]] = {variant: [] for variant, *_ in warm}
        moved = dict.fromkeys(runs, 0)
        for _ in range(self.args.warm_reps):
            for variant, host, repo, creds in warm:
                seconds, link_bytes = self.timed(client, host, repo, False, creds)
                runs[variant].append(seconds)
                moved[variant] += link_bytes
        for variant in runs:
            self.record(client, variant, runs[variant], moved[variant])
        c.stop()
        if not self.args.no_distribution:
            d.stop()
            dl.stop()

    def concurrent(self, n: int) -> None:
        c = self.proxy(self.fresh("cache"))
        self.link.reset_counts()
        seconds = at_once(lambda: self.skopeo(c.host, CLIENT_REPO, tls=False, creds=ALICE), n)
        self.record("skopeo", f"{n} concurrent cold", [seconds], self.link.bytes_down)
        c.stop()

    def hit_throughput(self, reps: int) -> dict[str, list[float]]:
        """MB/s of one cached layer: nginx (sendfile) vs the blob server vs mitmproxy."""
        cache = self.fresh("cache")
        redirect = self.proxy(cache, "--set", "registry_cache_serve=redirect")
        through = self.proxy(cache, "--set", "registry_cache_serve=through", tls=True)
        tls_proxy = self.proxy(cache, tls=True)  # serve=auto: 307 to the blob server's TLS
        big = build_image(self.work / "big", layers=1, layer_size=self.args.hit_mib * MiB)
        direct = RegistryHTTP(self.registry.url, ALICE, self.ca.client_context(), timeout=300)
        push_image(direct, UPSTREAM_REPO + "-big", big, "v1")
        self.hit_blob_size = big.layers[0].size
        digest = big.layers[0].digest
        path = f"/v2/{CLIENT_REPO}-big/blobs/{digest}"
        scopes = [f"repository:{CLIENT_REPO}-big:pull"]
        self.big = (path, scopes)
        client = RegistryHTTP(redirect.url, ALICE, self.ca.client_context(), timeout=300)
        assert client.request("GET", path, scopes=scopes).status == 200  # the miss
        time.sleep(0.5)
        token = client._tokens[tuple(scopes)]
        tls_client = RegistryHTTP(tls_proxy.url, ALICE, self.ca.client_context(), timeout=300)
        nginx_port, nginx_tls = free_port(), free_port()
        conf = self.work / "nginx-static.conf"
        conf.write_text(
            f"daemon off; worker_processes 1; pid {self.work}/nginx-static.pid;\n"
            f"error_log {self.work}/nginx-static.err warn;\n"
            "events { worker_connections 64; }\n"
            "http { access_log off; sendfile on; tcp_nopush on;\n"
            f"  client_body_temp_path {self.work}/nb; proxy_temp_path {self.work}/np;\n"
            f"  fastcgi_temp_path {self.work}/nf; uwsgi_temp_path {self.work}/nu;\n"
            f"  scgi_temp_path {self.work}/ns;\n"
            f"  server {{ listen {LOOPBACK}:{nginx_port}; root {cache}; }}\n"
            f"  server {{ listen {LOOPBACK}:{nginx_tls}  ssl; root {cache};\n"
            f"    ssl_certificate {self.ca.cert_pem}; ssl_certificate_key {self.ca.key_pem}; }}\n"
            "}\n"
        )
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(user + conf.read_text())
        nginx = subprocess.Popen(
            ["nginx", "-p", str(self.work), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.stack.callback(lambda: (nginx.terminate(), nginx.wait(10)))
        wait_for_port(nginx_port, timeout=10, proc=nginx)
        (relpath,) = [
            str(p.relative_to(cache)) for p in cache.glob(f"*/sha256/{digest.split(':')[1]}")
        ]
        speeds: dict[str, list[float]] = {
            "http: nginx (sendfile), the file": [],
            "http: blob server (sendfile), the signed URL": [],
            "http: proxy 307 + blob server (curl -L, incl. authorisation HEAD)": [],
            "https: nginx, the file": [],
            "https: blob server TLS, the signed URL": [],
            "https: proxy 307 + blob server TLS (curl -L, incl. authorisation HEAD)": [],
            "https: proxy relays it (serve=through, incl. authorisation HEAD)": [],
        }
        for _ in range(reps):
            r = client.request("GET", path, scopes=scopes)
            assert r.status == 307, r.status
            r_tls = tls_client.request("GET", path, scopes=scopes)
            assert r_tls.status == 307 and r_tls.header("Location").startswith("https:")
            auth = ["-H", f"Authorization: Bearer {token}"]
            names = list(speeds)
            ca = ["--cacert", str(self.ca.ca_pem)]
            urls = {
                names[0]: (f"http://{LOOPBACK}:{nginx_port}/{relpath}", []),
                names[1]: (r.header("Location"), []),
                names[2]: (f"{redirect.url}{path}", ["-L", *auth]),
                names[3]: (f"https://{LOOPBACK}:{nginx_tls}/{relpath}", ca),
                names[4]: (r_tls.header("Location"), ca),
                names[5]: (f"{tls_proxy.url}{path}", ["-L", *ca, *auth]),
                names[6]: (f"{through.url}{path}", [*ca, *auth]),
            }
            for name, (url, headers) in urls.items():
                speeds[name].append(_curl_speed(name, [*headers, url]))
        return speeds

    def behind_balancer(self, reps: int, speeds: dict[str, list[float]]) -> None:
        """Production's shape: HAProxy (deploy/haproxy.cfg) ends TLS in front of the
        proxy, so the blob server has no certificate clients trust. Hits relayed by the
        proxy (serve=auto) against 307s to /blobs/ that HAProxy routes to the blob
        server (serve=public, RR_BLOBS), and distribution's cache behind the same
        configuration (plain HTTP behind it, as the proxy is): skopeo warm pulls taking
        turns, and the hit blob fetched with curl -L through each of ours (added to
        `speeds`)."""
        from tests.e2e.haproxy import HAProxy

        cache = self.fresh("cache")
        trusted = ["--set", f"registry_trusted_proxies={LOOPBACK}/32"]
        relayed = self.proxy(cache, *trusted)
        blob_port = free_port()
        public = self.proxy(
            cache, *trusted, "--set", "registry_cache_serve=public", cache_port=blob_port
        )
        ours = {
            "relayed by the proxy (serve=auto)": HAProxy(self.ca, [relayed.host] * 3),
            PUBLIC: HAProxy(self.ca, [public.host] * 3, [f"{LOOPBACK}:{blob_port}"] * 3),
        }
        # name: (balancer, repository, credentials)
        balancers = {name: (ha, CLIENT_REPO, ALICE) for name, ha in ours.items()}
        if not self.args.no_distribution:
            health = ("/v2/", "rstatus ^(200|401)$")  # 401 where its clients log in
            for name, tokens, creds in (
                ("distribution", None, None),
                ("distribution+login", self.tokens, ALICE),
            ):
                d = self.pull_through(tls=False, tokens=tokens)
                ha = HAProxy(self.ca, [d.host] * 3, health=health)
                balancers[name] = (ha, UPSTREAM_REPO, creds)
        for ha, *_ in balancers.values():
            ha.start()
            self.stack.callback(ha.cleanup)
        first = next(iter(ours))
        for name, (ha, repo, creds) in balancers.items():
            if name in ours and name != first:
                continue  # ours share one cache: one cold pull fills it
            variant = "behind HAProxy, cold" if name in ours else f"{name} behind HAProxy, cold"
            self.pull("skopeo", variant, ha.host, repo, True, creds)
        time.sleep(0.5)  # the last blob's rename
        runs: dict[str, list[float]] = {name: [] for name in balancers}
        moved = dict.fromkeys(balancers, 0)
        for _ in range(self.args.warm_reps):
            for name, (ha, repo, creds) in balancers.items():
                seconds, link_bytes = self.timed("skopeo", ha.host, repo, True, creds)
                runs[name].append(seconds)
                moved[name] += link_bytes
        for name in balancers:
            self.record("skopeo", f"warm behind HAProxy, {name}", runs[name], moved[name])
        path, scopes = self.big
        ca = ["--cacert", str(self.ca.ca_pem)]
        tokens = {}
        for name, ha in ours.items():
            client = RegistryHTTP(ha.url, ALICE, self.ca.client_context(), timeout=300)
            assert client.request("GET", path, scopes=scopes).status in (200, 307)
            tokens[name] = client._tokens[tuple(scopes)]
            speeds[f"https: HAProxy, {name}"] = []
        time.sleep(0.5)
        for _ in range(reps):
            for name, ha in ours.items():
                auth = ["-H", f"Authorization: Bearer {tokens[name]}"]
                speed = _curl_speed(name, ["-L", *ca, *auth, f"{ha.url}{path}"])
                speeds[f"https: HAProxy, {name}"].append(speed)


def at_once(work, n: int, timeout: float = 900) -> float:
    """Seconds until `n` threads running `work()` together have all returned; the first
    error any of them raised is raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # raised below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def _curl_speed(name: str, args: list[str]) -> float:
    """MB/s of one download with curl (which must answer 200)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out[0] == "200", (name, out)
    return float(out[1]) / 1e6


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def report(bench: Bench, speeds: dict[str, list[float]], args) -> str:
    lines = [
        "# Blob cache benchmark (bench/cache.py)",
        "",
        f"Image: {bench.image_bytes / MiB:.1f} MiB in 4 layers + config. Link: "
        f"{args.rate / 1e6:g} MB/s shared, {args.delay * 1000:g} ms per new connection "
        "(tests/e2e/throttle.py), in front of distribution 2.8 (TLS, token auth). "
        f"Machine: {os.cpu_count()} cores, shared. One run, {_now()}. Warm rows: median of "
        f"{args.warm_reps} pulls, the variants taking turns, each into a fresh destination "
        "(ctr: a fresh containerd; `ctr` unpacks, `ctr fetch` only fetches).",
        "",
        "| client | variant | seconds | runs | MiB over the link per pull | × image |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in bench.rows:
        per_pull = r["link_bytes"] / len(r["runs"])
        lines.append(
            f"| {r['client']} | {r['variant']} | {r['seconds']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in r['runs'])} | "
            f"{per_pull / MiB:.1f} | {r['link_x_image']:.2f} |"
        )
    if speeds:
        lines += [
            "",
            f"Hit throughput, one {bench.hit_blob_size / MiB:.0f} MiB blob, curl, "
            f"MB/s (median of {len(next(iter(speeds.values())))}, taken in turns; all values):",
            "",
            "| served by | median MB/s | all |",
            "|---|---:|---|",
        ]
        for name, values in speeds.items():
            lines.append(
                f"| {name} | {statistics.median(values):.0f} | "
                + ", ".join(f"{v:.0f}" for v in values)
                + " |"
            )
    lines += ["", "## Targets of issue 14, this run", "", "| target | measured | met? |"]
    lines += ["|---|---|---|", *targets(bench, speeds)]
    return "\n".join(lines) + "\n"


def paired(ours: list[float], theirs: list[float], higher_is_better: bool) -> str:
    """The rounds taken in turns compared one by one: on a shared machine the medians of
    two close variants swap places from run to run, while the per-round comparison
    says whether one is steadily ahead or the two are level within the noise."""
    pairs = list(zip(ours, theirs, strict=True))
    if higher_is_better:
        ratios = [a / b for a, b in pairs if b]
    else:
        ratios = [b / a for a, b in pairs if a]
    wins = sum(r >= 1 for r in ratios)
    return f"ahead in {wins} of {len(ratios)} rounds, median ratio {statistics.median(ratios):.2f}"


def targets(bench: Bench, speeds: dict[str, list[float]]) -> list[str]:
    """The issue's targets, computed from this run's rows (nothing typed in by hand)."""
    seconds = {(r["client"], r["variant"]): r["seconds"] for r in bench.rows}
    runs = {(r["client"], r["variant"]): r["runs"] for r in bench.rows}
    lines = []
    for client in ("skopeo", "ctr", "ctr fetch"):
        cold = seconds.get((client, "proxy+cache cold"))
        warm = seconds.get((client, "proxy+cache warm"))
        floor = seconds.get((client, "registry, no link (floor)"))
        if cold is None or warm is None:
            continue
        ratio = cold / warm
        lines.append(
            f"| {client}: warm ≥ 10 × faster than cold | {cold:.2f} → {warm:.2f} s "
            f"({ratio:.2f} ×; the registry itself without the link: {floor:.2f} s) | "
            f"{'yes' if ratio >= 10 else 'no'} |"
        )
        for variant, note in (
            ("distribution warm", "its clients without login"),
            ("distribution+login warm", "its clients log in too"),
        ):
            theirs = seconds.get((client, variant))
            if theirs is not None:
                rounds = paired(runs[client, "proxy+cache warm"], runs[client, variant], False)
                lines.append(
                    f"| {client}: warm ≤ distribution's warm, same run ({note}) | "
                    f"{warm:.2f} vs {theirs:.2f} s (medians; {rounds}) | "
                    f"{'yes' if warm <= theirs else 'no'} |"
                )
    served = runs.get(("skopeo", f"warm behind HAProxy, {PUBLIC}"))
    for variant, note in (
        ("distribution", "its clients without login"),
        ("distribution+login", "its clients log in too"),
    ):
        theirs = runs.get(("skopeo", f"warm behind HAProxy, {variant}"))
        if served and theirs:
            a, b = statistics.median(served), statistics.median(theirs)
            lines.append(
                f"| skopeo behind the same HAProxy: warm ≤ distribution's warm ({note}) | "
                f"{a:.2f} vs {b:.2f} s (medians; {paired(served, theirs, False)}) | "
                f"{'yes' if a <= b else 'no'} |"
            )
    for scheme in ("http", "https"):
        nginx = [v for k, v in speeds.items() if k.startswith(f"{scheme}: nginx")]
        ours = [v for k, v in speeds.items() if k.startswith(f"{scheme}: blob server")]
        if nginx and ours:
            a, b = statistics.median(ours[0]), statistics.median(nginx[0])
            rounds = paired(ours[0], nginx[0], True)
            lines.append(
                f"| hit throughput ≥ nginx serving the file ({scheme}) | blob server "
                f"{a:.0f} vs nginx {b:.0f} MB/s (medians; {rounds}) | "
                f"{'yes' if a >= b else 'no'} |"
            )
    for r in bench.rows:
        if r["variant"].endswith("concurrent cold"):
            lines.append(
                f"| {r['variant']} pulls cross the link ≤ 1.1 × once | "
                f"{r['link_x_image']:.2f} × | {'yes' if r['link_x_image'] <= 1.1 else 'no'} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--rate", type=float, default=25e6, help="link bytes/s")
    ap.add_argument("--delay", type=float, default=0.02, help="seconds per new connection")
    ap.add_argument("--no-ctr", action="store_true")
    ap.add_argument("--no-distribution", action="store_true")
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--hit-reps", type=int, default=11)
    ap.add_argument("--warm-reps", type=int, default=7, help="warm pulls per variant")
    ap.add_argument("--hit-mib", type=int, default=128, help="blob size for hit throughput")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--no-balancer", action="store_true", help="skip the HAProxy rows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp, contextlib.ExitStack() as s:
        bench = Bench(args, s, Path(tmp))
        bench.setup()
        print(f"image {bench.image_bytes / MiB:.1f} MiB; pulls:")
        bench.pulls("skopeo")
        if not args.no_ctr:
            bench.pulls("ctr")
            bench.pulls("ctr fetch")
        if args.concurrent:
            bench.concurrent(args.concurrent)
        speeds = bench.hit_throughput(args.hit_reps) if args.hit_reps else {}
        if args.hit_reps and not args.no_balancer:
            bench.behind_balancer(args.hit_reps, speeds)
        text = report(bench, speeds, args)
    print(text)
    if not args.no_write:
        write_keeping_reading(RESULTS, text)
        print(f"written to {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
