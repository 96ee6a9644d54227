from pathlib import Path

import pytest

from regrewrite.rules import RulesError, load_rules, parse_rules

ROOT = Path(__file__).parents[2]


def test_shipped_rules_file_loads():
    rules = load_rules(ROOT / "rules.yaml")
    assert rules.token_path == "/auth"
    assert rules.unmatched == "deny"
    assert (rules.realm, rules.service) == (None, None)  # learned from the upstream
    assert rules.upstream_name("team/app") == "acme_team/app"
    assert rules.client_name("acme_team/tools/cli") == "team/tools/cli"


def test_defaults():
    rules = parse_rules("rules: []")
    assert (rules.token_path, rules.unmatched, rules.realm) == ("/auth", "deny", None)
    assert rules.upstream_name("team/app") is None


def test_pass_keeps_unmapped_names():
    rules = parse_rules(
        "unmatched: pass\nrules:\n  - client: 'team/{r:path}'\n    upstream: 'acme_team/{r:path}'\n"
    )
    assert rules.upstream_name("team/app") == "acme_team/app"
    assert rules.upstream_name("other/app") == "other/app"
    assert rules.upstream_name("Bad") is None
    assert rules.client_name("other/app") == "other/app"


@pytest.mark.parametrize(
    "text, line, message",
    [
        (
            "rules:\n  - client: 'team/{r'\n    upstream: 'x'\n",
            2,
            "rule 1 (team/{r -> x): template 'team/{r'",
        ),
        (
            "rules:\n  - client: a\n    upstream: b\n  - client: '{ns}/x'\n    upstream: 'y/x'\n",
            4,
            "rule 2: client '{ns}/x' and upstream 'y/x' use different placeholders "
            "(only in client: ns)",
        ),
        ("rules: []\nunmatched: allow\n", 2, "unmatched 'allow' must be 'deny' or 'pass'"),
        ("rules: []\ncolour: red\n", 2, "unknown key 'colour'"),
        (
            "rules:\n  - client: a\n    upstream: b\n    extra: 1\n",
            4,
            "rule 1: unknown key 'extra'",
        ),
        ("rules:\n  - client: a\n", 2, "rule 1: missing 'upstream'"),
        ("rules:\n  - client: {ns}\n    upstream: b\n", 2, "quote templates"),
        ("rules: 5\n", 1, "'rules' must be a list"),
        ("token_path: /v2/auth\nrules: []\n", 1, "outside /v2"),
        ("upstream:\n  realm: ftp://x\nrules: []\n", 2, "must be an http(s) URL"),
        ("upstream:\n  host: x\nrules: []\n", 2, "unknown key 'upstream.host'"),
        (
            "rules:\n  - client: '{n}'\n    upstream: 'library/{n}'\n"
            "  - client: 'x/{r:path}'\n    upstream: '{r:path}'\n",
            4,
            "rule 2 (x/{r:path} -> {r:path}) and rule 1 ({n} -> library/{n}) (line 2) can both "
            "produce the upstream name 'library/",
        ),
        ("rules: [\n", 2, "not valid YAML"),
        ("", 1, "empty"),
    ],
)
def test_bad_rules_name_file_line_and_problem(text, line, message):
    with pytest.raises(RulesError) as e:
        parse_rules(text, "my-rules.yaml")
    msg = str(e.value)
    assert msg.startswith("my-rules.yaml:"), msg
    assert message in msg
    if "empty" not in message:
        assert msg.startswith(f"my-rules.yaml:{line}:"), msg


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(RulesError, match="nope.yaml: cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_thousand_disjoint_rules_load_quickly():
    text = "rules:\n" + "".join(
        f"  - client: 'ns{i}/{{r:path}}'\n    upstream: 'up{i}_ns/{{r:path}}'\n"
        for i in range(1000)
    )
    rules = parse_rules(text)
    assert rules.upstream_name("ns500/a/b") == "up500_ns/a/b"
