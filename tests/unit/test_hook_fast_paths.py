"""The shortcuts the hooks take for speed (bench/hookcost.py) change no outcome: a
response without Location, Link or WWW-Authenticate skips those rewrites, whatever the
case of the header names; the Bearer claims cache and the path-parse cache are shared
read-only values."""

from __future__ import annotations

import base64
import json

import pytest
from mitmproxy.http import Headers, Response

from tests.unit.test_addon import RULES, flow  # noqa: F401 (RULES: for the tctx fixture)


def _respond(f, status, fields):
    f.response = Response.make(status, b"")
    f.response.headers = Headers(fields)


@pytest.mark.parametrize("name", [b"Location", b"location", b"LOCATION"])
def test_location_is_rewritten_whatever_its_case(tctx, addon, name):
    f = flow("/v2/team/app/blobs/uploads/", "POST")
    addon.requestheaders(f)
    _respond(f, 202, [(name, b"https://upstream.test/v2/acme_team/app/blobs/uploads/u1?_state=s")])
    addon.responseheaders(f)
    assert f.response.headers["Location"] == (
        "http://127.0.0.1:5000/v2/team/app/blobs/uploads/u1?_state=s"
    )


def test_lowercase_challenge_and_link_are_rewritten(tctx, addon):
    f = flow("/v2/team/app/tags/list?n=1")
    addon.requestheaders(f)
    _respond(
        f,
        200,
        [
            (b"content-type", b"application/json"),
            (b"link", b'</v2/acme_team/app/tags/list?last=1.0&n=1>; rel="next"'),
        ],
    )
    addon.responseheaders(f)
    assert f.response.headers["Link"] == '</v2/team/app/tags/list?last=1.0&n=1>; rel="next"'

    f = flow("/v2/team/app/manifests/latest", "HEAD")
    addon.requestheaders(f)
    challenge = (
        b'Bearer realm="https://auth.test/token",service="s",scope="repository:acme_team/app:pull"'
    )
    _respond(f, 401, [(b"www-authenticate", challenge)])
    addon.responseheaders(f)
    value = f.response.headers["WWW-Authenticate"]
    assert 'realm="http://127.0.0.1:5000/auth"' in value
    assert "repository:team/app:pull" in value


def test_plain_blob_response_is_streamed_untouched(tctx, addon):
    f = flow("/v2/team/app/blobs/sha256:" + "ab" * 32)
    addon.requestheaders(f)
    fields = [(b"Content-Type", b"application/octet-stream"), (b"Content-Length", b"1073741824")]
    _respond(f, 200, fields)
    addon.responseheaders(f)
    assert f.response.stream
    assert f.response.headers.fields == tuple(fields)


def test_repeated_bearer_tokens_share_decoded_claims(tctx, addon):
    def b64(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    token = f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64({'sub': 'alice'})}.c2ln"
    flows = []
    for _ in range(2):
        f = flow("/v2/team/app/manifests/latest", headers=[("Authorization", f"Bearer {token}")])
        addon.requestheaders(f)
        _respond(f, 200, [(b"Content-Length", b"2")])
        addon.responseheaders(f)
        assert f.request.headers["Authorization"] == "Bearer <redacted>"
        flows.append(f)
    first, second = (f.metadata["registry_bearer"] for f in flows)
    assert first == second and first["claims"] == {"sub": "alice"}
