"""registry.explain (issue 12): a client name, an upstream name, a refused name, a scope."""

from __future__ import annotations

from regrewrite.explain import explain
from regrewrite.rules import parse_rules

RULES = """
upstream:
  service: svc
rules:
  - client: "team/{r:path}"
    upstream: "acme_team/{r:path}"
upstreams:
  hub:
    url: https://hub.test
    realm: https://auth.hub.test/token
    rules:
      - client: "hub/{name}"
        upstream: "library/{name}"
"""
PARSED = parse_rules(RULES)


def test_client_name():
    text = explain(PARSED, "team/app", {"default": ("https://auth.up.test/token", "learned")})
    assert "as a client name: team/app → acme_team/app on upstream default" in text
    assert "token realm: https://auth.up.test/token" in text
    assert "service: svc" in text  # the rules' wins over the learned one
    assert "credentials: client" in text
    assert "as an upstream name: hidden" in text


def test_client_name_of_another_upstream():
    text = explain(PARSED, "hub/nginx")
    assert "hub/nginx → library/nginx on upstream hub" in text
    assert "upstream url: https://hub.test" in text
    assert "token realm: https://auth.hub.test/token (from the rules)" in text
    assert "credentials: anonymous" in text


def test_upstream_name():
    text = explain(PARSED, "acme_team/tools/cli")
    assert "as an upstream name on default: shown to clients as team/tools/cli" in text
    assert "refused with 404 NAME_UNKNOWN: no rule for acme_team/tools/cli" in text
    assert "as an upstream name on hub: shown to clients as hub/redis" in explain(
        PARSED, "library/redis"
    )


def test_refused_names():
    assert "refused with 400 NAME_INVALID" in explain(PARSED, "Team/App")
    text = explain(PARSED, "other/app")
    assert "refused with 404 NAME_UNKNOWN: no rule for other/app" in text
    assert "hidden" in text


def test_scope():
    text = explain(PARSED, "repository:team/app:pull,push")
    assert text == (
        "scope repository:team/app:pull,push → repository:acme_team/app:pull,push "
        "(to upstream default's token service)"
    )
    text = explain(PARSED, "repository:hub/nginx:pull")
    assert "→ repository:library/nginx:pull (to upstream hub's token service)" in text
    assert "dropped from token requests: no rule for other/x" in explain(
        PARSED, "repository:other/x:pull"
    )
    assert "not a repository scope" in explain(PARSED, "registry:catalog:*")


async def test_command_answers_from_the_rules_in_force(tctx, addon, rules_file):
    tctx.configure(addon, registry_rules=str(rules_file))
    before = tctx.master.commands.call("registry.explain", "team/app")
    assert "team/app → acme_team/app" in before
    rules_file.write_text('rules:\n  - client: "team/{r:path}"\n    upstream: "moved/{r:path}"\n')
    await addon.reload_rules()
    assert "team/app → moved/app" in tctx.master.commands.call("registry.explain", "team/app")
