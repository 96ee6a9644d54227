"""Issue 14 item 8: HTTP/2 on mitmproxy's data path, measured.

    .venv/bin/python bench/http2.py          # ~2 minutes

Against the e2e registry (TLS, token auth) with one --size-mib blob:
- bare `mitmdump --mode reverse` (TLS to the client, the test CA's certificate) with
  curl speaking HTTP/2 and HTTP/1.1, and the same with `--set http2=false`;
- which protocol real clients negotiate with the proxy (skopeo, ctr), from a probe
  script logging each request's http_version.
Prints the figures and writes bench/results/http2.md. Loopback only, bounded repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.clients import Containerd  # noqa: E402
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
PROBE = Path(__file__).with_name("http2_probe.py")
MiB = 1 << 20


def curl(url: str, token: str, ca: Path, proto: str) -> tuple[str, float]:
    out = subprocess.run(
        ["curl", "-sS", proto, "--cacert", str(ca), "-o", "/dev/null"]
        + ["-H", f"Authorization: Bearer {token}"]
        + ["-w", "%{http_version} %{http_code} %{speed_download}", url],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out[1] == "200", out
    return out[0], float(out[2]) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
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
        digest = image.layers[0].digest
        scopes = ["repository:acme_team/h2:pull"]
        direct = RegistryHTTP(reg.url, ALICE, ca.client_context())
        direct.request("HEAD", f"/v2/acme_team/h2/blobs/{digest}", scopes=scopes)
        token = direct._tokens[tuple(scopes)]

        variants = {}
        for name, extra in (("default", []), ("http2=false", ["--set", "http2=false"])):
            m = Mitmdump(
                reg.url,
                ca,
                addon=None,
                tls=True,
                extra_args=["--set", "stream_large_bodies=1", *extra],
            ).start()
            s.callback(m.cleanup)
            variants[name] = m
        speeds: dict[str, list[float]] = {}
        negotiated: dict[str, str] = {}
        for _ in range(args.reps):
            for name, m in variants.items():
                for proto in ("--http2", "--http1.1"):
                    key = f"bare mitmdump {name}, curl {proto}"
                    version, mbs = curl(
                        f"{m.url}/v2/acme_team/h2/blobs/{digest}", token, ca.ca_pem, proto
                    )
                    negotiated[key] = version
                    speeds.setdefault(key, []).append(mbs)
            for proto in ("--http2", "--http1.1"):
                key = f"registry direct, curl {proto}"
                url = f"{reg.url}/v2/acme_team/h2/blobs/{digest}"
                version, mbs = curl(url, token, ca.ca_pem, proto)
                negotiated[key] = version
                speeds.setdefault(key, []).append(mbs)
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        lines += [
            "# HTTP/2 on mitmproxy's data path (bench/http2.py)",
            "",
            f"One {args.size_mib} MiB blob, TLS on both sides, curl to /dev/null; median of "
            f"{args.reps} in rotating order; 2 shared cores; {now}.",
            "",
            "| path | negotiated | median MB/s | all |",
            "|---|---|---:|---|",
        ]
        for key, values in speeds.items():
            lines.append(
                f"| {key} | HTTP/{negotiated[key]} | {statistics.median(values):.0f} | "
                + ", ".join(f"{v:.0f}" for v in values)
                + " |"
            )

        # Which protocol real clients speak to the proxy (addon + probe, TLS).
        p = Mitmdump(reg.url, ca, RULES, tls=True, extra_args=["-s", str(PROBE)]).start()
        s.callback(p.cleanup)
        skopeo = Skopeo(ca, directory=work / "skopeo")
        skopeo.inspect(f"docker://{p.host}/team/h2:v1", creds=ALICE, tls_verify=True)
        with Containerd() as c:
            c.configure_host(p.host, ca=ca.ca_pem)
            c.pull(f"{p.host}/team/h2:v1", user=":".join(ALICE), timeout=300)
        seen = {}
        for line in p.log_text().splitlines():
            if "h2-probe" in line:
                _, agent, version = line.split("h2-probe", 1)[1].strip().split("|")
                seen.setdefault(agent.split("/")[0] or "?", set()).add(version)
        lines += ["", "Protocol real clients negotiated with the proxy over TLS (ALPN):", ""]
        for agent, versions in sorted(seen.items()):
            lines.append(f"- {agent}: {', '.join(sorted(versions))}")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
