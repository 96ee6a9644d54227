"""``registry_trusted_proxies``: believe a load balancer about the public URL.

Runs before the core. For a request whose TCP peer is in the trusted ranges, the origin
its ``X-Forwarded-*``/``Forwarded`` headers describe goes into
``flow.metadata["registry_public"]``, which the core advertises (realm, Location, Link)
unless ``registry_public_url`` is set. The core drops these headers from every request
before it goes upstream, trusted or not.
"""

from __future__ import annotations

import functools
import logging

from mitmproxy import ctx, exceptions, http

from regrewrite import forwarded
from regrewrite.addons import client_origin
from regrewrite.api import Origin

logger = logging.getLogger(__name__)


class TrustedProxies:
    def __init__(self) -> None:
        self.networks: tuple[forwarded.Network, ...] = ()
        self.announced: str | None = None

    def load(self, loader):
        loader.add_option(
            "registry_trusted_proxies",
            str,
            "",
            "CIDR[,CIDR...] of load balancers whose X-Forwarded-Proto/-Host/-Port and "
            "Forwarded headers say which public URL clients used (for the token realm, "
            "Location and Link). From other peers these headers are ignored. Default: none.",
        )

    def configure(self, updated):
        if "registry_trusted_proxies" in updated:
            try:
                self.networks = forwarded.parse_trusted_proxies(
                    ctx.options.registry_trusted_proxies
                )
            except ValueError as e:
                raise exceptions.OptionsError(f"registry_trusted_proxies: {e}") from None
            self.__dict__.pop("trusted", None)  # the ranges changed: forget the verdicts
        if self.announced is not None and updated & {
            "registry_trusted_proxies",
            "registry_public_url",
        }:
            self.announce()

    def running(self):
        self.announce()

    def announce(self) -> None:
        """Log how the public URL is derived, once (and again only when that changes)."""
        public_url = getattr(ctx.options, "registry_public_url", None)
        line = forwarded.describe(public_url, self.networks)
        if line != self.announced:
            self.announced = line
            logger.info(f"registry: {line}")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.networks or flow.response or flow.error or not flow.live:
            return
        # One pass over the raw fields; most requests carry none of these.
        found = tuple(
            (k.lower(), v) for k, v in flow.request.headers.fields if k.lower() in _FORWARDING
        )
        if not found:
            return
        peer = flow.client_conn.peername
        if not peer or not self.trusted(peer[0]):
            return
        origin = self.origin(found, client_origin(flow))
        if origin is not None:
            flow.metadata["registry_public"] = origin

    @functools.cached_property
    def trusted(self):
        """``is_trusted`` for the current ranges, remembered per peer address (a balancer
        has a few; parsing an address and testing the ranges costs several us)."""
        return functools.lru_cache(maxsize=1024)(
            functools.partial(forwarded.is_trusted, networks=self.networks)
        )

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def origin(found: tuple[tuple[bytes, bytes], ...], fallback: Origin) -> Origin | None:
        # A balancer sends the same few values again and again.
        pairs = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in found)
        return forwarded.forwarded_origin(pairs, fallback)


_FORWARDING = frozenset(
    (b"forwarded", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port")
)
