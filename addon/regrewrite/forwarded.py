"""Which public URL a request came in by, when a load balancer says so.

Behind a TLS-terminating load balancer or ingress the proxy sees plain HTTP from the
balancer's address; only the balancer knows the scheme, host and port the client used.
It says so in ``X-Forwarded-Proto``/``-Host``/``-Port`` or ``Forwarded`` (RFC 7239).
Those headers are believed only from peers in ``registry_trusted_proxies`` (uvicorn's
and gunicorn's ``forwarded_allow_ips``): anyone else could send the client to a host of
their choosing in the realm, ``Location`` and ``Link`` the proxy advertises.

No mitmproxy imports here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from .api import Origin

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A DNS name or IPv4 address, or a bracketed IPv6 address, with an optional port. Anything
# else in a forwarded host (spaces, '@', '/', quotes) is not a host and is ignored.
_HOST = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_trusted_proxies(spec: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 127.0.0.1"`` -> networks; a bare address is a /32 (or /128).

    Raises ValueError quoting the entry that is not an address or network.
    """
    networks = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def is_trusted(peer: str, networks: tuple[Network, ...]) -> bool:
    """Whether a TCP peer address (as in ``client_conn.peername[0]``) is a trusted proxy."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers this way
    return any(address in network for network in networks)


def forwarded_origin(headers: Iterable[tuple[str, str]], fallback: Origin) -> Origin | None:
    """The origin the client used, from the forwarding headers of a trusted proxy.

    ``headers`` are (name, value) pairs. Of several comma-separated values the last one
    counts, as it is the one the nearest (trusted) proxy added; what a client sent ahead
    of it is not believed. ``Forwarded`` and ``X-Forwarded-*`` are read apart, never
    mixed: a balancer sets one family and passes the other on from the client as it
    came, so when both are present and describe different origins neither is believed
    (None). A field that is missing or malformed is taken from ``fallback`` (the client
    connection), except the port, which follows a forwarded scheme's default. None when
    no header says anything.
    """
    forwarded = None
    x_proto = x_host = x_port = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == "forwarded":
            forwarded = value if forwarded is None else f"{forwarded},{value}"
        elif lowered == "x-forwarded-proto":
            x_proto = value
        elif lowered == "x-forwarded-host":
            x_host = value
        elif lowered == "x-forwarded-port":
            x_port = value
    from_forwarded = from_x = None
    if forwarded is not None:
        params = _forwarded_params(_last(forwarded))
        from_forwarded = _origin(params.get("proto"), params.get("host"), None, fallback)
    if x_proto is not None or x_host is not None or x_port is not None:
        from_x = _origin(
            x_proto and _last(x_proto), x_host and _last(x_host), x_port and _last(x_port), fallback
        )
    if from_forwarded is not None and from_x is not None and from_forwarded != from_x:
        return None  # one of them came from the client, and we cannot tell which
    return from_forwarded or from_x


def _origin(
    proto: str | None, host: str | None, port: str | None, fallback: Origin
) -> Origin | None:
    scheme = proto.lower() if proto and proto.lower() in _DEFAULT_PORTS else None
    new_host = new_port = None
    if host:
        m = _HOST.fullmatch(host)
        if m:
            new_host = m.group("host").strip("[]").lower()
            new_port = _port(m.group("port"))
    if port is not None:
        new_port = _port(port) or new_port
    if scheme is None and new_host is None and new_port is None:
        return None
    scheme = scheme or fallback.scheme
    if new_port is None:
        # A forwarded scheme or host without a port means that scheme's default port:
        # the balancer's, not the one this proxy listens on.
        new_port = _DEFAULT_PORTS[scheme]
    return Origin(scheme, new_host or fallback.host, new_port)


def describe(public_url: str | None, networks: tuple[Network, ...]) -> str:
    """One line for the start-up log: how the advertised public URL is derived."""
    if public_url:
        return f"public URL {public_url} (registry_public_url); forwarding headers ignored"
    if networks:
        ranges = ", ".join(str(n) for n in networks)
        return (
            f"public URL from X-Forwarded-Proto/-Host/-Port or Forwarded sent by {ranges} "
            "(registry_trusted_proxies), else from the client connection"
        )
    return "public URL from the client connection; forwarding headers ignored"


def _last(value: str) -> str:
    return value.rsplit(",", 1)[-1].strip()


def _port(text: str | None) -> int | None:
    # isascii: str.isdigit() accepts "²", which int() refuses (a ValueError in the hook).
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def _forwarded_params(element: str) -> dict[str, str]:
    """``for=1.2.3.4;proto=https;host="a:443"`` -> {"for": ..., "proto": ..., "host": ...}."""
    params: dict[str, str] = {}
    for pair in element.split(";"):
        key, sep, value = pair.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        params.setdefault(key.strip().lower(), value)
    return params
