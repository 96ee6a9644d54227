"""Addon changes the hosted-registry profiles (tests/e2e/test_profiles.py) forced, each
proven here on its own."""

from __future__ import annotations

from regrewrite import auth

EVERYTHING = frozenset({"pull", "push", "delete"})  # a rule without `actions:`


def test_star_scope_kept_when_the_rule_allows_every_write():
    # Azure ACR challenges and skopeo delete ask for repository:NAME:*; a rule allowing
    # everything must pass it on (it was dropped: found by the Azure profile).
    assert auth.narrow_actions("*", EVERYTHING) == "*"
    mapped = auth.map_scopes(
        "repository:az/app:*", lambda n: "acme_team/" + n, lambda n: EVERYTHING
    )
    assert mapped.value == "repository:acme_team/az/app:*"
    assert mapped.dropped == ()


def test_star_scope_dropped_when_the_rule_is_read_only_or_partly_writable():
    assert auth.narrow_actions("*", frozenset({"pull"})) == ""
    assert auth.narrow_actions("pull,*", frozenset({"pull", "push"})) == "pull"


def test_nonstandard_actions_pass_untouched():
    # Azure's metadata_read (tags/list) and delete reach the token service as sent.
    value = "repository:az/app:metadata_read repository:az/app:delete"
    mapped = auth.map_scopes(value, lambda n: "acme_team/" + n, lambda n: EVERYTHING)
    assert mapped.value == (
        "repository:acme_team/az/app:metadata_read repository:acme_team/az/app:delete"
    )
