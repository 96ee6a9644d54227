import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from regrewrite import rules as rules_module
from regrewrite.contentview import describe_rules
from regrewrite.names import ACTIONS
from regrewrite.rules import (
    Credentials,
    CredentialsError,
    Route,
    RulesError,
    Unrouted,
    load_rules,
    parse_rules,
)

ROOT = Path(__file__).parents[2]
PULL = frozenset({"pull"})


def rules_of(*pairs, extra=""):
    body = "".join(f"  - client: '{c}'\n    upstream: '{u}'\n" for c, u in pairs)
    return parse_rules(f"{extra}rules:\n{body}")


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
    assert rules.upstreams[0].credentials == Credentials("client")
    assert rules.upstream_name("team/app") is None


# --- routing: one function ------------------------------------------------------------


def test_resolve_routes_and_explains():
    rules = rules_of(("team/{r:path}", "acme_team/{r:path}"), ("{a}/{b}", "{a}/{b}_"))
    assert rules.resolve("team/tools/cli") == Route(
        0, "acme_team/tools/cli", ACTIONS, "rule 1 (team/{r:path} -> acme_team/{r:path})"
    )
    assert rules.resolve("Team/x") == Unrouted("NAME_INVALID", "invalid repository name 'Team/x'")
    assert rules.resolve("x") == Unrouted("NAME_UNKNOWN", "no rule for x")
    assert rules.resolve("a/b") == Unrouted(
        "NAME_INVALID", "a/b maps to invalid upstream name 'a/b_'"
    )
    assert rules.route("a/b") is None and rules.route("x") is None
    assert rules.route("team/app").name == "acme_team/app"


def test_first_match_wins_both_ways():
    rules = rules_of(
        ("team/{r:path}", "acme_team/{r:path}"),
        ("{name}", "library/{name}"),
        ("{ns}/{r:path}", "prefix_{ns}/{r:path}"),
    )
    assert rules.upstream_name("team/tools/cli") == "acme_team/tools/cli"
    assert rules.upstream_name("nginx") == "library/nginx"
    assert rules.upstream_name("other/x") == "prefix_other/x"
    assert rules.client_name("acme_team/tools/cli") == "team/tools/cli"
    assert rules.client_name("library/nginx") == "nginx"
    assert rules.client_name("prefix_other/x") == "other/x"
    assert rules.client_name("elsewhere/x") is None
    # prefix_team/app would map back to team/app, but team/app goes to acme_team/app.
    assert rules.client_name("prefix_team/app") is None


def test_pass_routes_unmapped_names_as_they_are():
    rules = rules_of(("team/{r:path}", "acme_team/{r:path}"), extra="unmatched: pass\n")
    assert rules.resolve("other/app") == Route(0, "other/app", ACTIONS, None)
    # acme_team/app asked for directly is an alias of team/app: it gets team/app's rights.
    read_only = parse_rules(
        "unmatched: pass\nrules:\n  - {client: 'team/{r:path}', upstream: 'acme/{r:path}', "
        "actions: [pull]}\n"
    )
    assert read_only.resolve("acme/app") == Route(0, "acme/app", PULL, None)
    assert read_only.resolve("other/app").actions == ACTIONS
    assert rules.upstream_name("team/app") == "acme_team/app"
    assert rules.resolve("Bad").code == "NAME_INVALID"
    assert rules.client_name("other/app") == "other/app"
    # team/app upstream is unreachable: the client name team/app goes to acme_team/app.
    assert rules.client_name("team/app") is None


MIRROR = """
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
upstreams:
  hub:
    url: https://hub.test
    mirror_of: docker.io
    rules:
      - client: "hub/{name}"
        upstream: "library/{name}"
        actions: [pull]
"""


def test_mirror_names_are_the_upstreams_own():
    rules = parse_rules(MIRROR)
    hub = rules.mirror("docker.io")
    assert hub == 1
    assert rules.resolve("library/nginx", hub) == Route(
        1, "library/nginx", PULL, "upstreams.hub rule 1 (hub/{name} -> library/{name})"
    )
    assert rules.resolve("bitnami/redis", hub) == Unrouted(
        "NAME_UNKNOWN", "no rule reaches bitnami/redis"
    )
    assert rules.resolve("library/nginx", 7).code == "NAME_UNKNOWN"
    assert rules.resolve("library/nginx") == Unrouted("NAME_UNKNOWN", "no rule for library/nginx")
    assert rules.route("hub/nginx") == (1, "library/nginx", PULL, rules.route("hub/x").rule)


# --- names with two client names --------------------------------------------------------

HUB = """
upstreams:
  hub:
    url: https://registry-1.docker.io
    rules:
      - client: "hub/{name}"
        upstream: "library/{name}"
      - client: "hub/{org}/{name}"
        upstream: "{org}/{name}"
"""


def test_docker_hub_mapping_loads_and_maps_both_ways():
    rules = parse_rules(HUB)
    assert rules.route("hub/nginx")[:2] == (1, "library/nginx")
    assert rules.route("hub/bitnami/redis")[:2] == (1, "bitnami/redis")
    assert rules.client_name("library/nginx", 1) == "hub/nginx"  # the first rule wins
    assert rules.client_name("bitnami/redis", 1) == "hub/bitnami/redis"
    # hub/library/nginx is an alias: it reaches library/nginx, which maps back to hub/nginx.
    assert rules.route("hub/library/nginx")[:2] == (1, "library/nginx")
    (alias,) = rules.aliases
    assert alias.earlier.startswith("upstreams.hub rule 1 ")
    assert alias.later.startswith("upstreams.hub rule 2 ")
    assert alias.example.startswith("library/")


def test_registry_rules_shows_the_aliases():
    text = describe_rules(parse_rules(HUB), "rules.yaml", None, None)
    assert (
        "upstreams.hub rule 2 (hub/{org}/{name} -> {org}/{name}) is an alias of "
        "upstreams.hub rule 1 (hub/{name} -> library/{name}) for e.g. library/"
    ) in text


def test_an_alias_gets_no_more_actions_than_the_rule_names_map_back_through():
    rules = parse_rules(
        HUB.replace('"library/{name}"\n', '"library/{name}"\n        actions: [pull]\n')
    )
    assert rules.route("hub/nginx").actions == PULL
    assert rules.route("hub/library/nginx").actions == PULL  # not rule 2's push
    assert rules.route("hub/bitnami/redis").actions == ACTIONS
    # Rights never add up: an alias of a pull-only name through a push-only rule has none.
    rules = parse_rules(
        HUB.replace('"library/{name}"\n', '"library/{name}"\n        actions: [pull]\n').replace(
            '"{org}/{name}"\n', '"{org}/{name}"\n        actions: [push]\n'
        )
    )
    assert rules.route("hub/library/nginx").actions == frozenset()


def test_a_name_maps_back_through_the_first_rule_whose_client_name_reaches_it():
    # lib/x/app: rule 2 would give x/app, but rule 1 sends x/app elsewhere; rule 3's
    # client name y/x/app does reach it, so that is its client name.
    rules = rules_of(
        ("x/{n}", "elsewhere/{n}"),
        ("{a}/{n}", "lib/{a}/{n}"),
        ("y/{a}/{n}", "lib/{a}/{n}"),
    )
    assert rules.upstream_name("y/x/app") == "lib/x/app"
    assert rules.client_name("lib/x/app") == "y/x/app"
    assert rules.client_name("lib/z/app") == "z/app"
    assert rules.upstream_name("y/z/app") == "lib/z/app"  # an alias of z/app


def test_k3s_style_prefix_mapping():
    rules = rules_of(("rancher/{x:path}", "mirrorproject/rancher-images/{x:path}"))
    assert (
        rules.upstream_name("rancher/mirrored-pause")
        == "mirrorproject/rancher-images/mirrored-pause"
    )
    assert rules.upstream_name("rancher/a/b") == "mirrorproject/rancher-images/a/b"
    assert rules.client_name("mirrorproject/rancher-images/klipper-lb") == "rancher/klipper-lb"
    assert rules.client_name("mirrorproject/other") is None
    assert rules.upstream_name("rancher") is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z]{1,3}(/[a-z]{1,3}){0,3}", fullmatch=True), max_size=5))
def test_every_reachable_upstream_name_maps_back_to_a_name_that_reaches_it(names):
    rules = rules_of(
        ("team/{r:path}", "acme_team/{r:path}"),
        ("{name}", "library/{name}"),
        ("hub/{org}/{name}", "{org}/{name}"),
        ("{a}/{b}", "flat_{a}/x-{b}"),
        ("{ns}/{r:path}", "{ns}/{r:path}"),
    )
    for name in names:
        route = rules.route(name)
        if route is not None:
            client = rules.client_name(route.name, route.registry)
            assert client is not None
            assert rules.route(client)[:2] == route[:2]


POOL = [
    ("team/{r:path}", "acme_team/{r:path}", "[pull, push]"),
    ("{name}", "library/{name}", "[pull]"),
    ("hub/{name}", "library/{name}", "[pull, delete]"),
    ("hub/{org}/{name}", "{org}/{name}", "[push, pull]"),
    ("{a}/{b}", "flat_{a}/x-{b}", "[pull]"),
    ("{ns}/{r:path}", "{ns}/{r:path}", "[pull, push, delete]"),
    ("x/{n}", "elsewhere/{n}", "[pull]"),
    ("{a}/{n}", "lib/{a}/{n}", "[push]"),
    ("y/{a}/{n}", "lib/{a}/{n}", "[pull]"),
    ("{x}.m/{r:path}", "m/{x}/{r:path}", "[delete]"),
]
_names = st.lists(st.sampled_from(["a", "b", "x", "y", "hub", "team", "library", "m", "z.m"]))


@settings(max_examples=300, deadline=None)
@given(
    st.permutations(POOL),
    st.integers(1, len(POOL)),
    st.lists(_names.map("/".join)),
    st.sampled_from(["deny", "pass"]),
)
def test_routes_and_client_names_agree_for_any_rules(pool, count, names, unmatched):
    """Whatever the rules and their order: a routed name's upstream name has a client name
    that routes to it again, and that one allows at least what the routed name allows."""
    rules = parse_rules(
        f"unmatched: {unmatched}\nrules:\n"
        + "".join(
            f"  - {{client: '{c}', upstream: '{u}', actions: {a}}}\n" for c, u, a in pool[:count]
        )
    )
    for name in names:
        route = rules.route(name)
        if route is None:
            continue
        client = rules.client_name(route.name, route.registry)
        assert client is not None, (name, route)
        back = rules.route(client)
        assert back[:2] == route[:2], (name, client)
        assert route.actions <= back.actions, (name, client)


# --- actions ----------------------------------------------------------------------------


ACCOUNT = """
upstream:
  credentials: {{username: robot, password_env: RULES_TEST_SECRET}}
rules:
  - client: "mirror/{{r:path}}"
    upstream: "m/{{r:path}}"
  - client: "team/{{r:path}}"
    upstream: "t/{{r:path}}"
    actions: {actions}
"""


def test_rules_of_an_upstream_with_the_proxys_account_are_read_only_unless_they_say(
    monkeypatch,
):
    monkeypatch.setenv("RULES_TEST_SECRET", "s3cret")
    rules = parse_rules(ACCOUNT.format(actions="[pull, push]"))
    assert rules.route("mirror/x").actions == PULL
    assert rules.route("team/x").actions == frozenset({"pull", "push"})
    rules = parse_rules(ACCOUNT.format(actions="delete"))
    assert rules.route("team/x").actions == frozenset({"delete"})
    # Other upstreams keep every action by default.
    assert parse_rules(HUB).route("hub/nginx").actions == ACTIONS


@pytest.mark.parametrize(
    "actions, message",
    [
        ("[pul]", "rule 1 (a -> b): unknown action 'pul' (expected one of: delete, pull, push)"),
        ("[pull, '*']", "rule 1 (a -> b): unknown action '*'"),
        ("[]", "rule 1 (a -> b): 'actions' must name at least one of: delete, pull, push"),
        ("[[pull]]", "rule 1 (a -> b): actions must be a string"),
    ],
)
def test_bad_actions_are_quoted(actions, message):
    with pytest.raises(RulesError) as e:
        parse_rules(f"rules:\n  - client: a\n    upstream: b\n    actions: {actions}\n", "r.yaml")
    assert str(e.value).startswith("r.yaml:4: "), str(e.value)
    assert message in str(e.value)


# --- credentials ------------------------------------------------------------------------


CREDENTIALS = """
upstream:
  credentials: anonymous
upstreams:
  a:
    url: https://a.test
  b:
    url: https://b.test
    credentials: client
  c:
    url: https://c.test
    credentials:
      username: robot
      password_file: {file}
"""


def test_credentials_per_upstream(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("pa55word\n")
    rules = parse_rules(CREDENTIALS.format(file=secret))
    modes = [u.credentials.mode for u in rules.upstreams]
    assert modes == ["anonymous", "anonymous", "client", "account"]
    assert parse_rules("rules: []").upstreams[0].credentials.mode == "client"
    account = rules.upstreams[3].credentials
    assert account.password() == "pa55word"
    assert "pa55word" not in repr(account)
    with pytest.raises(CredentialsError, match="no account"):
        rules.upstreams[0].credentials.password()


def test_password_that_cannot_be_read_when_used(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("pa55word")
    account = parse_rules(CREDENTIALS.format(file=secret)).upstreams[3].credentials
    secret.write_text("  \n")
    with pytest.raises(CredentialsError, match=f"upstream c: password file {secret} is empty"):
        account.password()
    secret.unlink()
    with pytest.raises(CredentialsError) as e:
        account.password()
    assert str(e.value) == (
        f"upstream c: cannot read password file {secret}: No such file or directory"
    )

    monkeypatch.setenv("RULES_TEST_SECRET", "s3cret")
    env = Credentials("account", "robot", password_env="RULES_TEST_SECRET", upstream="x")
    assert env.password() == "s3cret"
    monkeypatch.setenv("RULES_TEST_SECRET", "")
    with pytest.raises(
        CredentialsError, match="upstream x: environment variable RULES_TEST_SECRET is empty"
    ):
        env.password()
    monkeypatch.delenv("RULES_TEST_SECRET")
    with pytest.raises(CredentialsError) as e:
        env.password()
    assert "s3cret" not in str(e.value) and "RULES_TEST_SECRET is not set" in str(e.value)


@pytest.mark.parametrize(
    "credentials, line, message",
    [
        ("bogus", 5, "upstreams.a.credentials 'bogus' must be 'client', 'anonymous' or a mapping"),
        ("{username: u}", 5, "upstreams.a.credentials needs a username and one of"),
        (
            "{username: u, password_env: NOT_SET_ANYWHERE_42}",
            5,
            "upstreams.a.credentials: upstream a: environment variable NOT_SET_ANYWHERE_42 "
            "is not set",
        ),
        (
            "{username: u, password_file: /nonexistent/secret}",
            5,
            "upstreams.a.credentials: upstream a: cannot read password file /nonexistent/secret",
        ),
        ("{username: u, token: x}", 5, "unknown key 'upstreams.a.credentials.token' (expected one"),
    ],
)
def test_bad_credentials_stop_loading(credentials, line, message):
    text = f"rules: []\nupstreams:\n  a:\n    url: https://a.test\n    credentials: {credentials}\n"
    with pytest.raises(RulesError) as e:
        parse_rules(text, "r.yaml")
    assert str(e.value).startswith(f"r.yaml:{line}: "), str(e.value)
    assert message in str(e.value)


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://x", "must be an http(s) URL"),
        ("https://x:99999", "is not a valid URL: Port out of range"),
        ("https://x:http", "is not a valid URL: Port could not be cast"),
        ("https://x:0", "has port 0"),
        ("https://[::1", "is not a valid URL"),
        ("https://user:pw@x", "must not hold a user name or password"),
        ("https://x/#frag", "must not have a #fragment"),
        ("https://x/v2", "must be scheme://host[:port], without a path or query"),
        ("https://x?a=b", "without a path or query"),
        ("https:///x", "has no host"),
        ("https://bücher.example", "must be ASCII"),
        ("'https://x y'", "must be ASCII without spaces"),
    ],
)
def test_upstream_urls_are_checked_in_full(url, message):
    with pytest.raises(RulesError) as e:
        parse_rules(f"upstreams:\n  a:\n    url: {url}\n", "r.yaml")
    assert str(e.value).startswith("r.yaml:3: upstreams.a.url "), str(e.value)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "realm, message",
    [
        ("https://auth.test/token#x", "must not have a #fragment"),
        ("https://auth.test:65536/token", "Port out of range"),
        ("https://u@auth.test/token", "must not hold a user name"),
    ],
)
def test_realm_urls_are_checked_in_full(realm, message):
    with pytest.raises(RulesError) as e:
        parse_rules(f"upstream:\n  realm: {realm}\nrules: []\n", "r.yaml")
    assert str(e.value).startswith("r.yaml:2: upstream.realm "), str(e.value)
    assert message in str(e.value)


def test_a_realm_may_have_a_path_and_query():
    rules = parse_rules("upstream:\n  realm: https://auth.test:8443/v2/token?x=1\nrules: []\n")
    assert rules.realm == "https://auth.test:8443/v2/token?x=1"


# --- error messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, message",
    [
        (
            "rules:\n  - client: 'team/{r'\n    upstream: 'x'\n",
            2,
            "rule 1 (team/{r -> x): template 'team/{r': unbalanced",
        ),
        (
            "rules:\n  - client: a\n    upstream: b\n  - client: '{ns}/x'\n    upstream: 'y/x'\n",
            4,
            "rule 2 ({ns}/x -> y/x): client and upstream use different placeholders "
            "(only in client: ns)",
        ),
        ("rules: []\nunmatched: allow\n", 2, "unmatched 'allow' must be 'deny' or 'pass'"),
        (
            "rules: []\ncolour: red\n",
            2,
            "unknown key 'colour' (expected one of: rules, token_path, unmatched, upstream, "
            "upstreams)",
        ),
        (
            "rules:\n  - client: a\n    upstream: b\n    extra: 1\n",
            4,
            "rule 1: unknown key 'extra' (expected one of: actions, client, upstream)",
        ),
        ("rules:\n  - client: a\n", 2, "rule 1: missing 'upstream'"),
        (
            "rules:\n  - client: {ns}\n    upstream: b\n",
            2,
            "rule 1: client must be a string (quote",
        ),
        ("rules:\n  - client: a\n    upstream: 5\n", 3, "rule 1: upstream must be a string"),
        ("rules: 5\n", 1, "'rules' must be a list"),
        ("rules:\n  - 5\n", 2, "rule 1 must be a mapping"),
        ("token_path: /v2/auth\nrules: []\n", 1, "outside /v2"),
        ("upstream:\n  realm: ftp://x\nrules: []\n", 2, "must be an http(s) URL"),
        (
            "upstream:\n  host: x\nrules: []\n",
            2,
            "unknown key 'upstream.host' (expected one of: credentials, realm, service)",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x\n    rules:\n      - client: a\n"
            "        upstream: b\n        extra: 1\n",
            7,
            "upstreams.hub rule 1: unknown key 'extra'",
        ),
        ("rules: [\n", 2, "not valid YAML: while parsing a flow"),
        ("? [a]\n: b\n", 1, "the file: keys must be plain words"),
        ("rules: []\nrules: []\n", 2, "the file: duplicate key 'rules'"),
        ("", 1, "empty"),
    ],
)
def test_bad_rules_name_file_line_and_problem(text, line, message):
    with pytest.raises(RulesError) as e:
        parse_rules(text, "my-rules.yaml")
    msg = str(e.value)
    assert msg.startswith("my-rules.yaml:"), msg
    assert message in msg, msg
    if "empty" not in message:
        assert msg.startswith(f"my-rules.yaml:{line}:"), msg


@pytest.mark.parametrize("loader", ["CSafeLoader", "SafeLoader"])
def test_unclosed_quote_is_reported_where_it_opens(loader, monkeypatch):
    # libyaml's parser when PyYAML has it, else PyYAML's own: the same lines either way.
    monkeypatch.setattr(rules_module, "_LOADER", getattr(yaml, loader))
    text = "unmatched: deny\nrules:\n  - client: a\n    upstream: 'b\n  - client: c\n"
    with pytest.raises(RulesError) as e:
        parse_rules(text, "rules.yaml")
    assert str(e.value).startswith(
        "rules.yaml:4: not valid YAML: while scanning a quoted scalar: found unexpected end "
        "of stream (at line 6)"
    ), str(e.value)
    with pytest.raises(RulesError, match=r"^rules.yaml:2: not valid YAML: .* \(at line 3\)"):
        parse_rules("rules:\n  - client: a\n   upstream: b\n", "rules.yaml")


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(RulesError, match="nope.yaml: cannot read"):
        load_rules(tmp_path / "nope.yaml")


_yamlish = st.lists(
    st.sampled_from(list("abc{}[]:,-'\"\n #&*!|>?%@`\t") + ["rules", "client", "upstream"]),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_yamlish, st.text(max_size=40)))
def test_any_text_gives_rules_or_a_rules_error(text):
    try:
        parse_rules(text)
    except RulesError as e:
        assert "cannot load the rules" not in str(e), str(e)  # the catch-all: a bug


_template = st.lists(
    st.sampled_from(list("ab_./-{}:") + ["{x}", "{y:path}", "{x:path}"]), max_size=8
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_template, _template, st.sampled_from(["", "pull", "[push, pull]"]))))
def test_any_templates_give_rules_or_a_rules_error(rules):
    text = "rules:\n" + "".join(
        f"  - client: {c!r}\n    upstream: {u!r}\n" + (f"    actions: {a}\n" if a else "")
        for c, u, a in rules
    )
    try:
        parsed = parse_rules(text)
    except RulesError as e:
        assert "cannot load the rules" not in str(e), str(e)
        return
    for c, _, _ in rules:
        parsed.resolve(c.replace("{", "").replace("}", "").replace(":", ""))


def test_rules_load_in_parallel_threads(monkeypatch):
    # Reload runs in a worker thread: loading shares no mutable state.
    texts = [
        HUB,
        MIRROR,
        ACCOUNT.format(actions="[push]").replace("upstream:\n  cred", "x:\n  cred"),
    ]
    monkeypatch.setenv("RULES_TEST_SECRET", "x")
    results: list = []

    def load(text):
        for _ in range(20):
            try:
                results.append(parse_rules(text).aliases)
            except RulesError as e:
                results.append(str(e))

    threads = [threading.Thread(target=load, args=(t,)) for t in texts for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 180
    assert len({repr(r) for r in results}) == 3
