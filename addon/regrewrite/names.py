"""Repository names and the templates that map them between client and upstream.

A template is a repository name with placeholders: ``{x}`` stands for one path
component (or the rest of one, after or before a literal), ``{x:path}`` for one
or more whole components. A rule pairs a client template with an upstream
template over the same placeholders, so it maps both ways.

No mitmproxy imports here: this is the naming half of the registry protocol. Every
value is immutable, so rules can be built in a worker thread and shared.
"""

from __future__ import annotations

import bisect
import heapq
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

# distribution/reference: components joined by "/", whole name at most 255 chars.
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
NAME_MAX_LENGTH = 255

# What a client may do to a repository through a rule (distribution's scope actions).
ACTIONS = frozenset({"pull", "push", "delete"})

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

# One path component of a template: ("lit", text) matches exactly text; ("one", prefix,
# suffix, placeholder) matches prefix + one or more characters other than "/" + suffix;
# ANY matches any component (inside a {x:path}).
Component = tuple[str, ...]
ANY: Component = ("any",)


@dataclass(frozen=True)
class Shape:
    """A template as components: ``head``, then (if it has a ``{x:path}``) the path's
    components, the first prefixed by ``path``, then ``tail``."""

    head: tuple[Component, ...]
    path: str | None  # the literal before {x:path} in its first component; None: no path
    tail: tuple[Component, ...]
    path_name: str = ""  # the {x:path} placeholder's name

    @property
    def min_length(self) -> int:
        """The fewest components of a name it produces (the exact count without a path)."""
        return len(self.head) + (0 if self.path is None else 1 + len(self.tail))

    def at(self, n: int, i: int) -> Component:
        """Component ``i`` of the ``n``-component names this template produces."""
        if self.path is None or i < len(self.head):
            return self.head[i]
        if i == len(self.head):
            return ("one", self.path, "", self.path_name)
        if i >= n - len(self.tail):
            return self.tail[i - (n - len(self.tail))]
        return ANY


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[Part, ...]
    shape: Shape = field(compare=False, repr=False)
    prefix: str = field(compare=False, repr=False)  # the literal text every name starts with
    suffix: str = field(compare=False, repr=False)  # ... and ends with

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

    def match(self, name: str) -> dict[str, str] | None:
        """The placeholder values that produce ``name``, or None; what a full match of
        ``pattern()`` gives, without compiling a regex for each of 1,000 rules."""
        shape = self.shape
        components = name.split("/")
        n = len(components)
        if n != len(shape.head) if shape.path is None else n < shape.min_length:
            return None
        values: dict[str, str] = {}
        for component, pattern in zip(components, shape.head, strict=False):
            if not _match_component(pattern, component, values):
                return None
        if shape.path is None:
            return values
        t = len(shape.tail)
        for component, pattern in zip(components[n - t :], shape.tail, strict=True):
            if not _match_component(pattern, component, values):
                return None
        middle = components[len(shape.head) : n - t]
        if len(middle[0]) <= len(shape.path) or not middle[0].startswith(shape.path):
            return None
        if not all(middle):
            return None
        values[shape.path_name] = "/".join(middle)[len(shape.path) :]
        return values


def _match_component(pattern: Component, component: str, values: dict[str, str]) -> bool:
    if pattern[0] == "lit":
        return component == pattern[1]
    _, prefix, suffix, name = pattern
    if (
        len(component) <= len(prefix) + len(suffix)
        or not component.startswith(prefix)
        or not component.endswith(suffix)
    ):
        return False
    values[name] = component[len(prefix) : len(component) - len(suffix)]
    return True


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
        # {x:path} spans whole components: after it must come "/" or the end; a literal
        # may prefix its first component.
        if isinstance(part, Placeholder) and part.path:
            after = parts[i + 1] if i + 1 < len(parts) else None
            if after is not None and not (isinstance(after, str) and after.startswith("/")):
                raise ValueError(f"template {text!r}: {{{part.name}:path}} must end its component")
    if not names and not is_valid_name(text):
        raise ValueError(f"template {text!r} is not a valid repository name")
    prefix = parts[0] if isinstance(parts[0], str) else ""
    suffix = parts[-1] if isinstance(parts[-1], str) else ""
    return Template(text, tuple(parts), _shape(components), prefix, suffix)


def _shape(components: list[str]) -> Shape:
    head: list[Component] = []
    tail: list[Component] = []
    path: str | None = None
    path_name = ""
    for component in components:
        m = _PLACEHOLDER.search(component)
        if m is None:
            comp: Component = ("lit", component)
        elif m.group(1).endswith(":path"):
            path = component[: m.start()]  # parse_template made sure it ends the component
            path_name = m.group(1).partition(":")[0]
            continue
        else:
            comp = ("one", component[: m.start()], component[m.end() :], m.group(1))
        (head if path is None else tail).append(comp)
    return Shape(tuple(head), path, tuple(tail), path_name)


@dataclass(frozen=True)
class Rule:
    client: Template
    upstream: Template
    label: str  # how error messages name it, e.g. "rule 2 (team/{r:path} -> acme/{r:path})"
    registry: int = 0  # the upstream registry that serves it (0: the reverse-mode target)
    actions: frozenset[str] = ACTIONS  # what clients may do to names it maps


def parse_rule(
    client: str, upstream: str, label: str, registry: int = 0, actions: frozenset[str] = ACTIONS
) -> Rule:
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
        raise ValueError(f"client and upstream use different placeholders ({detail})")
    kinds_c = {p.name: p.path for p in c.parts if isinstance(p, Placeholder)}
    kinds_u = {p.name: p.path for p in u.parts if isinstance(p, Placeholder)}
    if kinds_c != kinds_u:
        raise ValueError("a placeholder is ':path' on one side only")
    return Rule(c, u, label, registry, actions)


# --- overlap: do two templates produce a common name? -----------------------------
#
# Components are matched independently (no placeholder crosses a "/"), so two templates
# share a name iff, for some component count n, each of their n component patterns pair
# up compatibly. A {x:path} only adds ANY components in the middle, which match
# anything: with two paths, the largest count that separates both heads from both tails
# is the most permissive, so one count decides (common_name below is the slow exact
# reference the tests compare against).


def _sample(c: Component) -> str:
    if c[0] == "lit":
        return c[1]
    if c[0] == "one":
        return c[1] + "a" + c[2]
    return "a"


def _meet(x: Component, y: Component) -> str | None:
    """A component both patterns match, or None."""
    if x is ANY or y is ANY:
        return _sample(y if x is ANY else x)
    if x[0] == "lit" and y[0] == "lit":
        return x[1] if x[1] == y[1] else None
    if x[0] == "lit" or y[0] == "lit":
        (_, text), (_, p, s, _) = (x, y) if x[0] == "lit" else (y, x)
        ok = len(text) > len(p) + len(s) and text.startswith(p) and text.endswith(s)
        return text if ok else None
    (_, p1, s1, _), (_, p2, s2, _) = x, y
    p = p1 if len(p1) >= len(p2) else p2
    s = s1 if len(s1) >= len(s2) else s2
    if not (p.startswith(p1) and p.startswith(p2) and s.endswith(s1) and s.endswith(s2)):
        return None
    return p + "a" + s


def _overlap_at(a: Shape, b: Shape, n: int) -> str | None:
    out = []
    for i in range(n):
        found = _meet(a.at(n, i), b.at(n, i))
        if found is None:
            return None
        out.append(found)
    return "/".join(out)


def overlap(a: Template, b: Template) -> str | None:
    """A name both templates produce, or None. Exact, and linear in their length."""
    sa, sb = a.shape, b.shape
    if sa.path is None and sb.path is None:
        return _overlap_at(sa, sb, len(sa.head)) if len(sa.head) == len(sb.head) else None
    if sa.path is None or sb.path is None:
        n = len(sa.head) if sa.path is None else len(sb.head)
        return _overlap_at(sa, sb, n) if n >= max(sa.min_length, sb.min_length) else None
    widest = sa.min_length + sb.min_length + 1
    if _overlap_at(sa, sb, widest) is None:
        return None
    # The shortest example reads best in an error message.
    for n in range(max(sa.min_length, sb.min_length), widest + 1):
        found = _overlap_at(sa, sb, n)
        if found is not None:
            return found
    return None  # pragma: no cover (widest matched)


def first_overlaps(templates: list[Template]) -> Iterator[tuple[int, int, str]]:
    """For each template ``j`` that shares a name with an earlier one: (the first such
    ``i``, ``j``, a name both produce), in order of ``j``.

    Instead of comparing every pair, each template takes its candidates from the most
    selective of several indexes of necessary conditions: the number of components; the
    literal text names start and end with (prefixes must be prefixes of one another,
    suffixes suffixes); and, at each position it fixes from the front or the back, the
    literal text its component there starts and ends with (``{a}/m1/{b}`` and
    ``{a}/m2/{b}`` differ in the middle, ``{x}.u1/{y}`` and ``{x}.u2/{y}`` at the end of
    the first component). Cheap checks, then the exact ``overlap``, decide each
    candidate, earliest first, up to the first that overlaps.
    """
    shapes = [t.shape for t in templates]
    by_length = _LengthIndex(shapes)
    by_text = _AffixIndex((t.prefix, t.suffix, i) for i, t in enumerate(templates))
    by_position = _PositionIndex(shapes)
    for j, t in enumerate(templates):
        cost, lists = by_length.candidates(j)
        probes = [(len(t.prefix) + len(t.suffix), by_text.candidates(t.prefix, t.suffix), [])]
        probes += by_position.probes(j)
        # The longest literals first: they usually find few candidates, and every later
        # probe stops as soon as it would find more than the best so far.
        probes.sort(key=lambda p: -p[0])
        for _, candidates, always in probes:
            extra = sum(map(len, always))
            if extra >= cost:
                continue
            found = _probe(candidates, min(cost - extra, _PROBE_LIMIT))
            if found is not None:
                cost, lists = len(found) + extra, [found, *always]
        low, high = by_length.bounds[j]
        last = -1
        # Earliest first, and only as far as the first overlap: the lists are sorted.
        for i in heapq.merge(*lists):
            if i >= j:
                break
            if i == last:
                continue
            last = i
            u = templates[i]
            if by_length.bounds[i][0] > high or low > by_length.bounds[i][1]:
                continue
            if not (t.prefix.startswith(u.prefix) or u.prefix.startswith(t.prefix)):
                continue
            if not (t.suffix.endswith(u.suffix) or u.suffix.endswith(t.suffix)):
                continue
            example = overlap(u, t)
            if example is not None:
                yield i, j, example
                break


def _probe(candidates: Iterator[int | None], limit: int) -> list[int] | None:
    """The sorted candidates, or None when there are more than ``limit`` of them (or
    finding them takes more than ``limit`` steps: a None is a step that found nothing)."""
    found: list[int] = []
    steps = 0
    for k in candidates:
        steps += 1
        if steps > limit:
            return None
        if k is not None:
            found.append(k)
    return sorted(set(found))


class _LengthIndex:
    """Templates by how many components their names have."""

    def __init__(self, shapes: list[Shape]) -> None:
        # (fewest, most) components of the names each produces
        self.bounds = [
            (s.min_length, len(s.head) if s.path is None else _UNBOUNDED) for s in shapes
        ]
        self.exact: dict[int, list[int]] = {}
        self.paths: dict[int, list[int]] = {}  # by their fewest
        for i, s in enumerate(shapes):
            (self.exact if s.path is None else self.paths).setdefault(s.min_length, []).append(i)

    def candidates(self, i: int) -> tuple[int, list[list[int]]]:
        """(how many, sorted lists of which) templates can have as many components."""
        low, high = self.bounds[i]
        lists = [ids for n, ids in self.paths.items() if n <= high]
        if high == _UNBOUNDED:
            lists += [ids for n, ids in self.exact.items() if n >= low]
        else:
            lists.append(self.exact.get(low, []))
        return sum(map(len, lists)), lists


_UNBOUNDED = 1 << 30
# A probe that finds more candidates than this is given up: when many templates really
# are compatible, the first of them usually overlaps, and looking at them in order costs
# less than counting them all.
_PROBE_LIMIT = 128


class _AffixIndex:
    """Entries (prefix, suffix, index) by prefix, then suffix: finds those whose prefix
    starts, or is started by, a given one and whose suffix ends, or is ended by, another."""

    def __init__(self, entries) -> None:
        self.by_prefix: dict[str, _SuffixIndex] = {}
        for prefix, suffix, i in entries:
            self.by_prefix.setdefault(prefix, _SuffixIndex()).add(suffix, i)
        for index in self.by_prefix.values():
            index.freeze()
        self.prefix_lengths = sorted({len(p) for p in self.by_prefix})
        self.prefixes = sorted(self.by_prefix)

    def candidates(self, prefix: str, suffix: str) -> Iterator[int | None]:
        """The compatible indices, and a None for each group looked at, so that a caller
        can stop after a given amount of work even when the groups are empty."""
        for k in self.prefix_lengths:  # prefixes of `prefix`, itself included
            if k > len(prefix):
                break
            index = self.by_prefix.get(prefix[:k])
            if index is not None:
                yield None
                yield from index.compatible(suffix)
        start = bisect.bisect_right(self.prefixes, prefix)  # longer ones starting with it
        for longer in self.prefixes[start:]:
            if not longer.startswith(prefix):
                break
            yield None
            yield from self.by_prefix[longer].compatible(suffix)


_AFTER_EVERY_INDEX = float("inf")


class _SuffixIndex:
    """Indices by literal suffix: finds those whose suffix ends, or is ended by, a given one."""

    def __init__(self) -> None:
        self.by_suffix: dict[str, list[int]] = {}
        self.lengths: list[int] = []
        self.reversed: list[tuple[str, int]] = []

    def add(self, suffix: str, i: int) -> None:
        self.by_suffix.setdefault(suffix, []).append(i)

    def freeze(self) -> None:
        self.lengths = sorted({len(s) for s in self.by_suffix})
        self.reversed = sorted((s[::-1], i) for s, ids in self.by_suffix.items() for i in ids)

    def compatible(self, suffix: str) -> Iterator[int]:
        for k in self.lengths:  # suffixes of `suffix`, itself included
            if k > len(suffix):
                break
            yield from self.by_suffix.get(suffix[len(suffix) - k :], ())
        key = suffix[::-1]  # longer suffixes that end with `suffix`
        start = bisect.bisect_right(self.reversed, (key, _AFTER_EVERY_INDEX))
        for rev, i in self.reversed[start:]:
            if not rev.startswith(key):
                break
            yield i


def _fixed(shape: Shape) -> dict[str, tuple[Component, ...]]:
    """The components a template fixes, counted from each end: all of them from both
    ends without a {x:path}; with one, the head (and the path's first component, which
    starts with its prefix) from the front, the tail from the back."""
    if shape.path is None:
        return {"front": shape.head, "back": shape.head[::-1]}
    first: Component = ("one", shape.path, "", shape.path_name)
    return {"front": (*shape.head, first), "back": shape.tail[::-1]}


def _affixes(c: Component) -> tuple[str, str]:
    """The text a component starts and ends with (all of it, for a literal)."""
    return (c[1], c[1]) if c[0] == "lit" else (c[1], c[2])


class _PositionIndex:
    """Templates by the text their component at each fixed position starts and ends with.

    Two templates can only share a name if, at every position both fix, their components
    there can be equal. Past the components a {x:path} template fixes, any component may
    lie (inside its path): it is a candidate for every template at those positions.
    """

    def __init__(self, shapes: list[Shape]) -> None:
        self.shapes = shapes
        entries: dict[tuple[str, int], list[tuple[str, str, int]]] = {}
        # side -> k -> {x:path} templates fixing k components from that end
        self.paths: dict[str, dict[int, list[int]]] = {"front": {}, "back": {}}
        for i, shape in enumerate(shapes):
            for side, fixed in _fixed(shape).items():
                for pos, c in enumerate(fixed):
                    entries.setdefault((side, pos), []).append((*_affixes(c), i))
                if shape.path is not None:
                    self.paths[side].setdefault(len(fixed), []).append(i)
        self.at = {where: _AffixIndex(e) for where, e in entries.items()}

    def probes(self, i: int) -> list[tuple[int, Iterator[int | None], list[list[int]]]]:
        """For each position template ``i`` fixes: (the length of its literals there, its
        compatible candidates there, lazily; the {x:path} templates open there)."""
        out = []
        for side, fixed in _fixed(self.shapes[i]).items():
            for pos, c in enumerate(fixed):
                prefix, suffix = _affixes(c)
                always = [ids for k, ids in self.paths[side].items() if k <= pos]
                weight = len(prefix) + len(suffix)
                out.append((weight, self.at[side, pos].candidates(prefix, suffix), always))
        return out


# --- the slow exact reference: a product-automaton search -------------------------


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
    """A name both templates can produce, or None. Exact but exponential in the worst
    case: the reference ``overlap`` is tested against."""
    ta, tb = _tokens(a), _tokens(b)
    literal_chars = {t for t in ta + tb if isinstance(t, str)}
    # One character no literal uses stands for all the others a placeholder may take
    # (literals hold at most the 39 characters of the name grammar, so "~" is free).
    other = next(c for c in "abcdefghijklmnopqrstuvwxyz0123456789._-~" if c not in literal_chars)
    # Letters first, so the example is a readable name.
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


# --- matching names against many templates -----------------------------------------


class TemplateIndex:
    """Templates in order, each indexed by its longest literal: the text its names start
    with, the text they end with, or a literal component at a fixed position from the
    front or the back. Matching a name then tries only the few templates that can match
    it, however many there are (``{x}.mirror`` and ``{a}/m1/{b}`` included)."""

    def __init__(self, templates: list[Template]) -> None:
        self.templates = tuple(templates)
        prefixes: dict[int, dict[str, list[int]]] = {}
        suffixes: dict[int, dict[str, list[int]]] = {}
        front: dict[int, dict[str, list[int]]] = {}
        back: dict[int, dict[str, list[int]]] = {}
        for i, t in enumerate(templates):
            keys = [(len(t.prefix), prefixes, len(t.prefix), t.prefix)]
            keys.append((len(t.suffix), suffixes, len(t.suffix), t.suffix))
            for side, fixed in _fixed(t.shape).items():
                for pos, c in enumerate(fixed):
                    if c[0] == "lit":
                        keys.append((len(c[1]), front if side == "front" else back, pos, c[1]))
            # Longest first; on a tie the prefix (listed first), which every lookup tries.
            _, table, where, key = max(keys, key=lambda k: k[0])
            table.setdefault(where, {}).setdefault(key, []).append(i)
        self.prefixes = tuple(prefixes.items())
        self.suffixes = tuple(suffixes.items())
        self.front = tuple(front.items())
        self.back = tuple(back.items())

    def matches(self, name: str) -> Iterator[tuple[int, dict[str, str]]]:
        """(index, placeholder values) of every template that produces ``name``, in order."""
        n = len(name)
        candidates: list[int] = []
        for length, table in self.prefixes:
            if length <= n:
                candidates += table.get(name[:length], ())
        for length, table in self.suffixes:
            if length <= n:
                candidates += table.get(name[n - length :], ())
        if self.front or self.back:
            components = name.split("/")
            for pos, table in self.front:
                if pos < len(components):
                    candidates += table.get(components[pos], ())
            for pos, table in self.back:
                if pos < len(components):
                    candidates += table.get(components[-1 - pos], ())
        for i in sorted(candidates):
            values = self.templates[i].match(name)
            if values is not None:
                yield i, values

    def first(self, name: str) -> tuple[int, dict[str, str]] | None:
        return next(self.matches(name), None)
