import pytest
from hypothesis import given
from hypothesis import strategies as st

from regrewrite.auth import (
    Challenge,
    Scope,
    form_values,
    format_challenges,
    map_scopes,
    parse_challenges,
    parse_scope,
    replace_form_values,
    rewrite_challenge,
)


def to_upstream(name):
    return {"team/app": "acme_team/app", "team/base": "acme_team/base"}.get(name)


def to_client(name):
    return {"acme_team/app": "team/app", "acme_team/base": "team/base"}.get(name)


@pytest.mark.parametrize(
    "text, scope",
    [
        ("repository:team/app:pull", Scope("repository", "team/app", "pull")),
        ("repository:team/app:pull,push", Scope("repository", "team/app", "pull,push")),
        (
            "repository:localhost:5000/team/app:pull",
            Scope("repository", "localhost:5000/team/app", "pull"),
        ),
        ("repository(plugin):team/app:pull", Scope("repository(plugin)", "team/app", "pull")),
        ("registry:catalog:*", Scope("registry", "catalog", "*")),
    ],
)
def test_parse_scope(text, scope):
    assert parse_scope(text) == scope
    assert str(scope) == text


@pytest.mark.parametrize(
    "text", ["", "repository", "repository:x", ":x:pull", "a::b", "a:b:", "a:b c:d"]
)
def test_parse_scope_refuses(text):
    with pytest.raises(ValueError, match="scope"):
        parse_scope(text)


def test_map_scopes_maps_each_and_drops_unmapped():
    result = map_scopes(
        "repository:team/app:pull,push repository:team/base:pull registry:catalog:* "
        "repository:secret/x:pull junk",
        to_upstream,
    )
    assert result.value == (
        "repository:acme_team/app:pull,push repository:acme_team/base:pull registry:catalog:*"
    )
    assert len(result.mapped) == 2
    assert result.dropped == ("repository:secret/x:pull", "junk")


def test_map_scopes_plugin_type():
    assert map_scopes("repository(plugin):team/app:pull", to_upstream).value == (
        "repository(plugin):acme_team/app:pull"
    )


def test_replace_form_values_keeps_other_fields_byte_exact():
    body = (
        "grant_type=refresh_token&refresh_token=abc%2Bdef&service=registry.docker.io"
        "&scope=repository%3Ateam%2Fapp%3Apull%2Cpush+repository%3Ateam%2Fbase%3Apull&client_id=ctr"
    )
    out = replace_form_values(body, "scope", lambda v: map_scopes(v, to_upstream).value)
    assert out.startswith(
        "grant_type=refresh_token&refresh_token=abc%2Bdef&service=registry.docker.io&scope="
    )
    assert out.endswith("&client_id=ctr")
    assert form_values(out, "scope") == [
        "repository:acme_team/app:pull,push repository:acme_team/base:pull"
    ]


def test_replace_form_values_several_scope_params_and_drop():
    query = "service=s&scope=repository:team/app:pull&scope=repository:secret/x:pull&account=a"
    out = replace_form_values(query, "scope", lambda v: map_scopes(v, to_upstream).value or None)
    assert out == "service=s&scope=repository:acme_team/app:pull&account=a"


def test_parse_challenges_quoted_commas_and_several():
    header = (
        'Bearer realm="https://auth.example/token",service="registry.aliyuncs.com:cn-shenzhen:1",'
        'scope="repository:acme_team/app:pull,push",error="insufficient_scope", '
        'Basic realm="Registry Realm"'
    )
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "Bearer"
    assert bearer.get("realm") == "https://auth.example/token"
    assert bearer.get("scope") == "repository:acme_team/app:pull,push"
    assert bearer.get("error") == "insufficient_scope"
    assert basic == Challenge("Basic", (("realm", "Registry Realm"),))


def test_parse_challenges_token68_and_escapes():
    a, b = parse_challenges('Negotiate abc==, Bearer realm="a\\"b"')
    assert a == Challenge("Negotiate", (), "abc==")
    assert b.get("realm") == 'a"b'


def test_rewrite_challenge_points_at_proxy_and_maps_scope():
    header = (
        'Bearer realm="https://auth.example/token",service="svc",'
        'scope="repository:acme_team/app:pull,push repository:acme_team/base:pull"'
    )
    out = rewrite_challenge(header, "http://127.0.0.1:5000/auth", to_client)
    assert out.realm == "https://auth.example/token"
    assert out.service == "svc"
    (c,) = parse_challenges(out.header)
    assert c.get("realm") == "http://127.0.0.1:5000/auth"
    assert c.get("service") == "svc"
    assert c.get("scope") == "repository:team/app:pull,push repository:team/base:pull"
    assert [k for k, _ in c.params] == ["realm", "service", "scope"]


def test_rewrite_challenge_service_override_and_basic_untouched():
    out = rewrite_challenge(
        'Basic realm="x", Bearer realm="r",service="s"', "https://p/auth", to_client, "svc2"
    )
    basic, bearer = parse_challenges(out.header)
    assert basic.get("realm") == "x"
    assert bearer.get("service") == "svc2"


tokens = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True)
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
challenges = st.builds(
    Challenge,
    scheme=tokens,
    params=st.lists(st.tuples(tokens, values), min_size=1, max_size=4).map(tuple),
)
scope_names = st.from_regex(
    r"([a-z0-9]+(:[0-9]{1,5})?/)?[a-z0-9]+(/[a-z0-9._-]+){0,3}", fullmatch=True
)


@given(st.lists(challenges, min_size=1, max_size=3))
def test_challenges_round_trip(cs):
    assert parse_challenges(format_challenges(cs)) == cs


@given(
    st.sampled_from(["repository", "repository(plugin)", "registry"]),
    scope_names,
    st.sampled_from(["pull", "pull,push", "*", "delete"]),
)
def test_scope_round_trip(type_, name, actions):
    text = f"{type_}:{name}:{actions}"
    assert str(parse_scope(text)) == text
    assert parse_scope(text).name == name


@given(st.lists(st.sampled_from(["team/app", "team/base", "secret/x"]), min_size=1, max_size=5))
def test_mapped_scopes_only_name_allowed_repositories(names):
    value = " ".join(f"repository:{n}:pull" for n in names)
    result = map_scopes(value, to_upstream)
    for text in result.value.split():
        assert parse_scope(text).name in ("acme_team/app", "acme_team/base")


@pytest.mark.parametrize(
    "actions, allowed, expected",
    [
        ("*", frozenset({"pull", "push", "delete"}), "*"),  # skopeo delete asks for "*"
        ("*", frozenset({"pull"}), ""),
        ("pull,push", frozenset({"pull"}), "pull"),
        ("pull,delete,metadata_read", frozenset({"pull", "push"}), "pull,metadata_read"),
        ("pull,push", None, "pull,push"),
    ],
)
def test_narrow_actions(actions, allowed, expected):
    from regrewrite.auth import narrow_actions

    assert narrow_actions(actions, allowed) == expected
