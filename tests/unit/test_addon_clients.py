"""Addon behaviour that real clients depend on, found by the client tests through the proxy
(tests/e2e/test_*_proxy.py).

Cross-repository mounts whose source no rule maps. containerd labels pulled layers with the
repository they came from and, on push to the same host, asks to mount from there
(`POST .../blobs/uploads/?mount=D&from=SRC`). If SRC is a name the rules no longer map (the
rules changed since the pull), the proxy used to refuse the POST with 404 NAME_UNKNOWN, and
containerd 1.6 fails the whole push on anything but 201, 202 or 401 ("unexpected status:
404 Not Found"). A registry that cannot mount starts a plain upload (202) instead, which is
what the proxy now asks the upstream for: `mount` and `from` are dropped, so the client's
name still never goes upstream. (e2e: test_containerd_proxy.py::
test_ctr_push_mounting_from_a_name_the_rules_no_longer_map.)
"""

import pytest
from mitmproxy.test import taddons, tflow, tutils

import registry_rewrite

RULES = """
token_path: /auth
unmatched: deny
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
  - client: "{name}"
    upstream: "library/{name}"
"""


@pytest.fixture
def addon(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    addon = registry_rewrite.RegistryRewrite()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(path))
        yield addon


def upload_start(path: str):
    """A POST as reverse mode hands it to the addon: already aimed at the upstream."""
    req = tutils.treq(
        method=b"POST",
        scheme=b"https",
        host="upstream.test",
        port=443,
        path=path.encode(),
        headers=[(b"host", b"upstream.test")],
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.sockname = ("127.0.0.1", 5000)
    return f


@pytest.mark.parametrize(
    "source",
    [
        "other%2Fx",  # a name no rule maps (unmatched: deny)
        "acme_team%2Fbase",  # an upstream name is not a client name
        "library%2Fdeep%2Fx",
        "..%2Fx",  # not a repository name at all
        "Team%2FBase",
        "",
    ],
)
def test_mount_from_outside_the_rules_becomes_a_plain_upload(addon, source):
    f = upload_start(f"/v2/team/app/blobs/uploads/?mount=sha256%3Aab&from={source}")
    addon.requestheaders(f)
    assert f.response is None  # not refused: the upstream starts an upload session
    assert f.request.path == "/v2/acme_team/app/blobs/uploads/"
    assert "mount from outside the rules dropped" in f.comment


def test_other_query_parameters_stay_when_the_mount_is_dropped(addon):
    f = upload_start("/v2/nginx/blobs/uploads/?x=1&mount=sha256%3Aab&from=other%2Fx&digest=d")
    addon.requestheaders(f)
    assert f.response is None
    assert f.request.path == "/v2/library/nginx/blobs/uploads/?x=1&digest=d"


def test_mount_from_a_mapped_source_is_kept_and_mapped(addon):
    f = upload_start("/v2/team/app/blobs/uploads/?mount=sha256%3Aab&from=team%2Fbase")
    addon.requestheaders(f)
    assert f.response is None
    assert f.request.path == (
        "/v2/acme_team/app/blobs/uploads/?mount=sha256%3Aab&from=acme_team%2Fbase"
    )


def test_mount_into_a_name_no_rule_maps_is_still_refused(addon):
    f = upload_start("/v2/other/app/blobs/uploads/?mount=sha256%3Aab&from=team%2Fbase")
    addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 404
    assert b"NAME_UNKNOWN" in f.response.content
