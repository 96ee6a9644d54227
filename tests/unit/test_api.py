import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regrewrite.api import (
    Origin,
    RepositoryPath,
    parse_repository_path,
    query_value,
    registry_error,
    replace_query_value,
    rewrite_catalog,
    rewrite_errors,
    rewrite_link,
    rewrite_tags_list,
    rewrite_url,
)

UPSTREAM = Origin("https", "upstream.example", 443)
PUBLIC = Origin("http", "127.0.0.1", 5000)


def to_client(name):
    return {"acme_team/app": "team/app", "acme_team/tools/cli": "team/tools/cli"}.get(name)


@pytest.mark.parametrize(
    "path, name, kind, ref",
    [
        ("/v2/team/app/manifests/latest", "team/app", "manifests", "latest"),
        ("/v2/team/tools/cli/manifests/sha256:abc", "team/tools/cli", "manifests", "sha256:abc"),
        ("/v2/team/app/blobs/sha256:abc", "team/app", "blobs", "sha256:abc"),
        ("/v2/team/app/blobs/uploads/", "team/app", "blobs/uploads", ""),
        ("/v2/team/app/blobs/uploads/1234-ab", "team/app", "blobs/uploads", "1234-ab"),
        ("/v2/team/app/tags/list", "team/app", "tags/list", ""),
        ("/v2/team/app/referrers/sha256:abc", "team/app", "referrers", "sha256:abc"),
        ("/v2/a/manifests/manifests/latest", "a", "manifests", "manifests/latest"),
    ],
)
def test_parse_repository_path(path, name, kind, ref):
    repo = parse_repository_path(path)
    if kind == "manifests" and "/" in ref:  # the name may itself hold "manifests"
        assert repo == RepositoryPath("a/manifests", "/manifests/latest")
        return
    assert (repo.name, repo.kind, repo.reference) == (name, kind, ref)
    assert repo.path() == path


@pytest.mark.parametrize(
    "path", ["/v2/", "/v2/_catalog", "/v2/team/app", "/v2/team/app/other/x", "/auth"]
)
def test_not_repository_paths(path):
    assert parse_repository_path(path) is None


def test_query_values_keep_other_bytes():
    q = "mount=sha256%3Aabc&from=team%2Fapp&x=%20"
    assert query_value(q, "from") == "team/app"
    assert replace_query_value(q, "from", "acme_team/app") == (
        "mount=sha256%3Aabc&from=acme_team%2Fapp&x=%20"
    )


@pytest.mark.parametrize(
    "location, expected",
    [
        (
            "https://upstream.example/v2/acme_team/app/blobs/uploads/u1?_state=abc%3D",
            "http://127.0.0.1:5000/v2/team/app/blobs/uploads/u1?_state=abc%3D",
        ),
        (
            "https://upstream.example:443/v2/acme_team/tools/cli/manifests/sha256:1",
            "http://127.0.0.1:5000/v2/team/tools/cli/manifests/sha256:1",
        ),
        ("/v2/acme_team/app/blobs/sha256:1", "/v2/team/app/blobs/sha256:1"),
        (
            "https://storage.example/bucket/blob?X-Amz-Signature=1",
            "https://storage.example/bucket/blob?X-Amz-Signature=1",
        ),
        (
            "https://upstream.example:8443/v2/acme_team/app/blobs/sha256:1",
            "https://upstream.example:8443/v2/acme_team/app/blobs/sha256:1",
        ),
    ],
)
def test_rewrite_url(location, expected):
    assert rewrite_url(location, UPSTREAM, PUBLIC, to_client) == expected


@pytest.mark.parametrize(
    "location",
    [
        "/v2/unmapped/x/blobs/sha256:1",  # at the upstream, with no client name
        "https://upstream.example/v2/unmapped/x/blobs/uploads/u1",
        "http://[::1/v2/acme_team/app/blobs/sha256:1",  # urlsplit rejects it
        "https://upstream.example:99999/v2/acme_team/app/blobs/sha256:1",  # bad port
    ],
)
def test_rewrite_url_refuses_what_it_cannot_map(location):
    # Passed on as it is, each could hand the client an upstream name or address.
    with pytest.raises(ValueError):
        rewrite_url(location, UPSTREAM, PUBLIC, to_client)


def test_rewrite_url_catalog_last():
    out = rewrite_url(
        "/v2/_catalog?last=acme_team%2Fapp&n=2", UPSTREAM, PUBLIC, to_client, to_client
    )
    assert out == "/v2/_catalog?last=team%2Fapp&n=2"


def test_rewrite_link():
    link = '</v2/acme_team/app/tags/list?last=1.0&n=1>; rel="next"'
    assert rewrite_link(link, lambda u: rewrite_url(u, UPSTREAM, PUBLIC, to_client)) == (
        '</v2/team/app/tags/list?last=1.0&n=1>; rel="next"'
    )
    two = '<https://a/x>; rel="next", <https://a/y>; rel="prev"'
    assert rewrite_link(two, str.upper) == '<HTTPS://A/X>; rel="next", <HTTPS://A/Y>; rel="prev"'


def test_bodies():
    assert json.loads(rewrite_tags_list(b'{"name":"acme_team/app","tags":["1"]}', "team/app")) == {
        "name": "team/app",
        "tags": ["1"],
    }
    body = b'{"repositories":["acme_team/app","other/x","acme_team/tools/cli"]}'
    assert json.loads(rewrite_catalog(body, to_client)) == {
        "repositories": ["team/app", "team/tools/cli"]
    }
    err = {
        "errors": [
            {"code": "NAME_UNKNOWN", "message": "m", "detail": {"name": "acme_team/app"}},
            {
                "code": "UNAUTHORIZED",
                "message": "m",
                "detail": [{"Type": "repository", "Name": "acme_team/app", "Action": "push"}],
            },
            {"code": "BLOB_UNKNOWN", "message": "m", "detail": "sha256:1"},
        ]
    }
    out = json.loads(rewrite_errors(json.dumps(err).encode(), to_client))
    assert out["errors"][0]["detail"] == {"name": "team/app"}
    assert out["errors"][1]["detail"][0]["Name"] == "team/app"
    assert out["errors"][2]["detail"] == "sha256:1"
    for bad in (b"<html>", b'{"other": 1}', b"[1]", b"\xff\xfe"):
        with pytest.raises(ValueError):
            rewrite_errors(bad, to_client)
    # A name that maps back to nothing is left out, never passed as the upstream's.
    hidden = {"errors": [{"code": "NAME_UNKNOWN", "message": "m", "detail": {"name": "x/y"}}]}
    assert json.loads(rewrite_errors(json.dumps(hidden).encode(), to_client)) == {
        "errors": [{"code": "NAME_UNKNOWN", "message": "m", "detail": {}}]
    }


def test_registry_error_shape():
    doc = json.loads(registry_error("NAME_UNKNOWN", {"name": "x"}))
    assert doc == {
        "errors": [
            {
                "code": "NAME_UNKNOWN",
                "message": "repository name not known to registry",
                "detail": {"name": "x"},
            }
        ]
    }


@given(
    st.from_regex(r"[a-z0-9]+(/[a-z0-9]+){0,3}", fullmatch=True),
    st.sampled_from(
        [
            "/manifests/v1",
            "/blobs/sha256:00",
            "/blobs/uploads/",
            "/tags/list",
            "/referrers/sha256:0",
        ]
    ),
)
def test_path_round_trip(name, endpoint):
    repo = parse_repository_path(f"/v2/{name}{endpoint}")
    assert repo == RepositoryPath(name, endpoint)
