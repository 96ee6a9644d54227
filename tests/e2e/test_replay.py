"""Replaying recorded flows (issue 12) with mitmproxy's own replay machinery: a pull
recorded by mitmdump (`-w`) is replayed by a fresh `mitmdump -n -C FILE` with the addon,
under a rule that is not idempotent (`{namespace}` -> `acme_{namespace}`), so a path
mapped twice would show as `acme_acme_...` in the registry's log. The in-process replay
of authenticated flows (mitmweb's Replay button) is in test_mitmweb.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mitmproxy import io

from tests.e2e.upstream import ADDON_SCRIPT, ALICE

SEED_RULES = """
rules:
  - client: "{namespace}/{repository:path}"
    upstream: "acme_{namespace}/{repository:path}"
"""
# The same client names, moved: what an edit of rules.yaml between recording and replay
# does to the upstream's view.
MOVED_RULES = SEED_RULES.replace('"acme_{namespace}', '"moved_{namespace}')


def read_flows(path: Path) -> list:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def replay(ca, registry, flows: Path, rules: Path, out: Path) -> subprocess.CompletedProcess:
    """`mitmdump -n -C FLOWS` with the addon: replays every flow, then exits."""
    mitmdump = Path(sys.executable).parent / "mitmdump"
    return subprocess.run(
        [
            str(mitmdump),
            "-n",
            "-C",
            str(flows),
            "-w",
            str(out),
            "-s",
            str(ADDON_SCRIPT),
            "--set",
            f"registry_rules={rules}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={ca.ca_pem}",
            "--set",
            f"confdir={out.parent / 'confdir'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_saved_flows_replay_in_a_new_process_mapped_once_with_the_rules_in_force(
    ca, registry, token_server, proxy, skopeo, make_image, unique, tmp_path
):
    recorded = tmp_path / "recorded.flows"
    p = proxy(SEED_RULES, extra_args=["-w", str(recorded)])
    image = make_image(layers=1)
    ref = f"docker://{p.host}/team/{unique}/app:1.0"
    skopeo.copy(image.ref, ref, dest_creds=ALICE, tls_verify=False)
    assert skopeo.inspect(ref, creds=ALICE, tls_verify=False)["Digest"] == image.digest
    p.stop()
    flows = read_flows(recorded)
    manifest_gets = [
        f for f in flows if f.request.method == "GET" and "/manifests/1.0" in f.request.path
    ]
    assert manifest_gets, [f.request.path for f in flows]
    # The recorded flows show the client's request line; the comment says where it went.
    for f in manifest_gets:
        assert f.request.path == f"/v2/team/{unique}/app/manifests/1.0"
        assert f"→ acme_team/{unique}/app" in f.comment
        assert ALICE[1] not in repr(f.get_state())

    rules = tmp_path / "rules.yaml"
    rules.write_text(SEED_RULES)
    registry.mark()
    token_server.clear_requests()
    out = tmp_path / "replayed.flows"
    done = replay(ca, registry, recorded, rules, out)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = [e.path for e in registry.access_log(since_mark=True)]
    assert f"/v2/acme_team/{unique}/app/manifests/1.0" in seen, seen
    assert not any("acme_acme_" in path or f"/v2/team/{unique}" in path for path in seen), seen
    replayed = read_flows(out)
    # A saved flow keeps no credentials: the replay says so and gets the honest 401.
    again = [f for f in replayed if f.request.path == f"/v2/team/{unique}/app/manifests/1.0"]
    assert again and all(f.response.status_code == 401 for f in again)
    assert all(f.comment.startswith("replay without credentials") for f in again), [
        f.comment for f in again
    ]
    # A replayed token request fetches a fresh token from the realm (anonymously).
    assert token_server.requests(), "the token request was not replayed"
    assert all(ALICE[1] not in repr(r) for r in token_server.requests())

    # Edit the rules, replay the same file: the upstream sees the new mapping.
    rules.write_text(MOVED_RULES)
    registry.mark()
    done = replay(ca, registry, recorded, rules, tmp_path / "moved.flows")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = [e.path for e in registry.access_log(since_mark=True)]
    assert f"/v2/moved_team/{unique}/app/manifests/1.0" in seen, seen
    assert not any("acme_" in path for path in seen), seen
