"""The rules file: which client names map to which upstream names, and how tokens flow.

``parse_rules`` turns the YAML text into an immutable ``Rules`` value, or raises
``RulesError`` naming the file, the line, the rule and what is wrong. ``Rules.resolve``
is the one routing function: every hook, the token endpoint and the content view ask it
where a client name goes.

Pure and immutable (no shared mutable state at module level), so rules can be loaded in
a worker thread and swapped in whole.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

import yaml

from .names import ACTIONS, Rule, TemplateIndex, first_overlaps, is_valid_name, parse_rule

TOP_KEYS = ("rules", "token_path", "unmatched", "upstream", "upstreams")
UPSTREAM_KEYS = ("credentials", "realm", "service")
NAMED_UPSTREAM_KEYS = ("credentials", "mirror_of", "realm", "rules", "service", "url")
CREDENTIAL_KEYS = ("password_env", "password_file", "username")
CREDENTIAL_MODES = ("client", "anonymous")  # or a mapping: the proxy's own account
RULE_KEYS = ("actions", "client", "upstream")
PULL_ONLY = frozenset({"pull"})
# libyaml's parser when PyYAML has it: 1,000 rules parse in ~30 ms instead of ~400 ms.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = [
    "ACTIONS",
    "Alias",
    "Credentials",
    "CredentialsError",
    "Route",
    "Rules",
    "RulesError",
    "Unrouted",
    "Upstream",
    "load_rules",
    "parse_rules",
]


class RulesError(ValueError):
    pass


class CredentialsError(Exception):
    """An upstream's password cannot be read now; the message names the upstream and the
    variable or file, never a secret."""


class Route(NamedTuple):
    registry: int  # index into Rules.upstreams
    name: str  # the upstream name
    actions: frozenset[str]  # what clients may do through it (subset of ACTIONS)
    rule: str | None  # label of the rule that mapped it; None under `pass`


class Unrouted(NamedTuple):
    code: str  # registry error code: "NAME_INVALID" or "NAME_UNKNOWN"
    reason: str  # for the flow's comment and the log, e.g. "no rule for team/x"


class Alias(NamedTuple):
    """Two rules of one upstream that produce a common name: names of ``earlier`` map
    back through it, the ``later`` rule's client names for them are aliases."""

    earlier: str  # rule labels
    later: str
    example: str  # an upstream name both produce


@dataclass(frozen=True)
class Credentials:
    """What the proxy sends an upstream's token service: the client's own credentials,
    none, or the proxy's own account, whose password is read when used from an
    environment variable or a file, so it is never part of the rules or their errors."""

    mode: Literal["client", "anonymous", "account"] = "client"
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    upstream: str = "default"  # the upstream's key, for messages

    def password(self) -> str:
        """The account's password, read now; CredentialsError if it cannot be."""
        where = f"upstream {self.upstream}"
        if self.mode != "account":
            raise CredentialsError(f"{where}: no account configured (credentials: {self.mode})")
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise CredentialsError(
                    f"{where}: environment variable {self.password_env} is not set"
                )
            what = f"environment variable {self.password_env}"
        else:
            try:
                value = Path(self.password_file or "").read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                # strerror only: a decode error's text could quote the file's bytes.
                reason = getattr(e, "strerror", None) or "not UTF-8 text"
                raise CredentialsError(
                    f"{where}: cannot read password file {self.password_file}: {reason}"
                ) from None
            what = f"password file {self.password_file}"
        if not value:
            raise CredentialsError(f"{where}: {what} is empty")
        return value


@dataclass(frozen=True)
class Upstream:
    key: str  # "default" (the reverse-mode target) or its key under `upstreams`
    url: str | None = None  # None: the reverse-mode target
    realm: str | None = None  # its token endpoint, if not learned from its challenges
    service: str | None = None
    mirror_of: tuple[str, ...] = ()  # registry hosts containerd's ?ns= names for it
    credentials: Credentials = Credentials()


class RuleSet:
    """Rules in order, with their client templates indexed (to map names forward) and
    each upstream's upstream templates (to map its names back)."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.forward = TemplateIndex([r.client for r in rules])
        # Names map back only among the rules of the upstream that sent them.
        self.backward: dict[int, tuple[tuple[int, ...], TemplateIndex]] = {}
        for registry in sorted({r.registry for r in rules}):
            own = tuple(i for i, r in enumerate(rules) if r.registry == registry)
            self.backward[registry] = (own, TemplateIndex([rules[i].upstream for i in own]))


@dataclass(frozen=True)
class Rules:
    names: RuleSet = field(default_factory=lambda: RuleSet(()))
    token_path: str = "/auth"
    unmatched: Literal["deny", "pass"] = "deny"
    upstreams: tuple[Upstream, ...] = (Upstream("default"),)
    aliases: tuple[Alias, ...] = ()
    # Indices of rules an earlier rule of their upstream overlaps: only their names can
    # map back through another rule.
    overlapped: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        # Clients repeat the same few names: a cached lookup costs well under a
        # microsecond. Per instance, so a reload starts afresh and nothing is shared.
        object.__setattr__(self, "_resolve", functools.lru_cache(4096)(self._resolve_uncached))
        object.__setattr__(self, "_back", functools.lru_cache(4096)(self._back_uncached))

    @property
    def realm(self) -> str | None:
        return self.upstreams[0].realm

    @property
    def service(self) -> str | None:
        return self.upstreams[0].service

    def resolve(self, name: str, mirror: int | None = None) -> Route | Unrouted:
        """Where a client name goes, or why it goes nowhere.

        ``mirror`` is containerd's ``?ns=`` case: the name is already upstream
        ``mirror``'s own, and goes there iff a rule gives it a client name.
        """
        return self._resolve(name, mirror)

    def route(self, name: str, mirror: int | None = None) -> Route | None:
        found = self._resolve(name, mirror)
        return found if isinstance(found, Route) else None

    def upstream_name(self, name: str) -> str | None:
        found = self.route(name)
        return found.name if found is not None else None

    def client_name(self, upstream_name: str, registry: int = 0) -> str | None:
        """The client name of a name of upstream ``registry``: the one the first rule
        that produces it gives, among the rules whose client name routes back to it; None
        when no client name reaches it."""
        found = self._back(upstream_name, registry)
        return found[1] if found is not None else None

    def mirror(self, ns: str) -> int | None:
        """The upstream that containerd's ``?ns=`` hint names, if any."""
        for i, upstream in enumerate(self.upstreams):
            if ns in upstream.mirror_of:
                return i
        return None

    def _resolve_uncached(self, name: str, mirror: int | None) -> Route | Unrouted:
        if not is_valid_name(name):
            return Unrouted("NAME_INVALID", f"invalid repository name {name!r}")
        rules = self.names.rules
        if mirror is not None:
            back = self._back(name, mirror)
            if back is None:
                return Unrouted("NAME_UNKNOWN", f"no rule reaches {name}")
            i, _ = back
            if i is None:
                return Route(mirror, name, ACTIONS, None)
            return Route(mirror, name, rules[i].actions, rules[i].label)
        found = self.names.forward.first(name)
        if found is None:
            if self.unmatched == "pass":
                # A name passed as it is may also be one a rule produces (mirror/x ->
                # vendor/x, and a client asking for vendor/x): it is an alias, and gets no
                # more than that rule allows, or `actions: [pull]` could be sidestepped.
                back = self._back(name, 0)
                if back is not None and back[0] is not None:
                    return Route(0, name, rules[back[0]].actions, None)
                return Route(0, name, ACTIONS, None)
            return Unrouted("NAME_UNKNOWN", f"no rule for {name}")
        i, values = found
        rule = rules[i]
        upstream = rule.upstream.fill(values)
        if not is_valid_name(upstream):
            return Unrouted("NAME_INVALID", f"{name} maps to invalid upstream name {upstream!r}")
        actions = rule.actions
        # An alias (a later rule's client name for a name an earlier rule maps back) never
        # gets more than the rule the upstream name belongs to allows: hub/library/x
        # must not make a read-only library/x writable.
        if i in self.overlapped:
            back = self._back(upstream, rule.registry)
            if back is not None and back[0] is not None and back[0] != i:
                actions = actions & rules[back[0]].actions
        return Route(rule.registry, upstream, actions, rule.label)

    def _back_uncached(self, name: str, registry: int) -> tuple[int | None, str] | None:
        """(index of the rule, client name) for a name of upstream ``registry``; the
        index is None for a name ``unmatched: pass`` lets through as it is."""
        if not is_valid_name(name):
            return None
        if registry in self.names.backward:
            own, index = self.names.backward[registry]
            for k, values in index.matches(name):
                i = own[k]
                client = self.names.rules[i].client.fill(values)
                if not is_valid_name(client):
                    continue
                # Names map back through the first rule whose client name goes to them:
                # an earlier rule's client name can take the name elsewhere.
                found = self.names.forward.first(client)
                if found is None:
                    continue
                j, forward_values = found
                rule = self.names.rules[j]
                if rule.registry == registry and rule.upstream.fill(forward_values) == name:
                    return i, client
        if self.unmatched == "pass" and registry == 0 and self.names.forward.first(name) is None:
            return None, name
        return None


def load_rules(path: str | Path) -> Rules:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read rules file: {e}") from e
    return parse_rules(text, str(path))


def parse_rules(text: str, source: str = "rules.yaml") -> Rules:
    """The rules in ``text``; RulesError (and no other exception) for any bad input."""
    try:
        return _parse(text, source)
    except RulesError:
        raise
    except RecursionError:
        raise RulesError(f"{source}: not valid YAML: nested too deeply") from None
    except Exception as e:
        # A bug here must not stop a reload watcher: the old rules stay in force.
        raise RulesError(f"{source}: cannot load the rules ({type(e).__name__}: {e})") from e


def _parse(text: str, source: str) -> Rules:
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise RulesError(_yaml_error(e, source)) from None
    if root is None:
        raise RulesError(f"{source}: the file is empty; it needs at least a 'rules:' list")

    def fail(node: yaml.Node, message: str) -> RulesError:
        return RulesError(f"{source}:{node.start_mark.line + 1}: {message}")

    top = _mapping(root, "the file", fail, TOP_KEYS)

    kwargs: dict = {}
    default = Upstream("default")
    if "upstream" in top:
        upstream = _mapping(top["upstream"][1], "upstream", fail, UPSTREAM_KEYS)
        default = Upstream(
            "default",
            realm=_url(upstream, "realm", "upstream.realm", fail, path=True),
            service=_optional_string(upstream, "service", "upstream.service", fail),
            credentials=_credentials(upstream, "default", "upstream", "client", fail),
        )
    if "token_path" in top:
        node = top["token_path"][1]
        path = _string(node, "token_path", fail)
        if not path.startswith("/") or path.startswith("/v2") or "?" in path or "#" in path:
            raise fail(
                node,
                f"token_path {path!r} must be an absolute path outside /v2, without a query",
            )
        kwargs["token_path"] = path
    if "unmatched" in top:
        node = top["unmatched"][1]
        value = _string(node, "unmatched", fail)
        if value not in ("deny", "pass"):
            raise fail(node, f"unmatched {value!r} must be 'deny' or 'pass'")
        kwargs["unmatched"] = value

    upstreams = [default]
    rules: list[Rule] = []
    if "rules" in top:
        rules += _rules(top["rules"][1], "rule", 0, _default_actions(default), fail)
    if "upstreams" in top:
        named = _mapping(top["upstreams"][1], "upstreams", fail)
        for key, (key_node, value_node) in named.items():
            where = f"upstreams.{key}"
            if key == "default":
                raise fail(key_node, f"{where}: 'default' names the reverse-mode target")
            fields = _mapping(value_node, where, fail, NAMED_UPSTREAM_KEYS)
            url = _url(fields, "url", f"{where}.url", fail, path=False)
            if url is None:
                raise fail(value_node, f"{where}: missing 'url'")
            registry = len(upstreams)
            upstream = Upstream(
                key,
                url=url,
                realm=_url(fields, "realm", f"{where}.realm", fail, path=True),
                service=_optional_string(fields, "service", f"{where}.service", fail),
                mirror_of=_strings(fields, "mirror_of", f"{where}.mirror_of", fail),
                credentials=_credentials(fields, key, where, "anonymous", fail),
            )
            upstreams.append(upstream)
            if "rules" in fields:
                actions = _default_actions(upstream)
                rules += _rules(fields["rules"][1], f"{where} rule", registry, actions, fail)

    aliases: list[Alias] = []
    overlapped: set[int] = set()
    for registry in sorted({r.registry for r in rules}):
        own = [n for n, r in enumerate(rules) if r.registry == registry]
        for i, j, example in first_overlaps([rules[n].upstream for n in own]):
            aliases.append(Alias(rules[own[i]].label, rules[own[j]].label, example))
            overlapped.add(own[j])
    return Rules(
        names=RuleSet(tuple(rules)),
        upstreams=tuple(upstreams),
        aliases=tuple(aliases),
        overlapped=frozenset(overlapped),
        **kwargs,
    )


def _yaml_error(e: yaml.YAMLError, source: str) -> str:
    """Where the YAML went wrong: where the construct that failed started (an unclosed
    quote's line, not the end of the file it ran to), and what went wrong where."""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    problem_mark = getattr(e, "problem_mark", None)
    mark = getattr(e, "context_mark", None) or problem_mark
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    detail = f"{context}: {problem}" if context else problem
    if problem_mark is not None and mark is not None and problem_mark.line != mark.line:
        detail += f" (at line {problem_mark.line + 1})"
    return f"{where}: not valid YAML: {detail}"


def _default_actions(upstream: Upstream) -> frozenset[str]:
    # A robot account must not let anyone who reaches the proxy write with it.
    return PULL_ONLY if upstream.credentials.mode == "account" else ACTIONS


def _rules(node: yaml.Node, what: str, registry: int, actions: frozenset[str], fail) -> list[Rule]:
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise fail(node, f"'{what}s' must be a list of {{client, upstream}} mappings")
    return [
        _rule(item, f"{what} {n}", registry, actions, fail) for n, item in enumerate(node.value, 1)
    ]


def _rule(node: yaml.Node, name: str, registry: int, actions: frozenset[str], fail) -> Rule:
    fields = _mapping(node, name, fail, RULE_KEYS)
    for key in ("client", "upstream"):
        if key not in fields:
            raise fail(node, f"{name}: missing {key!r}")
    client = _string(fields["client"][1], f"{name}: client", fail)
    upstream = _string(fields["upstream"][1], f"{name}: upstream", fail)
    label = f"{name} ({client} -> {upstream})"
    if "actions" in fields:
        actions = _actions(fields["actions"][1], label, fail)
    try:
        return parse_rule(client, upstream, label, registry, actions)
    except ValueError as e:
        raise fail(node, f"{label}: {e}") from None


def _actions(node: yaml.Node, label: str, fail) -> frozenset[str]:
    expected = ", ".join(sorted(ACTIONS))
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    values = [_string(item, f"{label}: actions", fail) for item in items]
    for item, value in zip(items, values, strict=True):
        if value not in ACTIONS:
            raise fail(item, f"{label}: unknown action {value!r} (expected one of: {expected})")
    if not values:
        raise fail(node, f"{label}: 'actions' must name at least one of: {expected}")
    return frozenset(values)


def _url(fields: dict, key: str, what: str, fail, *, path: bool) -> str | None:
    """A URL checked in full now, so that nothing about it can fail at request time."""
    value = _optional_string(fields, key, what, fail)
    if value is None:
        return None
    node = fields[key][1]

    def bad(why: str) -> RulesError:
        return fail(node, f"{what} {value!r} {why}")

    if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        raise bad("must be ASCII without spaces (write a host name in its xn-- form)")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise bad(f"is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise bad("must be an http(s) URL")
    if not parts.hostname:
        raise bad("has no host")
    if "@" in parts.netloc:
        raise bad("must not hold a user name or password (see 'credentials')")
    if port == 0:
        raise bad("has port 0 (a port is 1 to 65535)")
    if "#" in value:
        raise bad("must not have a #fragment")
    if not path and (parts.path not in ("", "/") or "?" in value):
        raise bad("must be scheme://host[:port], without a path or query")
    return value


def _optional_string(fields: dict, key: str, what: str, fail) -> str | None:
    return _string(fields[key][1], what, fail) if key in fields else None


def _strings(fields: dict, key: str, what: str, fail) -> tuple[str, ...]:
    if key not in fields:
        return ()
    node = fields[key][1]
    if isinstance(node, yaml.SequenceNode):
        return tuple(_string(n, what, fail) for n in node.value)
    return (_string(node, what, fail),)


def _credentials(fields: dict, key: str, where: str, default: str, fail) -> Credentials:
    if "credentials" not in fields:
        return Credentials(default, upstream=key)  # type: ignore[arg-type]
    node = fields["credentials"][1]
    what = f"{where}.credentials"
    if isinstance(node, yaml.ScalarNode):
        mode = _string(node, what, fail)
        if mode not in CREDENTIAL_MODES:
            raise fail(
                node,
                f"{what} {mode!r} must be 'client', 'anonymous' or a mapping of username "
                "and password_env or password_file",
            )
        return Credentials(mode, upstream=key)  # type: ignore[arg-type]
    creds = _mapping(node, what, fail, CREDENTIAL_KEYS)
    username = _optional_string(creds, "username", f"{what}.username", fail)
    env = _optional_string(creds, "password_env", f"{what}.password_env", fail)
    file = _optional_string(creds, "password_file", f"{what}.password_file", fail)
    if not username or (env is None) == (file is None):
        raise fail(node, f"{what} needs a username and one of password_env or password_file")
    account = Credentials("account", username, env, file, upstream=key)
    try:
        # Read once now, so a missing secret stops loading; it is read again when used.
        account.password()
    except CredentialsError as e:
        secret = creds["password_env" if env is not None else "password_file"][1]
        raise fail(secret, f"{what}: {e}") from None
    return account


def _mapping(
    node: yaml.Node, what: str, fail, keys: tuple[str, ...] | None = None
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping's entries by key; with ``keys``, any other key is refused."""
    if not isinstance(node, yaml.MappingNode):
        raise fail(node, f"{what} must be a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise fail(key_node, f"{what}: keys must be plain words")
        key = key_node.value
        if key in out:
            raise fail(key_node, f"{what}: duplicate key {key!r}")
        if keys is not None and key not in keys:
            expected = f"(expected one of: {', '.join(keys)})"
            if what.startswith("rule") or " rule " in what:
                raise fail(key_node, f"{what}: unknown key {key!r} {expected}")
            dotted = key if what == "the file" else f"{what}.{key}"
            raise fail(key_node, f"unknown key {dotted!r} {expected}")
        out[key] = (key_node, value_node)
    return out


def _string(node: yaml.Node, what: str, fail) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
        hint = " (quote templates: a bare {...} is a YAML mapping)" if "rule" in what else ""
        raise fail(node, f"{what} must be a string{hint}")
    return node.value
