"""The rules file: which client names map to which upstream names, and how tokens flow.

``parse_rules`` turns the YAML text into an immutable ``Rules`` value, or raises
``RulesError`` naming the file, the line, the rule and what is wrong.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml

from .names import Route, Rule, RuleSet, common_name, is_valid_name, parse_rule

TOP_KEYS = {"upstream", "token_path", "unmatched", "rules", "upstreams"}
UPSTREAM_KEYS = {"realm", "service"}
NAMED_UPSTREAM_KEYS = {"url", "realm", "service", "mirror_of", "credentials", "rules"}
CREDENTIAL_KEYS = {"username", "password_env", "password_file"}
RULE_KEYS = {"client", "upstream"}


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class Credentials:
    """The proxy's own account on an upstream; the password is read when used, from an
    environment variable or a file, so it is never part of the rules file or its errors."""

    username: str
    password_env: str | None = None
    password_file: str | None = None

    def password(self) -> str:
        if self.password_env is not None:
            return os.environ.get(self.password_env, "")
        return Path(self.password_file or "").read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Upstream:
    key: str  # "default" (the reverse-mode target) or its key under `upstreams`
    url: str | None = None  # None: the reverse-mode target
    realm: str | None = None  # its token endpoint, if not learned from its challenges
    service: str | None = None
    mirror_of: tuple[str, ...] = ()  # registry hosts containerd's ?ns= names for it
    credentials: Credentials | None = None


@dataclass(frozen=True)
class Rules:
    names: RuleSet = field(default_factory=lambda: RuleSet(()))
    token_path: str = "/auth"
    unmatched: Literal["deny", "pass"] = "deny"
    upstreams: tuple[Upstream, ...] = (Upstream("default"),)

    @property
    def realm(self) -> str | None:
        return self.upstreams[0].realm

    @property
    def service(self) -> str | None:
        return self.upstreams[0].service

    def route(self, name: str) -> Route | None:
        """Which upstream serves a client name, under which name; under ``pass``, a valid
        name no rule maps goes to the default upstream as it is."""
        found = self.names.route(name)
        if found is None and self.unmatched == "pass" and self.names.lookup(name) is None:
            return Route(0, name) if is_valid_name(name) else None
        return found

    def upstream_name(self, name: str) -> str | None:
        found = self.route(name)
        return found.name if found is not None else None

    def client_name(self, name: str, registry: int = 0) -> str | None:
        """The client name for a name on upstream ``registry``; under ``pass``, unmapped
        names of the default upstream stay as they are."""
        mapped = self.names.to_client(name, registry)
        if mapped is None and self.unmatched == "pass" and registry == 0:
            return name
        return mapped

    def mirror(self, ns: str) -> int | None:
        """The upstream that containerd's ``?ns=`` hint names, if any."""
        for i, upstream in enumerate(self.upstreams):
            if ns in upstream.mirror_of:
                return i
        return None


def load_rules(path: str | Path) -> Rules:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read rules file: {e}") from e
    return parse_rules(text, str(path))


def parse_rules(text: str, source: str = "rules.yaml") -> Rules:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        raise RulesError(f"{where}: not valid YAML: {problem}") from e
    if root is None:
        raise RulesError(f"{source}: the file is empty; it needs at least a 'rules:' list")

    def fail(node: yaml.Node, message: str) -> RulesError:
        return RulesError(f"{source}:{node.start_mark.line + 1}: {message}")

    top = _mapping(root, "the file", fail)
    unknown = set(top) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise fail(top[key][0], f"unknown key {key!r} (expected one of {sorted(TOP_KEYS)})")

    kwargs: dict = {}
    default = Upstream("default")
    if "upstream" in top:
        upstream = _mapping(top["upstream"][1], "'upstream'", fail)
        for key, (key_node, _) in upstream.items():
            if key not in UPSTREAM_KEYS:
                raise fail(key_node, f"unknown key 'upstream.{key}' (expected realm or service)")
        default = Upstream(
            "default",
            realm=_url(upstream, "realm", "upstream.realm", fail),
            service=_optional_string(upstream, "service", "upstream.service", fail),
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
    rules: list[tuple[Rule, yaml.Node]] = []
    if "rules" in top:
        rules += _rules(top["rules"][1], "rule", 0, fail)
    if "upstreams" in top:
        named = _mapping(top["upstreams"][1], "'upstreams'", fail)
        for key, (key_node, value_node) in named.items():
            where = f"upstreams.{key}"
            if key == "default":
                raise fail(key_node, f"{where}: 'default' names the reverse-mode target")
            fields = _mapping(value_node, where, fail)
            for k, (k_node, _) in fields.items():
                if k not in NAMED_UPSTREAM_KEYS:
                    raise fail(
                        k_node,
                        f"unknown key '{where}.{k}' (expected {sorted(NAMED_UPSTREAM_KEYS)})",
                    )
            url = _url(fields, "url", f"{where}.url", fail)
            if url is None:
                raise fail(value_node, f"{where}: missing 'url'")
            if urlsplit(url).path not in ("", "/") or urlsplit(url).query:
                raise fail(fields["url"][1], f"{where}.url {url!r}: give scheme://host[:port]")
            registry = len(upstreams)
            upstreams.append(
                Upstream(
                    key,
                    url=url,
                    realm=_url(fields, "realm", f"{where}.realm", fail),
                    service=_optional_string(fields, "service", f"{where}.service", fail),
                    mirror_of=_strings(fields, "mirror_of", f"{where}.mirror_of", fail),
                    credentials=_credentials(fields, where, fail),
                )
            )
            if "rules" in fields:
                rules += _rules(fields["rules"][1], f"{where} rule", registry, fail)

    # Two rules of one upstream that can produce the same name could not map it back.
    for (a, a_node), (b, b_node) in itertools.combinations(rules, 2):
        if a.registry != b.registry or not _may_overlap(a.upstream.parts[0], b.upstream.parts[0]):
            continue
        example = common_name(a.upstream, b.upstream)
        if example is not None:
            raise fail(
                b_node,
                f"{b.label} and {a.label} (line {a_node.start_mark.line + 1}) can both "
                f"produce the upstream name {example!r}, so it could not be mapped back; "
                "make their upstream templates disjoint",
            )
    return Rules(names=RuleSet(tuple(r for r, _ in rules)), upstreams=tuple(upstreams), **kwargs)


def _rules(node: yaml.Node, what: str, registry: int, fail) -> list[tuple[Rule, yaml.Node]]:
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise fail(node, f"'{what}s' must be a list of {{client, upstream}} mappings")
    return [(_rule(item, what, n, registry, fail), item) for n, item in enumerate(node.value, 1)]


def _url(fields: dict, key: str, what: str, fail) -> str | None:
    value = _optional_string(fields, key, what, fail)
    if value is not None:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fail(fields[key][1], f"{what} {value!r} must be an http(s) URL")
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


def _credentials(fields: dict, where: str, fail) -> Credentials | None:
    if "credentials" not in fields:
        return None
    node = fields["credentials"][1]
    what = f"{where}.credentials"
    creds = _mapping(node, what, fail)
    for k, (k_node, _) in creds.items():
        if k not in CREDENTIAL_KEYS:
            raise fail(k_node, f"unknown key '{what}.{k}' (expected {sorted(CREDENTIAL_KEYS)})")
    username = _optional_string(creds, "username", f"{what}.username", fail)
    env = _optional_string(creds, "password_env", f"{what}.password_env", fail)
    file = _optional_string(creds, "password_file", f"{what}.password_file", fail)
    if username is None or (env is None) == (file is None):
        raise fail(node, f"{what} needs a username and one of password_env or password_file")
    if env is not None and env not in os.environ:
        raise fail(creds["password_env"][1], f"{what}: environment variable {env} is not set")
    if file is not None and not os.access(file, os.R_OK):
        raise fail(creds["password_file"][1], f"{what}: cannot read {file}")
    return Credentials(username, env, file)


def _may_overlap(a, b) -> bool:
    """Cheap pre-check: templates whose leading literals differ share no name."""
    pa = a if isinstance(a, str) else ""
    pb = b if isinstance(b, str) else ""
    return pa.startswith(pb) or pb.startswith(pa)


def _rule(node: yaml.Node, what: str, n: int, registry: int, fail) -> Rule:
    name = f"{what} {n}"
    fields = _mapping(node, name, fail)
    for key, (key_node, _) in fields.items():
        if key not in RULE_KEYS:
            raise fail(key_node, f"{name}: unknown key {key!r} (expected client and upstream)")
    for key in sorted(RULE_KEYS):
        if key not in fields:
            raise fail(node, f"{name}: missing {key!r}")
    client = _string(fields["client"][1], f"{name} client", fail)
    upstream = _string(fields["upstream"][1], f"{name} upstream", fail)
    label = f"{name} ({client} -> {upstream})"
    try:
        return parse_rule(client, upstream, label, registry)
    except ValueError as e:
        raise fail(node, f"{name}: {e}") from e


def _mapping(node: yaml.Node, what: str, fail) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise fail(node, f"{what} must be a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key in out:
            raise fail(key_node, f"{what}: duplicate key {key!r}")
        out[key] = (key_node, value_node)
    return out


def _string(node: yaml.Node, what: str, fail) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
        hint = " (quote templates: a bare {...} is a YAML mapping)" if "rule" in what else ""
        raise fail(node, f"{what} must be a string{hint}")
    return node.value
