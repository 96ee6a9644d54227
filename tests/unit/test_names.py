import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regrewrite.names import (
    RuleSet,
    common_name,
    is_valid_name,
    parse_rule,
    parse_template,
)

component = st.from_regex(r"[a-z0-9]{1,6}([._-][a-z0-9]{1,6}){0,2}", fullmatch=True)
names = st.lists(component, min_size=1, max_size=4).map("/".join)


def ruleset(*pairs):
    return RuleSet(tuple(parse_rule(c, u, f"rule {i}") for i, (c, u) in enumerate(pairs, 1)))


@pytest.mark.parametrize(
    "name, valid",
    [
        ("team/app", True),
        ("a/b/c/d", True),
        ("a__b", True),
        ("a--b.c_d", True),
        ("Team/app", False),
        ("team//app", False),
        ("team/app/", False),
        ("-team", False),
        ("a___b", False),
        ("../etc", False),
        ("a" * 256, False),
        ("a" * 255, True),
        ("team/app\n", False),
        ("team%2fapp", False),
    ],
)
def test_is_valid_name(name, valid):
    assert is_valid_name(name) is valid


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "non-empty"),
        ("team/{r", "unbalanced"),
        ("team/r}", "unbalanced"),
        ("{a}{b}", "more than one placeholder"),
        ("{a}_{b}/x", "more than one placeholder"),
        ("{a:path}/{b:path}", "at most one"),
        ("{a}/{a}", "used twice"),
        ("{a:glob}", "unknown placeholder kind"),
        ("{1a}", "bad placeholder name"),
        ("team//{a}", "empty path component"),
        ("PREFIX_{a}", "characters a repository name cannot hold"),
        ("{r:path}_x", "must end its component"),
        ("Team", "characters a repository name cannot hold"),
    ],
)
def test_parse_template_refuses(text, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_template(text)
    assert repr(text) in str(e.value)


def test_parse_rule_placeholders_must_match():
    with pytest.raises(ValueError, match="only in client: ns"):
        parse_rule("{ns}/{r:path}", "acme/{r:path}", "rule 1")
    with pytest.raises(ValueError, match="':path' on one side only"):
        parse_rule("{r:path}", "library/{r}", "rule 1")


def test_first_match_wins_both_ways():
    rules = ruleset(
        ("team/{r:path}", "acme_team/{r:path}"),
        ("{name}", "library/{name}"),
        ("{ns}/{r:path}", "prefix_{ns}/{r:path}"),
    )
    assert rules.to_upstream("team/app") == "acme_team/app"
    assert rules.to_upstream("team/tools/cli") == "acme_team/tools/cli"
    assert rules.to_upstream("nginx") == "library/nginx"
    assert rules.to_upstream("other/x") == "prefix_other/x"
    assert rules.to_client("acme_team/tools/cli") == "team/tools/cli"
    assert rules.to_client("library/nginx") == "nginx"
    assert rules.to_client("prefix_other/x") == "other/x"
    assert rules.to_client("elsewhere/x") is None
    assert rules.to_upstream("Upper/x") is None


def test_shadowed_upstream_name_has_no_client_name():
    # prefix_team/app would map back to team/app, but team/app goes to acme_team/app.
    rules = ruleset(
        ("team/{r:path}", "acme_team/{r:path}"), ("{ns}/{r:path}", "prefix_{ns}/{r:path}")
    )
    assert rules.to_client("prefix_team/app") is None
    assert rules.to_client("acme_team/app") == "team/app"


def test_mapping_to_an_invalid_name():
    rules = ruleset(("x/{r:path}", "x-{r:path}"))
    assert rules.lookup("x/_a") is None  # invalid client name never matches
    rules = ruleset(("{a}/{b}", "{a}/{b}_"))
    assert rules.lookup("a/b") == (0, "a/b_")  # not a valid name: "_" must be followed
    assert rules.to_upstream("a/b") is None


@pytest.mark.parametrize(
    "a, b, overlap",
    [
        ("acme_team/{r:path}", "library/{name}", None),
        ("library/{n}", "{ns}/{r:path}", "library/a"),
        ("{a}_x", "y_{b}", "y_x"),
        ("a/{n:path}", "{x}/b/{y}", "a/b/a"),
        ("a/{n}", "{x}/b/{y}", None),
        ("acme_{ns}/{r:path}", "acme_team/{r:path}", "acme_team/a"),
        ("fixed/name", "fixed/name", "fixed/name"),
        ("fixed/name", "fixed/other", None),
    ],
)
def test_common_name(a, b, overlap):
    found = common_name(parse_template(a), parse_template(b))
    if overlap is None:
        assert found is None
    else:
        assert found is not None
        assert len(found) == len(overlap)
        for t in (a, b):
            assert parse_template_matches(t, found)


def parse_template_matches(text, name):
    import re

    return re.fullmatch(parse_template(text).pattern(), name) is not None


@given(names)
def test_round_trip_prefix_rule(name):
    rules = ruleset(("{ns}/{r:path}", "acme_{ns}/{r:path}"), ("{name}", "library/{name}"))
    upstream = rules.to_upstream(name)
    if upstream is not None:
        assert is_valid_name(upstream)
        assert rules.to_client(upstream) == name


@given(names)
def test_round_trip_nested_rules(name):
    rules = ruleset(
        ("team/{r:path}", "acme_team/{r:path}"),
        ("{a}/{b}", "flat_{a}/x-{b}"),
        ("{name}", "library/{name}"),
    )
    upstream = rules.to_upstream(name)
    if upstream is not None:
        assert rules.to_client(upstream) == name


def test_thousand_rules_stay_cheap():
    rules = ruleset(*[(f"ns{i}/{{r:path}}", f"up{i}_ns/{{r:path}}") for i in range(1000)])
    start = time.perf_counter()
    for i in range(1000):
        assert rules.lookup.__wrapped__(f"ns{i}/app") == (0, f"up{i}_ns/app")
    per_lookup = (time.perf_counter() - start) / 1000
    print(f"uncached lookup with 1000 rules: {per_lookup * 1e6:.1f} us")
    assert rules.to_client("up999_ns/a/b") == "ns999/a/b"
