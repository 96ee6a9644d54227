"""``registry.explain``: why a name or scope goes where it goes, from the rules in force.

No mitmproxy imports: the addon's command calls ``explain`` with its current rules and
what it has learned of the upstreams' token services.
"""

from __future__ import annotations

from urllib.parse import quote

from . import auth, decide
from .rules import Rules


def explain(
    rules: Rules,
    text: str,
    learned: dict[str, tuple[str | None, str | None]] | None = None,
) -> str:
    """A few lines on ``text``: a client name, an upstream name, or a token scope."""
    text = text.strip()
    if not text:
        return "registry.explain needs a repository name or a scope (type:name:actions)"
    learned = learned or {}
    if text.count(":") >= 2:
        return _explain_scope(rules, text)
    return "\n".join(_as_client_name(rules, text, learned) + _as_upstream_name(rules, text))


def _explain_scope(rules: Rules, text: str) -> str:
    try:
        scope = auth.parse_scope(text)
    except ValueError as e:
        return f"{text!r} is not a scope: {e}"
    if not scope.is_repository:
        return f"scope {text} is not a repository scope: sent upstream as it is"
    registry, map_name = decide.token_upstream(rules, f"scope={quote(text, safe='')}", "")
    result = auth.map_scopes(text, map_name, decide.allowed_actions(rules, None))
    key = rules.upstreams[registry].key
    if not result.value:
        found = decide.resolve(rules, scope.name)
        why = found.reason if isinstance(found, decide.Refusal) else "no action is allowed"
        return f"scope {text} is dropped from token requests: {why}"
    lines = [f"scope {text} → {result.value} (to upstream {key}'s token service)"]
    if result.value.rsplit(":", 1)[1] != scope.actions:
        lines.append("  actions narrowed: the rule is read-only for the rest")
    return "\n".join(lines)


def _as_client_name(rules: Rules, name: str, learned: dict) -> list[str]:
    found = decide.resolve(rules, name)
    if isinstance(found, decide.Refusal):
        return [f"as a client name: refused with {found.status} {found.code}: {found.reason}"]
    upstream = rules.upstreams[found.registry]
    realm, service = learned.get(upstream.key, (None, None))
    rule = found.rule or f"unmatched: {rules.unmatched}"
    actions = ", ".join(sorted(found.actions))
    return [
        f"as a client name: {name} → {found.name} on upstream {upstream.key}, by {rule}",
        f"  upstream url: {upstream.url or 'the reverse-mode target'}",
        f"  token realm: {upstream.realm or realm or 'not known yet'}"
        + (" (from the rules)" if upstream.realm else ""),
        f"  service: {upstream.service or service or 'not known yet'}",
        f"  credentials: {decide.credentials_mode(rules, found.registry)}",
        f"  allowed: {actions}",
    ]


def _as_upstream_name(rules: Rules, name: str) -> list[str]:
    lines = []
    for registry, upstream in enumerate(rules.upstreams):
        client = rules.client_name(name, registry)
        if client is not None:
            lines.append(f"as an upstream name on {upstream.key}: shown to clients as {client}")
    return lines or ["as an upstream name: hidden (no rule maps it back to a client name)"]
