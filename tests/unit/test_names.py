import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from regrewrite.names import (
    TemplateIndex,
    common_name,
    first_overlaps,
    is_valid_name,
    overlap,
    parse_rule,
    parse_template,
)


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
    with pytest.raises(ValueError, match=r"different placeholders \(only in client: ns\)"):
        parse_rule("{ns}/{r:path}", "acme/{r:path}", "rule 1")
    with pytest.raises(ValueError, match="':path' on one side only"):
        parse_rule("{r:path}", "library/{r}", "rule 1")


def matches(text, name):
    return re.fullmatch(parse_template(text).pattern(), name) is not None


@pytest.mark.parametrize(
    "a, b, overlaps",
    [
        ("acme_team/{r:path}", "library/{name}", False),
        ("library/{n}", "{ns}/{r:path}", True),
        ("{a}_x", "y_{b}", True),
        ("a/{n:path}", "{x}/b/{y}", True),
        ("a/{n}", "{x}/b/{y}", False),
        ("acme_{ns}/{r:path}", "acme_team/{r:path}", True),
        ("fixed/name", "fixed/name", True),
        ("fixed/name", "fixed/other", False),
        ("{x}.u1", "{x}.u11", False),
        ("{x}.u1", "{x}1.u1", True),
        ("x{p:path}/a/b", "{q:path}/b", True),
        ("a/{p:path}/b", "a/b", False),
        ("{p:path}/c/d", "a/b/{q:path}", True),
        ("ab{x}", "a", False),  # a placeholder takes at least one character
        ("ab{x}", "abc", True),
        ("a{x}b", "ab", False),
        ("a{x}b", "a_b", True),
        ("a{x}/b", "{y}b/b", True),
    ],
)
def test_overlap_fast_and_slow_agree(a, b, overlaps):
    ta, tb = parse_template(a), parse_template(b)
    for found in (overlap(ta, tb), overlap(tb, ta), common_name(ta, tb)):
        assert (found is not None) is overlaps, (a, b, found)
        if found is not None:
            assert matches(a, found) and matches(b, found)


def test_common_name_with_every_letter_and_digit_in_the_literals():
    # It used to look for a character no literal uses with next(): StopIteration.
    a = parse_template("abcdefghijklmnopqr/{x}")
    b = parse_template("stuvwxyz0123456789/{y}")
    assert common_name(a, b) is None and overlap(a, b) is None
    c = parse_template("abcdefghijklmnopqrstuvwxyz0123456789/{y}")
    found = common_name(c, parse_template("{x}/{y}"))
    assert found is not None and matches("{x}/{y}", found)


# Templates over a tiny alphabet, so that random pairs often overlap.
_literal = st.text("ab_", min_size=1, max_size=3)
_affix = st.text("ab_", max_size=2)


@st.composite
def templates(draw):
    n = draw(st.integers(1, 4))
    path_at = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    components = []
    for i in range(n):
        kind = "path" if i == path_at else draw(st.sampled_from(["lit", "one"]))
        if kind == "lit":
            components.append(draw(_literal))
        elif kind == "one":
            components.append(draw(_affix) + f"{{v{i}}}" + draw(_affix))
        else:
            components.append(draw(_affix) + "{p:path}")
    try:
        return parse_template("/".join(components))
    except ValueError:
        assume(False)


@settings(max_examples=400, deadline=None)
@given(templates(), templates())
def test_fast_overlap_is_exact(a, b):
    """The component-wise check finds a common name exactly when the product-automaton
    search does (no false overlap, none missed), and its example is a common name."""
    slow = common_name(a, b)
    fast = overlap(a, b)
    assert (fast is None) == (slow is None), (a.text, b.text, slow, fast)
    if fast is not None:
        assert re.fullmatch(a.pattern(), fast) and re.fullmatch(b.pattern(), fast)


@settings(max_examples=150, deadline=None)
@given(st.lists(templates(), min_size=2, max_size=12))
def test_first_overlaps_finds_the_first_earlier_template(ts):
    """The indexed search finds what comparing each template with every earlier one finds."""
    expected = []
    for j in range(len(ts)):
        first = next((i for i in range(j) if overlap(ts[i], ts[j]) is not None), None)
        if first is not None:
            expected.append((first, j))
    found = list(first_overlaps(ts))
    assert [(i, j) for i, j, _ in found] == expected
    for i, j, example in found:
        assert re.fullmatch(ts[i].pattern(), example) and re.fullmatch(ts[j].pattern(), example)


@settings(max_examples=150, deadline=None)
@given(st.lists(templates(), min_size=1, max_size=12), st.data())
def test_template_index_matches_like_trying_every_template(ts, data):
    index = TemplateIndex(ts)
    # Names some template produces, and names none does.
    for _ in range(5):
        t = data.draw(st.sampled_from(ts))
        name = data.draw(st.from_regex(t.pattern(), fullmatch=True).filter(lambda s: "\n" not in s))
        for candidate in (name, name + "_", "b" + name):
            expected = [
                (i, m.groupdict())
                for i, t in enumerate(ts)
                if (m := re.fullmatch(t.pattern(), candidate))
            ]
            assert list(index.matches(candidate)) == expected


def test_placeholder_first_templates_are_indexed_by_suffix():
    ts = [parse_template(f"{{x}}.u{i}") for i in range(1000)]
    index = TemplateIndex(ts)
    assert index.first("app.u500") == (500, {"x": "app"})
    assert index.first("app.u5000") is None
    assert not index.prefixes  # nothing tried by every lookup
    ts = [parse_template(f"{{a}}/m{i}/{{b}}") for i in range(1000)]
    index = TemplateIndex(ts)
    assert index.first("x/m500/y") == (500, {"a": "x", "b": "y"})
    assert not index.prefixes and not index.suffixes
