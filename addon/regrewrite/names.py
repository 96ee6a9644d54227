"""Repository names and the templates that map them between client and upstream.

A template is a repository name with placeholders: ``{x}`` stands for one path
component (or the rest of one, after or before a literal), ``{x:path}`` for one
or more whole components. A rule pairs a client template with an upstream
template over the same placeholders, so it maps both ways.

No mitmproxy imports here: this is the naming half of the registry protocol.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

# distribution/reference: components joined by "/", whole name at most 255 chars.
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
NAME_MAX_LENGTH = 255

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL_CHARS = re.compile(r"[a-z0-9._-]*")


def is_valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX_LENGTH and NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class Placeholder:
    name: str
    path: bool  # {x:path}: one or more whole components


# A template is a sequence of literal strings and placeholders.
Part = str | Placeholder


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[Part, ...]

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(p.name for p in self.parts if isinstance(p, Placeholder))

    def pattern(self, group_prefix: str = "") -> str:
        """A regex for names this template produces, one named group per placeholder."""
        out = []
        for part in self.parts:
            if isinstance(part, Placeholder):
                body = r"[^/]+(?:/[^/]+)*" if part.path else r"[^/]+"
                out.append(f"(?P<{group_prefix}{part.name}>{body})")
            else:
                out.append(re.escape(part))
        return "".join(out)

    def fill(self, values: dict[str, str]) -> str:
        return "".join(p if isinstance(p, str) else values[p.name] for p in self.parts)


def parse_template(text: str) -> Template:
    """Parse a template such as ``PREFIX_{namespace}/{repository:path}``.

    Raises ValueError, quoting the template, when it cannot map names one-to-one.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"template {text!r} must be a non-empty string")
    parts: list[Part] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        name, _, kind = m.group(1).partition(":")
        if not _PLACEHOLDER_NAME.fullmatch(name):
            raise ValueError(f"template {text!r}: bad placeholder name {m.group(0)!r}")
        if kind not in ("", "path"):
            raise ValueError(
                f"template {text!r}: unknown placeholder kind {m.group(0)!r} (only ':path')"
            )
        parts.append(Placeholder(name, kind == "path"))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    if any(isinstance(p, str) and ("{" in p or "}" in p) for p in parts):
        raise ValueError(f"template {text!r}: unbalanced '{{' or '}}'")

    components = text.split("/")
    if any(not c for c in components):
        raise ValueError(f"template {text!r}: empty path component")
    names = [p.name for p in parts if isinstance(p, Placeholder)]
    if len(names) != len(set(names)):
        raise ValueError(f"template {text!r}: a placeholder is used twice")
    if sum(1 for p in parts if isinstance(p, Placeholder) and p.path) > 1:
        raise ValueError(f"template {text!r}: at most one {{x:path}} placeholder")
    for component in components:
        # Two placeholders in one component could split a value more than one way.
        if len(_PLACEHOLDER.findall(component)) > 1:
            raise ValueError(
                f"template {text!r}: component {component!r} holds more than one placeholder"
            )
    for part in parts:
        if isinstance(part, str):
            for literal in part.split("/"):
                if not _LITERAL_CHARS.fullmatch(literal):
                    raise ValueError(
                        f"template {text!r}: literal {literal!r} has characters a repository "
                        "name cannot hold (only a-z, 0-9, '.', '_', '-' and '/')"
                    )
    for i, part in enumerate(parts):
        # {x:path} spans whole components: after it must come "/" or the end,
        # before it "/" or the start, except that a literal may prefix its first component.
        if isinstance(part, Placeholder) and part.path:
            after = parts[i + 1] if i + 1 < len(parts) else None
            if after is not None and not (isinstance(after, str) and after.startswith("/")):
                raise ValueError(f"template {text!r}: {{{part.name}:path}} must end its component")
    if not names and not is_valid_name(text):
        raise ValueError(f"template {text!r} is not a valid repository name")
    return Template(text, tuple(parts))


@dataclass(frozen=True)
class Rule:
    client: Template
    upstream: Template
    label: str  # how error messages name it, e.g. "rule 2 (team/{r:path})"
    registry: int = 0  # the upstream registry that serves it (0: the reverse-mode target)


def parse_rule(client: str, upstream: str, label: str, registry: int = 0) -> Rule:
    c = parse_template(client)
    u = parse_template(upstream)
    if c.placeholders != u.placeholders:
        only_c = sorted(c.placeholders - u.placeholders)
        only_u = sorted(u.placeholders - c.placeholders)
        detail = "; ".join(
            s
            for s in (
                f"only in client: {', '.join(only_c)}" if only_c else "",
                f"only in upstream: {', '.join(only_u)}" if only_u else "",
            )
            if s
        )
        raise ValueError(
            f"client {client!r} and upstream {upstream!r} use different placeholders ({detail})"
        )
    kinds_c = {p.name: p.path for p in c.parts if isinstance(p, Placeholder)}
    kinds_u = {p.name: p.path for p in u.parts if isinstance(p, Placeholder)}
    if kinds_c != kinds_u:
        raise ValueError(
            f"client {client!r} and upstream {upstream!r}: a placeholder is ':path' on one "
            "side only"
        )
    return Rule(c, u, label, registry)


# --- ambiguity: do two templates produce a common name? -------------------------


# Template automaton tokens: a literal character, or a placeholder.
def _tokens(t: Template) -> list[str | Placeholder]:
    out: list[str | Placeholder] = []
    for p in t.parts:
        out.extend(p) if isinstance(p, str) else out.append(p)
    return out


# NFA state: (index of the next token, whether we are inside that placeholder having
# consumed at least one character of it).
State = tuple[int, bool]


def _steps(tokens: list, state: State, ch: str) -> set[State]:
    i, inside = state
    out: set[State] = set()
    if inside:
        if ch != "/":
            out.add((i, True))
        elif tokens[i].path:
            out.add((i, False))  # a path placeholder goes on after "/" with >= 1 more char
        return out | _steps(tokens, (i + 1, False), ch)  # or the placeholder ends here
    if i < len(tokens):
        token = tokens[i]
        if isinstance(token, Placeholder):
            if ch != "/":
                out.add((i, True))
        elif token == ch:
            out.add((i + 1, False))
    return out


def _accepting(tokens: list, state: State) -> bool:
    i, inside = state
    return i == len(tokens) - 1 if inside else i == len(tokens)


def common_name(a: Template, b: Template) -> str | None:
    """A name both templates can produce, or None. Exact: a product-automaton search."""
    ta, tb = _tokens(a), _tokens(b)
    literal_chars = {t for t in ta + tb if isinstance(t, str)}
    # One character no literal uses stands for all the others a placeholder may take.
    other = next(c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in literal_chars)
    # Letters first, so the example shown in errors is a readable name.
    alphabet = [other] + sorted(literal_chars | {"/"}, key=lambda c: (not c.isalnum(), c))
    start = (frozenset({(0, False)}), frozenset({(0, False)}))
    seen = {start}
    queue = deque([(start, "")])
    while queue:
        (sa, sb), word = queue.popleft()
        if any(_accepting(ta, s) for s in sa) and any(_accepting(tb, s) for s in sb):
            return word
        for ch in alphabet:
            na = frozenset(n for s in sa for n in _steps(ta, s, ch))
            nb = frozenset(n for s in sb for n in _steps(tb, s, ch))
            if na and nb and (na, nb) not in seen:
                seen.add((na, nb))
                queue.append(((na, nb), word + ch))
    return None


# --- the rule set -----------------------------------------------------------------


class Route(NamedTuple):
    registry: int  # which upstream registry serves the name (0: the reverse-mode target)
    name: str  # the repository name there


class RuleSet:
    """Rules in order; the first whose client template matches a name maps it.

    Each side is indexed by the literal text before a template's first placeholder,
    so a lookup tries only the few rules that can match, however many there are;
    results are cached because clients repeat the same few names.
    """

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        forward = _Direction([r.client for r in rules], [r.upstream for r in rules])
        self._forward = forward
        # Names map back only among the rules of the registry that sent them.
        self._backward: dict[int, _Direction] = {}
        for registry in sorted({r.registry for r in rules}):
            own = [r for r in rules if r.registry == registry]
            self._backward[registry] = _Direction(
                [r.upstream for r in own], [r.client for r in own]
            )
        self.lookup = functools.lru_cache(maxsize=4096)(self._lookup)
        self.to_client = functools.lru_cache(maxsize=4096)(self._to_client)

    def _lookup(self, name: str) -> Route | None:
        """Where the first matching rule sends a client name (the name not checked for
        validity), or None when no rule matches."""
        found = self._forward.map(name)
        if found is None:
            return None
        i, upstream = found
        return Route(self.rules[i].registry, upstream)

    def route(self, name: str) -> Route | None:
        """Where a client name goes, or None when no rule maps it to a valid name."""
        found = self.lookup(name)
        return found if found is not None and is_valid_name(found.name) else None

    def to_upstream(self, name: str) -> str | None:
        """The upstream name for a client name, or None when no rule maps it to a valid one."""
        found = self.route(name)
        return found.name if found is not None else None

    def _to_client(self, name: str, registry: int = 0) -> str | None:
        """The client name for a name on upstream ``registry``, or None when no rule maps it
        back.

        An upstream name whose client name an earlier rule sends elsewhere is
        unreachable through the proxy, so it has no client name either.
        """
        if registry not in self._backward:
            return None
        found = self._backward[registry].map(name)
        if found is None or not is_valid_name(found[1]):
            return None
        client = found[1]
        return client if self.lookup(client) == Route(registry, name) else None


class _Direction:
    """One direction of some rules: source templates compiled and indexed by the literal
    text before their first placeholder, and the templates they map to."""

    def __init__(self, sources: list[Template], targets: list[Template]) -> None:
        self.patterns = [re.compile(t.pattern()) for t in sources]
        self.targets = targets
        self.by_prefix: dict[int, dict[str, list[int]]] = {}
        for i, t in enumerate(sources):
            prefix = t.parts[0] if isinstance(t.parts[0], str) else ""
            self.by_prefix.setdefault(len(prefix), {}).setdefault(prefix, []).append(i)

    def map(self, name: str) -> tuple[int, str] | None:
        """(index of the first matching template, the name it maps to), or None."""
        if not is_valid_name(name):
            return None
        candidates = sorted(
            i
            for length, table in self.by_prefix.items()
            if length <= len(name)
            for i in table.get(name[:length], ())
        )
        for i in candidates:
            m = self.patterns[i].fullmatch(name)
            if m is not None:
                return i, self.targets[i].fill(m.groupdict())
        return None
