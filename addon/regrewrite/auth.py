"""Token auth: scopes, ``WWW-Authenticate`` challenges and token request forms.

See the distribution token spec: a registry answers 401 with
``WWW-Authenticate: Bearer realm="...",service="...",scope="..."`` and the client
asks the realm for a token, naming the scopes it needs (``type:name:actions``).
No mitmproxy imports here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote_plus

from .api import MapName

# The actions a client name may ask for (read-only rules); None: the name has no rule.
AllowActions = Callable[[str], frozenset[str] | None]
WRITE_ACTIONS = frozenset({"push", "delete", "*"})


# --- scopes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    type: str  # "repository", "repository(plugin)", "registry", ...
    name: str  # may carry host:port, hence the split on the first and the last colon
    actions: str  # as sent: "pull,push", "*", ...

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{self.actions}"

    @property
    def is_repository(self) -> bool:
        return self.type == "repository" or self.type.startswith("repository(")


def parse_scope(text: str) -> Scope:
    first, last = text.find(":"), text.rfind(":")
    if first <= 0 or last == first or last == len(text) - 1 or first + 1 == last:
        raise ValueError(f"scope {text!r} is not type:name:actions")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"scope {text!r} holds whitespace or control characters")
    return Scope(text[:first], text[first + 1 : last], text[last + 1 :])


def parse_scopes(value: str) -> list[Scope]:
    """The repository scopes of a space-separated list; others and malformed ones skipped."""
    out = []
    for text in value.split(" "):
        try:
            scope = parse_scope(text)
        except ValueError:
            continue
        if scope.is_repository:
            out.append(scope)
    return out


def basic_credentials(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class MappedScopes(NamedTuple):
    value: str  # the space-separated scopes to send on
    mapped: tuple[tuple[str, str], ...]  # (before, after) for each repository scope
    dropped: tuple[str, ...]  # scopes no rule maps, or that don't parse


def narrow_actions(actions: str, allowed: frozenset[str] | None) -> str:
    """``actions`` less the writes (push, delete, ``*``) ``allowed`` does not grant;
    other actions (``pull``, Azure's ``metadata_read``) pass as they are."""
    if allowed is None:
        return actions
    kept = [
        a
        for a in actions.split(",")
        if a not in WRITE_ACTIONS or a in allowed or (a == "*" and {"push", "delete"} <= allowed)
    ]
    return ",".join(kept)


def map_scopes(
    value: str,
    map_name: MapName,
    allow: AllowActions | None = None,
    allow_target: bool = False,
) -> MappedScopes:
    """Map the names in a space-separated list of scopes.

    Repository scopes whose name ``map_name`` can't map are dropped, so no token is
    ever asked for a name outside the rules; other types (``registry:catalog:*``)
    pass as they are. ``allow`` narrows each scope's actions to what the rules allow for
    its client name: the source name, or with ``allow_target`` the mapped one.
    """
    out: list[str] = []
    mapped: list[tuple[str, str]] = []
    dropped: list[str] = []
    for text in value.split(" "):
        if not text:
            continue
        try:
            scope = parse_scope(text)
        except ValueError:
            dropped.append(text)
            continue
        if not scope.is_repository:
            out.append(text)
            continue
        name = map_name(scope.name)
        if name is None:
            dropped.append(text)
            continue
        actions = scope.actions
        if allow is not None:
            actions = narrow_actions(actions, allow(name if allow_target else scope.name))
            if not actions:
                dropped.append(text)
                continue
        new = str(Scope(scope.type, name, actions))
        out.append(new)
        mapped.append((text, new))
    return MappedScopes(" ".join(out), tuple(mapped), tuple(dropped))


# --- application/x-www-form-urlencoded (token GET query and OAuth2 POST body) -------


def form_values(raw: str, field: str) -> list[str]:
    return [unquote_plus(v) for k, v in _pairs(raw) if unquote_plus(k) == field]


def replace_form_values(raw: str, field: str, replace: Callable[[str], str | None]) -> str:
    """Rewrite every ``field`` in a form; other pairs keep their exact bytes.

    ``replace`` returns the new decoded value, or None to drop the pair.
    """
    out = []
    for pair in raw.split("&"):
        key, sep, value = pair.partition("=")
        if unquote_plus(key) == field:
            new = replace(unquote_plus(value))
            if new is None:
                continue
            pair = f"{key}={quote(new, safe=':/,*()@')}"
        out.append(pair)
    return "&".join(p for p in out if p)


def set_form_value(raw: str, field: str, value: str) -> str:
    """Replace ``field`` (or add it, when the form has none)."""
    if form_values(raw, field):
        return replace_form_values(raw, field, lambda _: value)
    return "&".join(p for p in (raw, f"{field}={quote(value, safe=':/,*()@')}") if p)


SECRET_FIELDS = ("password", "refresh_token", "access_token", "client_secret")


def redact_form(raw: str) -> str:
    """The form with its secret fields (OAuth2 password and token grants) blanked."""
    out = raw
    for field in SECRET_FIELDS:
        out = replace_form_values(out, field, lambda _: "<redacted>")
    return out


def _pairs(raw: str) -> list[tuple[str, str]]:
    return [tuple(p.partition("=")[::2]) for p in raw.split("&") if p]  # type: ignore[misc]


# --- WWW-Authenticate challenges (RFC 9110 section 11.6.1) ---------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: tuple[tuple[str, str], ...] = ()  # in order; names as sent
    token68: str | None = None

    def get(self, name: str) -> str | None:
        for key, value in self.params:
            if key.lower() == name:
                return value
        return None

    def replace(self, **values: str | None) -> Challenge:
        """Set (or, with None, remove) parameters, keeping the order of the others."""
        params = []
        todo = dict(values)
        for key, value in self.params:
            if key.lower() in todo:
                new = todo.pop(key.lower())
                if new is not None:
                    params.append((key, new))
            else:
                params.append((key, value))
        params += [(k, v) for k, v in todo.items() if v is not None]
        return Challenge(self.scheme, tuple(params), self.token68)

    def __str__(self) -> str:
        if self.token68 is not None:
            return f"{self.scheme} {self.token68}"
        if not self.params:
            return self.scheme
        return f"{self.scheme} " + ",".join(f"{k}={_quote(v)}" for k, v in self.params)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_LEX = re.compile(
    rf"""\s*(?:
        (?P<comma>,)
      | (?P<param>{_TOKEN})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>{_TOKEN}))
      | (?P<token68>[A-Za-z0-9._~+/-]+=*)(?=\s*(?:,|$))
      | (?P<scheme>{_TOKEN})
    )""",
    re.VERBOSE,
)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse one ``WWW-Authenticate`` value: several challenges may share it, and quoted
    values may hold commas."""
    challenges: list[Challenge] = []
    scheme: str | None = None
    params: list[tuple[str, str]] = []
    token68: str | None = None
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = _LEX.match(header, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot parse challenge {header!r} at {header[pos:]!r}")
        pos = m.end()
        if m.group("comma"):
            continue
        if m.group("param") is not None and scheme is not None and token68 is None:
            value = m.group("quoted")
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else m.group("bare")
            params.append((m.group("param"), value))
        elif m.group("scheme") is not None or m.group("token68") is not None:
            word = m.group("scheme") or m.group("token68")
            if scheme is not None and not params and token68 is None and m.group("token68"):
                token68 = word  # "Basic dXNlcg==": the rest of the challenge is one token
                continue
            if scheme is not None:
                challenges.append(Challenge(scheme, tuple(params), token68))
            scheme, params, token68 = word, [], None
        else:
            raise ValueError(f"cannot parse challenge {header!r} at {m.group(0)!r}")
    if scheme is not None:
        challenges.append(Challenge(scheme, tuple(params), token68))
    return challenges


def format_challenges(challenges: list[Challenge]) -> str:
    return ", ".join(str(c) for c in challenges)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RewrittenChallenge(NamedTuple):
    header: str
    realm: str | None  # the upstream's realm and service, as the challenge named them
    service: str | None


def rewrite_challenge(
    header: str,
    realm: str,
    map_name: MapName,
    service: str | None = None,
    allow: AllowActions | None = None,
) -> RewrittenChallenge:
    """Point every Bearer challenge at this proxy's token endpoint (``realm``) and
    map the names in its ``scope`` back to client names, asking only for the actions
    ``allow`` grants. Other schemes pass unchanged. ``service``, when given, replaces the
    upstream's. Raises ValueError for a header it cannot parse."""
    challenges = parse_challenges(header)
    upstream_realm = upstream_service = None
    out = []
    for c in challenges:
        if c.scheme.lower() != "bearer":
            out.append(c)
            continue
        upstream_realm = c.get("realm") or upstream_realm
        upstream_service = c.get("service") or upstream_service
        scope = c.get("scope")
        new_scope = (
            map_scopes(scope, map_name, allow, allow_target=True).value
            if scope is not None
            else None
        )
        changes: dict[str, str | None] = {"realm": realm, "scope": new_scope or None}
        if service is not None:
            changes["service"] = service
        out.append(c.replace(**changes))
    return RewrittenChallenge(format_challenges(out), upstream_realm, upstream_service)
