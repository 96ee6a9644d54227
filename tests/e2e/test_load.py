"""Bounded load through one mitmdump, and rules reloads under fire (issue 6, items 6, 7).

Raw registry clients (`regclient.RegistryHTTP`, a new connection per request, a token
dance per image) run in a thread pool; a few skopeo runs are mixed in.  Every digest is
checked over the bytes, pushes once more straight against the upstream.  mitmdump's
VmRSS/VmHWM come from /proc.  Run with `pytest -s` to see the figures.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest

from tests.e2e.faultkit import cpu_seconds, pull_image, push_image, rss
from tests.e2e.images import ACCEPT_MANIFESTS, fetch_manifest
from tests.e2e.upstream import ALICE

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""

PULLS = 50  # concurrent pulls per round, of distinct images
PUSHES = 10  # concurrent pushes per round, of new distinct images
ROUNDS = int(os.environ.get("LOAD_ROUNDS", "4"))  # measured rounds after a warm-up round
PEAK_LIMIT_MB = 150
GROWTH_LIMIT_MB = 30


def _mb(kib: int) -> float:
    return kib / 1024


@pytest.mark.slow
def test_load_pulls_and_pushes_with_flat_memory(
    registry, proxy, http_client, make_image, skopeo, unique, tmp_path
):
    p = proxy(RULES)
    pid = p.proc.pid
    start_rss = rss(pid)
    direct = http_client(registry.url, ALICE)

    # Distinct images to pull, put straight into the upstream (not measured).
    pulled = [make_image(layers=1, layer_size=8192) for _ in range(PULLS)]
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda ix: push_image(direct, f"acme_team/{unique}/pull{ix[0]}", ix[1], tag="1"),
                enumerate(pulled),
            )
        )
    to_push = [
        [make_image(layers=1, layer_size=8192) for _ in range(PUSHES)] for _ in range(ROUNDS + 1)
    ]

    errors: list[str] = []
    counts = {"requests": 0, "pulls": 0, "pushes": 0, "skopeo": 0}
    lock = threading.Lock()

    def pull(i: int) -> None:
        client = http_client(p.url, ALICE)
        digest, n = pull_image(client, f"team/{unique}/pull{i}", "1")
        if digest != pulled[i].digest:
            raise AssertionError(f"pull{i}: {digest} != {pulled[i].digest}")
        with lock:
            counts["requests"] += n
            counts["pulls"] += 1

    def push(r: int, i: int) -> None:
        client = http_client(p.url, ALICE)
        push_image(client, f"team/{unique}/push{r}-{i}", to_push[r][i], tag="1")
        with lock:
            counts["requests"] += len(client.history)
            counts["pushes"] += 1

    def skopeo_push() -> None:
        image = make_image(layers=2, layer_size=20_000)
        dest = f"docker://{p.host}/team/{unique}/skopeo:1"
        skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
        assert fetch_manifest(direct, f"acme_team/{unique}/skopeo", "1").digest == image.digest
        with lock:
            counts["skopeo"] += 1

    def skopeo_pull() -> None:
        out = tmp_path / "skopeo-pulled"
        src = f"docker://{p.host}/team/{unique}/pull0:1"
        skopeo.copy(src, f"oci:{out}:x", src_creds=ALICE, tls_verify=False)
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == pulled[0].digest
        with lock:
            counts["skopeo"] += 1

    def run_round(r: int, n_pulls: int, extra=()) -> float:
        begin = time.monotonic()
        with ThreadPoolExecutor(n_pulls + PUSHES + len(extra)) as pool:
            futures = {pool.submit(pull, i): f"pull{i}" for i in range(n_pulls)}
            futures |= {pool.submit(push, r, i): f"push{r}-{i}" for i in range(PUSHES)}
            futures |= {pool.submit(fn): fn.__name__ for fn in extra}
            for future in as_completed(futures, timeout=300):
                try:
                    future.result()
                except Exception as e:  # collected: the test reports them all at once
                    with lock:
                        errors.append(f"round {r} {futures[future]}: {type(e).__name__}: {e}")
        return time.monotonic() - begin

    # Warm-up at full size: imports, caches, TLS contexts, and the memory a round of
    # this concurrency needs, so later growth means a leak.
    run_round(0, PULLS)
    baseline = rss(pid)
    samples = [baseline["VmRSS"]]
    durations = []
    first = counts["requests"]
    cpu = cpu_seconds(pid)
    begin = time.monotonic()
    for r in range(1, ROUNDS + 1):
        extra = (skopeo_push, skopeo_pull) if r == 1 else ()
        durations.append(run_round(r, PULLS, extra))
        samples.append(rss(pid)["VmRSS"])
    elapsed = time.monotonic() - begin
    cpu = cpu_seconds(pid) - cpu
    end = rss(pid)
    requests = counts["requests"] - first

    # Every pushed image is in the upstream under its mapped name, bytes verified.
    pushed = [(r, i) for r in range(ROUNDS + 1) for i in range(PUSHES)]

    def verify(ri) -> None:
        r, i = ri
        digest, _ = pull_image(direct, f"acme_team/{unique}/push{r}-{i}", "1")
        assert digest == to_push[r][i].digest, (r, i)

    with ThreadPoolExecutor(16) as pool:
        for ri, exc in zip(pushed, pool.map(_catching(verify), pushed), strict=True):
            if exc:
                errors.append(f"verify push{ri[0]}-{ri[1]}: {exc}")

    print(
        f"\nload: {ROUNDS} rounds of {PULLS} concurrent pulls + {PUSHES} concurrent pushes"
        f" (+2 skopeo runs) through one mitmdump on {os.cpu_count()} cores"
        f"\n  rounds: {', '.join(f'{d:.1f} s' for d in durations)}; total {elapsed:.1f} s,"
        f" {requests} client requests (tokens included), {requests / elapsed:.0f} req/s;"
        f" mitmdump used {cpu:.1f} CPU-s ({cpu / requests * 1000:.0f} ms per request)"
        f"\n  done: {counts['pulls']} pulls, {counts['pushes']} pushes, {counts['skopeo']} skopeo;"
        f" {len(pushed)} pushed images verified upstream; errors: {len(errors)}"
        f"\n  mitmdump RSS: start {_mb(start_rss['VmRSS']):.1f} MB, after warm-up"
        f" {_mb(baseline['VmRSS']):.1f} MB, per round"
        f" {' '.join(f'{_mb(s):.1f}' for s in samples[1:])} MB, end {_mb(end['VmRSS']):.1f} MB,"
        f" peak (VmHWM) {_mb(end['VmHWM']):.1f} MB"
    )
    assert errors == [], "\n".join(errors[:20])
    assert counts["pulls"] == (ROUNDS + 1) * PULLS
    assert counts["pushes"] == (ROUNDS + 1) * PUSHES and counts["skopeo"] == 2
    assert _mb(end["VmHWM"]) < PEAK_LIMIT_MB, end
    assert _mb(end["VmRSS"] - baseline["VmRSS"]) < GROWTH_LIMIT_MB, (baseline, samples, end)
    assert "Traceback" not in p.log_text()


def _catching(fn):
    def run(arg):
        try:
            fn(arg)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    return run


# --- rules reload under fire (item 6) ---------------------------------------------------

V1 = RULES
V2 = RULES + '  - client: "more/{r:path}"\n    upstream: "library/more/{r:path}"\n'
INVALID = (
    V2
    + '  - client: "only-invalid/{r:path}"\n    upstream: "library/onlyinvalid/{r:path}"\n'
    + '  - client: "{bad"\n    upstream: "library/bad"\n'
)
INVALID_LINE = INVALID.splitlines().index('  - client: "{bad"') + 1
V3 = V2 + '  - client: "third/{r:path}"\n    upstream: "library/third/{r:path}"\n'


def _write_atomically(path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _wait_for_log(p, needle: str, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while p.log_text().count(needle) < count:
        assert time.monotonic() < deadline, (
            f"no {count}x {needle!r} in log:\n{p.log_text()[-2000:]}"
        )
        time.sleep(0.1)


@pytest.mark.slow
def test_rules_reload_under_load(registry, proxy, http_client, make_image, unique, tmp_path):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(V1)
    p = proxy(rules_file=rules_file)
    direct = http_client(registry.url, ALICE)
    stable = [make_image(layers=1, layer_size=4096) for _ in range(4)]
    for i, image in enumerate(stable):
        push_image(direct, f"acme_team/{unique}/s{i}", image, tag="1")
    # Upstream repositories only the invalid version (and the later ones) would reach.
    extra = make_image(layers=1, layer_size=4096)
    for name in ("onlyinvalid", "more", "third"):
        push_image(direct, f"library/{name}/{unique}/x", extra, tag="1")

    stop = threading.Event()
    lock = threading.Lock()
    failures: list[str] = []
    tally = {"stable": 0, "only-invalid": 0}

    def worker(w: int) -> None:
        client = http_client(p.url, ALICE)
        n = 0
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            i = (w + n) % len(stable)
            name = f"team/{unique}/s{i}"
            method = "HEAD" if n % 2 else "GET"
            n += 1
            try:
                r = client.request(
                    method,
                    f"/v2/{name}/manifests/1",
                    headers={"Accept": ACCEPT_MANIFESTS},
                    scopes=[f"repository:{name}:pull"],
                )
                ok = r.status == 200 and r.header("Docker-Content-Digest") == stable[i].digest
                if ok and method == "GET":
                    ok = r.body == stable[i].manifest_bytes
                if not ok:
                    raise AssertionError(f"{method} {name}: {r.status} {r.body[:200]!r}")
                bad = f"only-invalid/{unique}/x"
                r = client.request(
                    "GET",
                    f"/v2/{bad}/manifests/1",
                    headers={"Accept": ACCEPT_MANIFESTS},
                    scopes=[f"repository:{bad}:pull"],
                )
                if r.status != 404 or r.json()["errors"][0]["code"] != "NAME_UNKNOWN":
                    raise AssertionError(f"{bad} answered {r.status}: {r.body[:200]!r}")
                with lock:
                    tally["stable"] += 1
                    tally["only-invalid"] += 1
            except Exception as e:
                with lock:
                    failures.append(f"worker {w} at {time.monotonic():.2f}: {e}")

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(6)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        _write_atomically(rules_file, V2)
        _wait_for_log(p, "reloaded", 1)
        time.sleep(1.5)
        _write_atomically(rules_file, INVALID)
        _wait_for_log(p, "previous rules stay in force", 1)
        time.sleep(2.5)  # a few more reload ticks with the invalid file in place
        _write_atomically(rules_file, V3)
        _wait_for_log(p, "reloaded", 2)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    elapsed = time.monotonic() - begin
    log = p.log_text()
    errors = [line for line in log.splitlines() if "previous rules stay in force" in line]
    print(
        f"\nreload under load: {elapsed:.1f} s, 6 threads, {tally['stable']} stable GET/HEADs"
        f" + {tally['only-invalid']} GETs of a name only the invalid rules map;"
        f" failures: {len(failures)}\n  invalid version reported as: {errors}"
    )
    assert failures == [], "\n".join(failures[:20])
    assert tally["stable"] >= 50, tally
    # Reported once, with file and line, and never in force.
    assert len(errors) == 1, errors
    assert f"{rules_file}:{INVALID_LINE}:" in errors[0], (INVALID_LINE, errors)
    # The valid versions did take effect (both added names work now).
    client = http_client(p.url, ALICE)
    for name in (f"more/{unique}/x", f"third/{unique}/x"):
        assert fetch_manifest(client, name, "1").digest == extra.digest
    assert "Traceback" not in log
