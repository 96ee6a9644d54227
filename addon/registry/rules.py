"""The rules file: which client names map to which upstream names, and how tokens flow.

``parse_rules`` turns the YAML text into an immutable ``Rules`` value, or raises
``RulesError`` naming the file, the line, the rule and what is wrong.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml

from .names import Rule, RuleSet, common_name, is_valid_name, parse_rule

TOP_KEYS = {"upstream", "token_path", "unmatched", "rules"}
UPSTREAM_KEYS = {"realm", "service"}
RULE_KEYS = {"client", "upstream"}


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class Rules:
    names: RuleSet = field(default_factory=lambda: RuleSet(()))
    token_path: str = "/auth"
    unmatched: Literal["deny", "pass"] = "deny"
    realm: str | None = None  # the upstream's token endpoint, if not learned from challenges
    service: str | None = None

    def upstream_name(self, name: str) -> str | None:
        """The upstream name for a client name; under ``pass``, a valid name no rule
        maps stays as it is."""
        mapped = self.names.to_upstream(name)
        if mapped is None and self.unmatched == "pass" and self.names.lookup_upstream(name) is None:
            return name if is_valid_name(name) else None
        return mapped

    def client_name(self, name: str) -> str | None:
        """The client name for an upstream name; under ``pass``, unmapped names stay."""
        mapped = self.names.to_client(name)
        if mapped is None and self.unmatched == "pass":
            return name
        return mapped


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
    if "upstream" in top:
        upstream = _mapping(top["upstream"][1], "'upstream'", fail)
        for key, (key_node, value_node) in upstream.items():
            if key not in UPSTREAM_KEYS:
                raise fail(key_node, f"unknown key 'upstream.{key}' (expected realm or service)")
            kwargs[key] = _string(value_node, f"upstream.{key}", fail)
        if "realm" in kwargs:
            realm = urlsplit(kwargs["realm"])
            if realm.scheme not in ("http", "https") or not realm.hostname:
                raise fail(
                    upstream["realm"][1],
                    f"upstream.realm {kwargs['realm']!r} must be an http(s) URL",
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

    rules: list[tuple[Rule, yaml.Node]] = []
    if "rules" in top:
        node = top["rules"][1]
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            items = []
        elif isinstance(node, yaml.SequenceNode):
            items = node.value
        else:
            raise fail(node, "'rules' must be a list of {client, upstream} mappings")
        for n, item in enumerate(items, start=1):
            rules.append((_rule(item, n, fail), item))

    # Two rules that can produce the same upstream name could not map it back.
    for (a, a_node), (b, b_node) in itertools.combinations(rules, 2):
        if not _may_overlap(a.upstream.parts[0], b.upstream.parts[0]):
            continue
        example = common_name(a.upstream, b.upstream)
        if example is not None:
            raise fail(
                b_node,
                f"{b.label} and {a.label} (line {a_node.start_mark.line + 1}) can both "
                f"produce the upstream name {example!r}, so it could not be mapped back; "
                "make their upstream templates disjoint",
            )
    return Rules(names=RuleSet(tuple(r for r, _ in rules)), **kwargs)


def _may_overlap(a, b) -> bool:
    """Cheap pre-check: templates whose leading literals differ share no name."""
    pa = a if isinstance(a, str) else ""
    pb = b if isinstance(b, str) else ""
    return pa.startswith(pb) or pb.startswith(pa)


def _rule(node: yaml.Node, n: int, fail) -> Rule:
    fields = _mapping(node, f"rule {n}", fail)
    for key, (key_node, _) in fields.items():
        if key not in RULE_KEYS:
            raise fail(key_node, f"rule {n}: unknown key {key!r} (expected client and upstream)")
    for key in sorted(RULE_KEYS):
        if key not in fields:
            raise fail(node, f"rule {n}: missing {key!r}")
    client = _string(fields["client"][1], f"rule {n} client", fail)
    upstream = _string(fields["upstream"][1], f"rule {n} upstream", fail)
    label = f"rule {n} ({client} -> {upstream})"
    try:
        return parse_rule(client, upstream, label)
    except ValueError as e:
        raise fail(node, f"rule {n}: {e}") from e


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
