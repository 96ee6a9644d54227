"""What registry traffic means, for people reading it in mitmweb, mitmproxy or mitmdump.

``RegistryContentview`` is a mitmproxy 12 contentview (it implements the
``mitmproxy.contentviews.Contentview`` protocol: ``name``, ``syntax_highlight``,
``prettify`` and ``render_priority``) for the messages of a registry:

- token responses: the JWT's claims (issuer, subject, audience, times, the ``access``
  list), decoded without verifying the signature; the token, refresh token and any
  other secret are withheld;
- requests with ``Authorization: Bearer``: the claims of the token they carry (the addon
  keeps them in ``flow.metadata`` before it redacts the header);
- manifests and indexes (OCI and Docker): media type, config, layers with sizes,
  platforms;
- tags/list and _catalog: the names as the client sees them and as the upstream has them;
- registry errors and 401/403 answers: the errors, the challenge and the token presented.

Everything here is plain functions over bytes and dicts; no mitmproxy imports, so the
view is tested without a proxy. The addon registers the view with mitmproxy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from . import api, auth
from .rules import Rules

# Above JSON's 1, so the automatic choice in mitmweb, mitmproxy and mitmdump is this view.
PRIORITY = 2.0
# Manifests are at most 4 MiB (distribution's limit); larger bodies are blobs.
MAX_JSON = 4 << 20

WITHHELD = "<withheld>"
# Response fields that hold credentials: never shown, whatever the response is.
SECRET_KEYS = frozenset(
    {"token", "access_token", "refresh_token", "id_token", "password", "client_secret"}
)
# A JWT (or any base64url JSON object with two dots) anywhere in the rendered text.
_JWT_TEXT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MEDIA_TYPE_NAMES = {
    OCI_MANIFEST: "OCI image manifest",
    OCI_INDEX: "OCI image index",
    DOCKER_MANIFEST: "Docker image manifest (schema 2)",
    DOCKER_LIST: "Docker manifest list",
    DOCKER_V1: "Docker image manifest (schema 1)",
    DOCKER_V1_SIGNED: "Docker image manifest (schema 1, signed)",
}
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
CACHE_STATES = {
    "hit": "hit (served from the cache after the upstream confirmed this client's right)",
    "miss": "miss (fetched from the upstream, cached once its digest matched)",
    "wait": "hit after a single-flight wait (another client's download of it finished)",
    "challenge": "answered as the upstream answered the same request without credentials "
    "in the last seconds",
    "relayed": "a hit's signed /blobs/ URL that reached the proxy (the balancer does not "
    "route /blobs/), relayed from the local blob server",
}


# --- JWT ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Jwt:
    """A JWT's header and claims; the signature is neither kept nor checked."""

    header: dict
    claims: dict


def decode_jwt(token: str) -> Jwt | None:
    """The header and claims of a compact JWS, or None when ``token`` is not one."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
    except (ValueError, binascii.Error, RecursionError):  # nesting past the stack: not a JWT
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return Jwt(header, claims)


def _b64url(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def bearer_info(authorization: str | None) -> dict | None:
    """What may be kept of an ``Authorization: Bearer <JWT>`` value once it is redacted:
    ``{"header": ..., "claims": ...}`` (plain JSON values), or None for anything else."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    jwt = decode_jwt(credentials)
    if jwt is None:
        return None
    return {"header": _public_header(jwt.header), "claims": jwt.claims}


def _public_header(header: dict) -> dict:
    # alg/kid/typ say how it was signed; x5c and jwk would only be noise.
    return {k: header[k] for k in ("alg", "kid", "typ") if k in header}


# --- time -----------------------------------------------------------------------------


def format_time(value: Any, now: float) -> str:
    """``2025-06-01 12:00:00 UTC (in 4m 59s)`` for a NumericDate claim."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return repr(value)
    try:
        stamp = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return repr(value)
    delta = value - now
    if abs(delta) < 1:
        rel = "now"
    elif delta > 0:
        rel = f"in {format_duration(delta)}"
    else:
        rel = f"{format_duration(-delta)} ago"
    return f"{stamp} ({rel})"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else ""]
    parts += [f"{minutes}m" if minutes else "", f"{secs}s" if secs or not seconds else ""]
    return " ".join(p for p in parts if p)


def format_size(size: Any) -> str:
    if isinstance(size, bool) or not isinstance(size, int):
        return f"size {size!r}"
    if size < 1024:
        return f"{size} B"
    value, unit = float(size), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit} ({size} B)"


# --- claims ---------------------------------------------------------------------------

_TIME_CLAIMS = (("iat", "issued at"), ("nbf", "not before"), ("exp", "expires"))
_KNOWN_CLAIMS = {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "access"}


def describe_claims(
    jwt: Jwt, now: float, client_name: api.MapName | None = None, indent: str = "  "
) -> list[str]:
    """The claims of a registry token, one per line (``access`` one entry a line)."""
    c = jwt.claims
    lines = []
    if "iss" in c:
        lines.append(f"issuer: {_text(c['iss'])}")
    if "sub" in c:
        lines.append(f"subject: {_text(c['sub']) or '(anonymous)'}")
    if "aud" in c:
        aud = c["aud"]
        lines.append(
            f"audience: {', '.join(map(_text, aud)) if isinstance(aud, list) else _text(aud)}"
        )
    for key, label in _TIME_CLAIMS:
        if key in c:
            lines.append(f"{label}: {format_time(c[key], now)}")
    if isinstance(c.get("exp"), int | float) and c["exp"] < now:
        lines.append("EXPIRED")
    if "jti" in c:
        lines.append(f"jwt id: {_text(c['jti'])}")
    signed = [_text(jwt.header["alg"])] if "alg" in jwt.header else []
    if "kid" in jwt.header:
        signed.append(f"key id {_text(jwt.header['kid'])}")
    if signed:
        lines.append(f"signed: {', '.join(signed)} (signature not verified)")
    lines += describe_access(c.get("access"), client_name)
    for key in sorted(set(c) - _KNOWN_CLAIMS):
        lines.append(f"{key}: {_compact(c[key])}")
    return [indent + line for line in lines]


def describe_access(access: Any, client_name: api.MapName | None = None) -> list[str]:
    if access is None:
        return ["access: (no access claim)"]
    if not isinstance(access, list):
        return [f"access: {_compact(access)}"]
    if not access:
        return ["access: [] (nothing granted)"]
    lines = ["access:"]
    for entry in access:
        if not isinstance(entry, dict):
            lines.append(f"  - {_compact(entry)}")
            continue
        rtype = _text(entry.get("type", "?"))
        if entry.get("class"):
            rtype += f"({_text(entry['class'])})"
        name = entry.get("name", "?")
        actions = entry.get("actions")
        if isinstance(actions, list):
            acts = ", ".join(map(_text, actions)) or "(no actions)"
        else:
            acts = _compact(actions)
        line = f"  - {rtype} {_text(name)}: {acts}"
        if client_name is not None and isinstance(name, str) and rtype.startswith("repository"):
            client = client_name(name)
            if client is None:
                line += "  # no client name maps here"
            elif client != name:
                line += f"  # client name {client}"
        lines.append(line)
    return lines


def token_shortfall(body: bytes, requested: Sequence[tuple[str, str]]) -> list[str]:
    """Scopes (client names, missing actions only) a token response did not grant.

    ``requested`` pairs each scope as the client asked for it with the scope sent
    upstream. Empty when everything was granted or the token cannot be read (opaque).
    """
    doc = parse_json(body)
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    jwt = decode_jwt(token) if isinstance(token, str) else None
    if jwt is None:
        return []
    granted: dict[tuple[str, str], set[str]] = {}
    access = jwt.claims.get("access")
    for entry in access if isinstance(access, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("actions"), list):
            rtype = str(entry.get("type", ""))
            if entry.get("class"):
                rtype += f"({entry['class']})"
            key = (rtype, str(entry.get("name", "")))
            granted.setdefault(key, set()).update(map(str, entry["actions"]))
    out = []
    for client_text, upstream_text in requested:
        try:
            client, upstream = auth.parse_scope(client_text), auth.parse_scope(upstream_text)
        except ValueError:
            continue
        have = granted.get((upstream.type, upstream.name), set())
        if "*" in have:
            continue
        missing = [a for a in upstream.actions.split(",") if a and a not in have]
        if missing:
            out.append(f"{client.type}:{client.name}:{','.join(missing)}")
    return out


# --- auth failures ----------------------------------------------------------------------


@dataclass(frozen=True)
class AuthNote:
    comment: str
    failed: bool  # credentials were sent and refused: worth a mark


def auth_note(status: int, challenges: Iterable[str], authorization: str | None) -> AuthNote:
    """The flow comment for a 401/403 answer, e.g.
    ``auth: 401 insufficient_scope for repository:team/app:push``.

    A 401 to a request without credentials is the first step of the token dance, not a
    failure; a 403, or a 401 to a request that carried credentials or whose challenge
    names an error, is."""
    error = scope = None
    for value in challenges:
        try:
            parsed = auth.parse_challenges(value)
        except ValueError:
            continue
        for c in parsed:
            error = error or c.get("error")
            scope = scope or c.get("scope")
    sent = bool(authorization and authorization.strip())
    words = [f"auth: {status}"]
    if error:
        words.append(error)
    elif status == 401 and not sent:
        words.append("challenge")
    elif sent:
        words.append(f"{authorization.split(' ', 1)[0]} credentials refused")
    if scope:
        words.append(f"for {_sorted_actions(scope)}")
    return AuthNote(" ".join(words), status == 403 or sent or bool(error))


def _sorted_actions(scopes: str) -> str:
    """Scopes with their actions in a stable order (distribution's varies)."""
    out = []
    for text in scopes.split():
        try:
            scope = auth.parse_scope(text)
        except ValueError:
            out.append(text)
            continue
        actions = ",".join(sorted(scope.actions.split(",")))
        out.append(str(auth.Scope(scope.type, scope.name, actions)))
    return " ".join(out)


# --- JSON documents -------------------------------------------------------------------


def parse_json(data: bytes) -> Any:
    """The JSON object in ``data``, or None; cheap for anything that is not one.

    Not cached: a cache would keep token responses (secrets) and 4 MiB manifests in
    memory after their flows are gone; the view parses only what someone looks at."""
    if not data or len(data) > MAX_JSON or data.lstrip()[:1] != b"{":
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def is_token_document(doc: Any) -> bool:
    return isinstance(doc, dict) and any(
        isinstance(doc.get(k), str) for k in ("token", "access_token", "refresh_token")
    )


def manifest_type(doc: Any, content_type: str | None) -> str | None:
    """The media type of a manifest or index, or None when ``doc`` is neither."""
    if not isinstance(doc, dict):
        return None
    media = doc.get("mediaType")
    if isinstance(media, str) and media in MEDIA_TYPE_NAMES:
        return media
    if content_type in MEDIA_TYPE_NAMES:
        return content_type
    if doc.get("schemaVersion") == 2:
        if isinstance(doc.get("manifests"), list):
            return OCI_INDEX
        if isinstance(doc.get("layers"), list) or isinstance(doc.get("config"), dict):
            return OCI_MANIFEST
    if doc.get("schemaVersion") == 1 and isinstance(doc.get("fsLayers"), list):
        return DOCKER_V1_SIGNED if "signatures" in doc else DOCKER_V1
    return None


def describe_token_response(
    doc: dict, now: float, client_name: api.MapName | None = None
) -> list[str]:
    lines = ["# registry token: claims decoded, signature not verified; the token is withheld"]
    tokens = {k: doc[k] for k in ("token", "access_token") if isinstance(doc.get(k), str)}
    shown: dict[str, str] = {}
    for key, value in tokens.items():
        if value in shown.values():
            same = next(k for k, v in shown.items() if v == value)
            lines.append(f"{key}: (same as {same})")
            continue
        shown[key] = value
        jwt = decode_jwt(value)
        if jwt is None:
            lines.append(f"{key}: opaque, {len(value)} characters {WITHHELD}")
        else:
            lines.append(f"{key}:")
            lines += describe_claims(jwt, now, client_name)
    for key, value in doc.items():
        if key in tokens:
            continue
        if key in SECRET_KEYS:
            size = f" ({len(value)} characters)" if isinstance(value, str) else ""
            lines.append(f"{key}: {WITHHELD}{size}")
        elif key == "expires_in" and isinstance(value, int | float):
            lines.append(f"expires_in: {value} ({format_duration(value)})")
        else:
            lines.append(f"{key}: {_compact(value)}")
    return lines


def describe_manifest(doc: dict, media: str, data: bytes | None = None) -> list[str]:
    lines = [f"# {MEDIA_TYPE_NAMES.get(media, media)}", f"media type: {media}"]
    if data is not None:
        lines.append(f"digest: sha256:{hashlib.sha256(data).hexdigest()} (of this body)")
    if doc.get("artifactType"):
        lines.append(f"artifact type: {_text(doc['artifactType'])}")
    if media in INDEX_TYPES:
        manifests = doc.get("manifests")
        manifests = manifests if isinstance(manifests, list) else []
        lines.append(f"manifests: {len(manifests)}")
        for m in manifests:
            if not isinstance(m, dict):
                lines.append(f"  - {_compact(m)}")
                continue
            lines.append(f"  - {format_platform(m.get('platform'))}: {_descriptor(m)}")
    elif media in (DOCKER_V1, DOCKER_V1_SIGNED):
        for key in ("name", "tag", "architecture"):
            if key in doc:
                lines.append(f"{key}: {_text(doc[key])}")
        fs = doc.get("fsLayers") if isinstance(doc.get("fsLayers"), list) else []
        lines.append(f"layers: {len(fs)} (schema 1 lists them newest first, without sizes)")
        for layer in fs:
            blob = layer.get("blobSum") if isinstance(layer, dict) else layer
            lines.append(f"  - {_text(blob)}")
    else:
        config = doc.get("config")
        if isinstance(config, dict):
            lines.append(f"config: {_descriptor(config)}")
        layers = doc.get("layers")
        layers = layers if isinstance(layers, list) else []
        sizes = [x.get("size") for x in layers if isinstance(x, dict)]
        total = sum(s for s in sizes if isinstance(s, int) and not isinstance(s, bool))
        lines.append(f"layers: {len(layers)}, {format_size(total)} in all")
        for layer in layers:
            lines.append(
                f"  - {_descriptor(layer) if isinstance(layer, dict) else _compact(layer)}"
            )
    subject = doc.get("subject")
    if isinstance(subject, dict):
        lines.append(f"subject: {_descriptor(subject)}")
    annotations = doc.get("annotations")
    if isinstance(annotations, dict) and annotations:
        lines.append("annotations:")
        lines += [f"  {_text(k)}: {_compact(v)}" for k, v in annotations.items()]
    return lines


def format_platform(platform: Any) -> str:
    if not isinstance(platform, dict):
        return "(no platform)"
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    text = "/".join(_text(p) for p in parts if p)
    if platform.get("os.version"):
        text += f" {_text(platform['os.version'])}"
    return text or "(no platform)"


def _descriptor(d: dict) -> str:
    parts = [_text(d.get("digest", "?")), format_size(d.get("size"))]
    if d.get("mediaType"):
        parts.append(_text(d["mediaType"]))
    if d.get("artifactType"):
        parts.append(f"artifact {_text(d['artifactType'])}")
    ref = (d.get("annotations") or {}).get("org.opencontainers.image.ref.name")
    if ref:
        parts.append(f"ref {_text(ref)}")
    return "  ".join(parts)


def describe_tags(doc: dict, upstream_name: str | None) -> list[str]:
    name = doc.get("name")
    tags = doc.get("tags")
    tags = tags if isinstance(tags, list) else []
    lines = ["# tags/list"]
    if isinstance(name, str) and upstream_name and upstream_name != name:
        lines.append(f"repository: {name} → {upstream_name} (client → upstream)")
    else:
        lines.append(f"repository: {_text(name)}")
    lines.append(f"tags: {len(tags)}")
    lines += [f"  - {_text(t)}" for t in tags]
    return lines


def describe_catalog(doc: dict, upstream_name: api.MapName | None) -> list[str]:
    repos = doc.get("repositories")
    repos = repos if isinstance(repos, list) else []
    lines = [f"# _catalog: {len(repos)} repositories (client name → upstream name)"]
    for name in repos:
        upstream = upstream_name(name) if upstream_name and isinstance(name, str) else None
        lines.append(f"  - {_text(name)} → {upstream if upstream else '?'}")
    return lines


def describe_errors(doc: Any, status: int | None) -> list[str]:
    lines = [f"# registry error{f' ({status})' if status else ''}"]
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list):
        lines.append("errors:")
        for e in errors:
            if not isinstance(e, dict):
                lines.append(f"  - {_compact(e)}")
                continue
            lines.append(f"  - {_text(e.get('code', '?'))}: {_text(e.get('message', ''))}")
            if "detail" in e:
                lines.append(f"    detail: {_describe_detail(e['detail'])}")
    elif isinstance(doc, dict):
        lines += [f"{_text(k)}: {_compact(v)}" for k, v in doc.items() if k not in SECRET_KEYS]
    return lines


def _describe_detail(detail: Any) -> str:
    """distribution's access-denied detail (``[{"Type", "Class", "Name", "Action"}]``) as
    ``repository team/app: pull, push``; anything else as compact JSON."""
    if not isinstance(detail, list) or not detail:
        return _compact(detail)
    grouped: dict[tuple[str, str], list[str]] = {}
    for item in detail:
        if not isinstance(item, dict) or not {"Type", "Name", "Action"} <= set(item):
            return _compact(detail)
        rtype = _text(item["Type"]) + (f"({_text(item['Class'])})" if item.get("Class") else "")
        grouped.setdefault((rtype, _text(item["Name"])), []).append(_text(item["Action"]))
    return "; ".join(f"{t} {n}: {', '.join(a)}" for (t, n), a in grouped.items())


def describe_challenges(values: Iterable[str]) -> list[str]:
    lines = []
    for value in values:
        try:
            challenges = auth.parse_challenges(value)
        except ValueError:
            lines.append(f"challenge: {_text(value)}")
            continue
        for c in challenges:
            lines.append(f"challenge: {_text(c.scheme)}")
            if c.token68 is not None:
                lines.append(f"  {_text(c.token68)}")
            lines += [f"  {_text(k)}: {_text(v)}" for k, v in c.params]
    return lines


def describe_token_request(form: str) -> list[str]:
    lines = ["# token request (OAuth2 form); secrets withheld"]
    for pair in form.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        key = unquote_plus(key)
        shown = WITHHELD if key in SECRET_KEYS else unquote_plus(value)
        lines.append(f"{key}: {shown}")
    return lines


# --- the rules, for the registry.rules command ------------------------------------------


def describe_rules(
    rules: Rules,
    rules_file: str | None,
    realm: str | None,
    service: str | None,
    public_url: str | None = None,
    learned: dict[str, tuple[str | None, str | None]] | None = None,
) -> str:
    """The text of the ``registry.rules`` command. ``realm`` and ``service`` are what was
    learned from the default upstream's challenges, ``learned`` the same by upstream key."""
    learned = dict(learned or {})
    learned.setdefault("default", (realm, service))
    n = len(rules.names.rules)
    lines = [
        f"rules file: {rules_file or '(none loaded)'} ({n} rule{'s' if n != 1 else ''})",
        f"unmatched: {rules.unmatched}",
        f"token_path: {rules.token_path}",
        f"public url: {public_url or '(derived from each client connection)'}",
    ]
    upstreams = getattr(rules, "upstreams", None) or ()
    keys = [getattr(u, "key", "default") for u in upstreams] or ["default"]
    for i, key in enumerate(keys):
        up = upstreams[i] if upstreams else rules
        prefix = "upstream" if len(keys) == 1 else f"upstream {key}"
        if len(keys) > 1:
            url = getattr(up, "url", None) or "the reverse-mode target"
            lines.append(f"{prefix}: {url}")
            mirror_of = getattr(up, "mirror_of", ())
            if mirror_of:
                lines.append(f"{prefix} mirror of: {', '.join(mirror_of)}")
        credentials = getattr(up, "credentials", None)
        if credentials is not None:
            who = {
                "client": "the client's own",
                "anonymous": "none (anonymous)",
                "account": f"the proxy's account {credentials.username} (password hidden)",
            }[credentials.mode]
            lines.append(f"{prefix} credentials: {who}")
        lines += _realm_lines(prefix, up.realm, up.service, *learned.get(key, (None, None)))
    lines.append("rules (the first that matches maps a name, both ways):")
    for i, rule in enumerate(rules.names.rules, start=1):
        registry = getattr(rule, "registry", 0)
        via = f" @{keys[registry]}" if registry and registry < len(keys) else ""
        actions = getattr(rule, "actions", None)
        only = (
            f" (only {', '.join(sorted(actions))})"
            if actions is not None and actions != frozenset({"pull", "push", "delete"})
            else ""
        )
        lines.append(f"  {i}. {rule.client.text} → {rule.upstream.text}{via}{only}")
    if not n:
        lines.append("  (none)")
    for alias in getattr(rules, "aliases", ()):
        # Names both produce map back through the earlier rule; the later one's are aliases.
        lines.append(f"  {alias.later} is an alias of {alias.earlier} for e.g. {alias.example}")
    return "\n".join(lines)


def _realm_lines(
    prefix: str,
    configured_realm: str | None,
    configured_service: str | None,
    realm: str | None,
    service: str | None,
) -> list[str]:
    lines = []
    if configured_realm:
        lines.append(f"{prefix} realm: {configured_realm} (from the rules file)")
        if realm and realm != configured_realm:
            lines.append(f"  the upstream advertises {realm}, which is ignored")
    elif realm:
        lines.append(f"{prefix} realm: {realm} (learned from the upstream's challenge)")
    else:
        lines.append(f"{prefix} realm: not known yet (learned from the first 401 challenge)")
    if configured_service:
        lines.append(f"{prefix} service: {configured_service} (from the rules file)")
    elif service:
        lines.append(f"{prefix} service: {service} (learned from the upstream's challenge)")
    else:
        lines.append(f"{prefix} service: not known yet")
    return lines


def client_namer(rules: Rules) -> api.MapName:
    """Client names for upstream names of any upstream (the first that maps one)."""
    count = len(getattr(rules, "upstreams", ()) or ()) or 1
    if count == 1:
        return rules.client_name

    def client_name(name: str) -> str | None:
        for registry in range(count):
            found = rules.client_name(name, registry)
            if found is not None:
                return found
        return None

    return client_name


def upstream_namer(rules: Rules) -> api.MapName:
    """Upstream names for client names; ``name @key`` when another upstream serves it."""
    upstreams = getattr(rules, "upstreams", None)
    if not upstreams or len(upstreams) == 1 or not hasattr(rules, "route"):
        return rules.upstream_name

    def upstream_name(name: str) -> str | None:
        found = rules.route(name)
        if found is None:
            return None
        return found.name + (f" @{upstreams[found.registry].key}" if found.registry else "")

    return upstream_name


# --- the contentview ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """What the view needs to know of one HTTP message (built from mitmproxy's
    ``Metadata`` by ``message_from_metadata``; tests build it directly)."""

    is_request: bool
    path: str = ""  # the request's path as sent upstream (query included)
    method: str = ""
    content_type: str | None = None
    status: int | None = None  # the response's, for responses
    authorization: str | None = None  # the request's header (possibly redacted)
    bearer: dict | None = None  # bearer_info() the addon kept before redacting
    token_flow: bool = False  # the addon answered it from the token realm
    cache: str | None = None  # the blob cache's part: "hit", "miss" or "wait"
    challenges: tuple[str, ...] = ()  # the response's WWW-Authenticate values


def message_from_metadata(metadata: Any) -> Message | None:
    """Read a mitmproxy ``contentviews.Metadata`` without importing mitmproxy."""
    msg = getattr(metadata, "http_message", None)
    if msg is None:
        return None
    flow = getattr(metadata, "flow", None)
    request = getattr(flow, "request", None)
    if flow is not None:
        is_request = msg is request
    else:
        is_request = hasattr(msg, "method")
        request = msg if is_request else None
    fmeta = getattr(flow, "metadata", None) or {}
    headers = getattr(msg, "headers", {})
    req_headers = getattr(request, "headers", {}) if request is not None else {}
    status = None if is_request else getattr(msg, "status_code", None)
    challenges: tuple[str, ...] = ()
    if not is_request and hasattr(headers, "get_all"):
        challenges = tuple(headers.get_all("WWW-Authenticate"))
    return Message(
        is_request=is_request,
        path=getattr(request, "path", "") or "",
        method=getattr(request, "method", "") or "",
        content_type=getattr(metadata, "content_type", None),
        status=status,
        authorization=req_headers.get("Authorization"),
        bearer=fmeta.get("registry_bearer"),
        token_flow=bool(fmeta.get("registry_token")),
        cache=fmeta.get("registry_cache"),
        challenges=challenges,
    )


def classify(data: bytes, msg: Message, token_path: str | None = None) -> str | None:
    """Which registry message this is: token, token_request, bearer, manifest, tags,
    catalog, errors; None for anything this view does not describe."""
    path, _ = api.split_target(msg.path)
    doc = parse_json(data)
    if msg.is_request:
        if (msg.token_flow or (token_path and path == token_path)) and data:
            if doc is None and b"=" in data:
                return "token_request"
        if manifest_type(doc, msg.content_type):
            return "manifest"
        if _bearer(msg) is not None and not data:
            return "bearer"
        return None
    if is_token_document(doc) or (isinstance(doc, dict) and SECRET_KEYS & set(doc)):
        return "token"
    if manifest_type(doc, msg.content_type):
        return "manifest"
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        return "errors"
    if msg.status in (401, 403):
        return "errors"
    if isinstance(doc, dict):
        if api.is_catalog(path) or (
            isinstance(doc.get("repositories"), list) and set(doc) <= {"repositories"}
        ):
            return "catalog"
        repo = api.parse_repository_path(path)
        if (repo is not None and repo.kind == "tags/list") or (
            "tags" in doc and isinstance(doc.get("name"), str) and set(doc) <= {"name", "tags"}
        ):
            return "tags"
    return None


def render(
    data: bytes, msg: Message, rules: Rules | None = None, now: float | None = None
) -> str | None:
    """The view's text for a message, or None when it is not a registry message."""
    now = time.time() if now is None else now
    kind = classify(data, msg, rules.token_path if rules else None)
    if kind is None:
        if msg.cache and not msg.is_request:  # a blob (or the 307 to it) the cache served
            return f"blob cache: {CACHE_STATES.get(msg.cache, msg.cache)}\n"
        return None
    doc = parse_json(data)
    client_name = client_namer(rules) if rules else None
    lines: list[str] = []
    if kind == "token":
        lines = describe_token_response(doc, now, client_name)
    elif kind == "token_request":
        lines = describe_token_request(data.decode("utf-8", "replace"))
    elif kind == "manifest":
        lines = describe_manifest(doc, manifest_type(doc, msg.content_type) or "", data)
    elif kind == "tags":
        repo = api.parse_repository_path(api.split_target(msg.path)[0])
        upstream = repo.name if repo else None
        name = doc.get("name")
        if rules and isinstance(name, str) and (upstream is None or upstream == name):
            upstream = rules.upstream_name(name) or upstream
        lines = describe_tags(doc, upstream)
    elif kind == "catalog":
        lines = describe_catalog(doc, upstream_namer(rules) if rules else None)
    elif kind == "errors":
        lines = describe_errors(doc, msg.status)
        lines += describe_challenges(msg.challenges)
    if kind in ("bearer", "manifest", "errors", "token_request"):
        credentials = _describe_credentials(msg, now, client_name)
        lines += [""] + credentials if lines and credentials else credentials
    if msg.cache and not msg.is_request:
        lines.insert(0, f"blob cache: {CACHE_STATES.get(msg.cache, msg.cache)}")
    return scrub("\n".join(lines)) + "\n"


def _bearer(msg: Message) -> Jwt | None:
    if msg.bearer and isinstance(msg.bearer.get("claims"), dict):
        return Jwt(msg.bearer.get("header") or {}, msg.bearer["claims"])
    info = bearer_info(msg.authorization)
    return Jwt(info["header"], info["claims"]) if info else None


def _describe_credentials(msg: Message, now: float, client_name: api.MapName | None) -> list[str]:
    jwt = _bearer(msg)
    if jwt is not None:
        head = "# Authorization: Bearer token presented (claims decoded, not verified; withheld)"
        return [head, "bearer token:", *describe_claims(jwt, now, client_name)]
    if msg.authorization:
        scheme = msg.authorization.strip().split(" ", 1)[0]
        return [f"# Authorization: {scheme} credentials presented {WITHHELD}"]
    return []


def scrub(text: str) -> str:
    """Last line of defence: nothing that looks like a JWT leaves the view."""
    return _JWT_TEXT.sub("<token withheld>", text)


class RegistryContentview:
    """The mitmproxy contentview (structurally a ``mitmproxy.contentviews.Contentview``).

    ``rules`` returns the rules in force (the addon's, which reload), used to show both
    names of a repository.
    """

    name = "Registry"
    syntax_highlight = "yaml"

    def __init__(
        self,
        rules: Callable[[], Rules | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = rules or (lambda: None)
        self._clock = clock

    def prettify(self, data: bytes, metadata: Any) -> str:
        msg = message_from_metadata(metadata)
        text = render(data, msg, self._rules(), self._clock()) if msg is not None else None
        if text is None:
            raise ValueError("not a registry token, manifest, listing or error")
        return text

    def render_priority(self, data: bytes, metadata: Any) -> float:
        msg = message_from_metadata(metadata)
        if msg is None:
            return -1
        rules = self._rules()
        kind = classify(data, msg, rules.token_path if rules else None)
        cached = msg.cache is not None and not msg.is_request
        return PRIORITY if kind is not None or cached else -1

    def __lt__(self, other: Any) -> bool:
        return self.name < other.name


# --- text helpers ---------------------------------------------------------------------


def _text(value: Any) -> str:
    """A claim or field as one line of text (control characters escaped)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.encode("unicode_escape").decode("ascii") if _needs_escape(text) else text


def _needs_escape(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return _text(value)
    return _text(json.dumps(_strip_secrets(value), ensure_ascii=False))


def _strip_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: WITHHELD if k in SECRET_KEYS else _strip_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_secrets(v) for v in value]
    return value
