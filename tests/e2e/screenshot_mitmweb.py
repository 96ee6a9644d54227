"""Screenshot of mitmweb during a push, for the README (docs/mitmweb-push.png).

    .venv/bin/python -m tests.e2e.screenshot_mitmweb [--output docs/mitmweb-push.png]
        [--select auth|token|manifest|denied] [--keep]

Starts everything on 127.0.0.1 (test CA, token server, distribution registry, mitmweb
with the addon and the rules `team/{r:path}` -> `acme_team/{r:path}`), has skopeo try a
push to an unmapped name (refused: marked ⛔) and one as bob, who may only pull (401
insufficient_scope: marked 🔒), then push as alice, and has headless Chromium (Debian's
`chromium` package) open mitmweb with one flow selected and save a PNG. Marks show as
emoji with `fonts-noto-color-emoji` installed. `--keep` leaves it all running afterwards
and prints the mitmweb URL, to look around by hand (Ctrl-C stops it).

Needs: docker-registry, skopeo, chromium (`apt-get install chromium`), and root or
unprivileged user namespaces for skopeo's private blob-info cache (see upstream.Skopeo).
Not part of CI: it only makes a picture.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.images import build_image
from tests.e2e.mitmweb import Mitmweb
from tests.e2e.upstream import (
    ALICE,
    BOB,
    REPO_ROOT,
    Registry,
    Skopeo,
    SkopeoError,
    TestCA,
    TokenServer,
    default_acl,
)

RULES = """\
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""
COLUMNS = ("method", "status", "path", "comment", "time")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,900",
    # Let mitmweb's JavaScript load the flows and render the detail pane first.
    "--virtual-time-budget=10000",
)


def pick_flow(flows: list[dict], select: str) -> dict:
    def first(pred) -> dict:
        return next(f for f in flows if pred(f))

    if select == "auth":
        return first(lambda f: "insufficient_scope" in f["comment"])
    if select == "token":
        return first(
            lambda f: f["comment"].startswith("token:") and "team/demo/app" in f["comment"]
        )
    if select == "manifest":
        return first(lambda f: "manifests PUT" in f["comment"])
    return first(lambda f: f["comment"].startswith("denied:"))


def screenshot(url: str, output: Path, chromium: str) -> None:
    profile = Path(tempfile.mkdtemp(prefix="mitmweb-shot-chromium-"))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={output}",
                url,
            ],
            check=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "mitmweb-push.png")
    parser.add_argument(
        "--select",
        choices=("auth", "token", "manifest", "denied"),
        default="auth",
        help="the flow shown in the detail pane (default: the push refused for scope)",
    )
    parser.add_argument("--keep", action="store_true", help="keep running; print the URL")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium not installed (apt-get install chromium)")

    ca = TestCA().start()
    token_server = TokenServer(ca, default_acl()).start()
    registry = Registry(ca, token_server).start()
    columns = [a for c in COLUMNS for a in ("--set", f"web_columns={c}")]
    web = Mitmweb(registry.url, ca, RULES, extra_args=columns).start()
    skopeo = Skopeo(ca)
    work = Path(tempfile.mkdtemp(prefix="mitmweb-shot-"))
    try:
        image = build_image(work / "image", layers=1, layer_size=300_000)
        dest = f"docker://{web.host}/team/demo/app:1.0"
        # The refused pushes first, so their flows are at the top of the list.
        for ref, creds in ((f"docker://{web.host}/other/app:1.0", ALICE), (dest, BOB)):
            try:
                skopeo.copy(image.ref, ref, dest_creds=creds, tls_verify=False)
            except SkopeoError:
                pass  # refused, as intended: the picture shows why
        skopeo.copy(image.ref, dest, dest_creds=ALICE, tls_verify=False)
        time.sleep(1)  # the last flows finish in mitmweb
        flow = pick_flow(web.api.flows(), args.select)
        url = f"{web.login_url}#/flows/{flow['id']}/response?h=~marked"
        screenshot(url, args.output, chromium)
        print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")
        if args.keep:
            print(f"mitmweb: {url}\nCtrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        skopeo.cleanup()
        web.cleanup()
        registry.cleanup()
        token_server.stop()
        ca.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
