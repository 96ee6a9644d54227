"""Streaming, end to end: a 1 GiB blob goes up and comes back down through mitmdump with
the addon while mitmdump's peak RSS stays under 150 MB in each direction (issue 2,
"What must work" 5).  The blob is streamed from and to disk on the client side, its
digest checked at both ends, and the registry is read directly to confirm it landed
under the upstream name.
"""

from __future__ import annotations

import pytest

from tests.e2e.blobstream import (
    BlobClient,
    fetch_token,
    make_blob_file,
    peak_rss,
    reset_peak_rss,
)
from tests.e2e.upstream import ALICE

BLOB_SIZE = 1 << 30  # 1 GiB
RSS_LIMIT = 150 * 10**6  # bytes: "under 150 MB"

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
"""


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("big-blob") / "blob.bin"
    digest = make_blob_file(path, BLOB_SIZE)
    yield path, digest
    path.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_1gib_blob_push_and_pull_keep_mitmdump_under_150mb(
    ca, token_server, registry, proxy, unique, big_blob
):
    path, digest = big_blob
    client_name, upstream_name = f"team/big-{unique}", f"acme_team/big-{unique}"
    m = proxy(RULES)
    pid = m.proc.pid
    ctx = ca.client_context()
    token = fetch_token(
        f"{m.url}/auth",
        [f"repository:{client_name}:pull,push"],
        service=registry.service,
        creds=ALICE,
        ssl_context=ctx,
    )
    client = BlobClient(m.url, ssl_context=ctx, token=token, timeout=120)
    registry.mark()

    # Up: POST + one PUT of the whole file through the proxy (the registry checks the
    # digest; upload() checks the Docker-Content-Digest it answers with).
    reset_peak_rss(pid)  # where not permitted, the lifetime peak is checked: stricter
    up = client.upload(client_name, path, digest)
    up_peak = peak_rss(pid)

    # The upstream got it under the mapped name, and only that name.
    uris = [uri for _, uri in registry.requests(since_mark=True)]
    assert any(uri.startswith(f"/v2/{upstream_name}/blobs/uploads/") for uri in uris), uris
    assert all(uri.startswith(f"/v2/{upstream_name}/") for uri in uris if uri != "/v2/"), uris
    direct = BlobClient(
        registry.url,
        ssl_context=ctx,
        token=fetch_token(
            token_server.realm,
            [f"repository:{upstream_name}:pull"],
            service=registry.service,
            creds=ALICE,
            ssl_context=ctx,
        ),
    )
    resp, _ = direct.request("HEAD", f"/v2/{upstream_name}/blobs/{digest}")
    direct.close()
    assert resp.status == 200
    assert resp.getheader("Docker-Content-Digest") == digest
    assert int(resp.getheader("Content-Length")) == BLOB_SIZE

    # Down: GET through the proxy, hashed block by block (download() checks the digest).
    reset_peak_rss(pid)
    down = client.download(client_name, digest, BLOB_SIZE)
    down_peak = peak_rss(pid)
    client.close()

    print(
        f"\n1 GiB through mitmdump+addon: up {up.mb_per_s:.0f} MB/s, peak RSS "
        f"{up_peak / 1e6:.0f} MB; down {down.mb_per_s:.0f} MB/s, peak RSS {down_peak / 1e6:.0f} MB"
    )
    assert up_peak < RSS_LIMIT, f"mitmdump peak RSS {up_peak / 1e6:.0f} MB during the push"
    assert down_peak < RSS_LIMIT, f"mitmdump peak RSS {down_peak / 1e6:.0f} MB during the pull"
