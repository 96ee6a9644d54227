"""``/livez`` and ``/readyz``, answered by the proxy itself on its listening port.

- ``/livez``: 200 as long as the event loop answers; contacts nothing.
- ``/readyz``: 200 when the rules are loaded and every upstream answered its last
  ``GET /v2/`` probe (any HTTP status: a 401 is an answer); else 503 with a
  registry-style JSON reason. Probe results are reused for at most ``PROBE_TTL``
  seconds; probes run in threads, and concurrent ``/readyz`` requests share one round.

These paths are outside ``/v2/`` and never forwarded, under ``unmatched: deny`` too: this
addon sits before the core in the addons list and answers first (the core skips flows
that already have a response).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.proxy import mode_specs

from regrewrite import api, decide, realm
from regrewrite.addons import core, patches

logger = logging.getLogger(__name__)

PATHS = frozenset(("/livez", "/readyz"))
PROBE_TTL = 10.0  # seconds a probe result is reused
PROBE_TIMEOUT = 5.0  # seconds an upstream has to answer a probe

_BODY_CAP_ERROR = api.registry_error(
    "SIZE_INVALID", {"limit": decide.REQUEST_BODY_CAP}, "health checks take no body"
).decode()
_HEADERS = {
    "Content-Type": "application/json",
    "Cache-Control": "no-store",
    "Docker-Distribution-API-Version": "registry/2.0",
}


@dataclass(frozen=True)
class Probe:
    at: float  # time.monotonic() of the probe
    answered: bool
    problem: str | None = None  # why not, without the upstream's address


def reverse_target(modes) -> str | None:
    """The reverse-mode upstream URL (the default upstream), from mitmproxy's ``mode``."""
    for spec in modes:
        try:
            mode = mode_specs.ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, mode_specs.ReverseMode) and mode.scheme in ("http", "https"):
            host, port = mode.address
            return str(api.Origin(mode.scheme, host, port))
    return None


class Health:
    def __init__(self) -> None:
        self.probes: dict[str, Probe] = {}  # by upstream url
        self.round: asyncio.Task | None = None

    def requestheaders(self, flow: http.HTTPFlow):
        # Not a coroutine function: mitmproxy awaits what a hook returns only when it is
        # awaitable, so every other request pays one cheap check, not a coroutine.
        if flow.response or flow.error or not flow.live:
            return None
        path = flow.request.path.partition("?")[0]
        if path not in PATHS:
            return None
        meta = flow.metadata
        meta["registry_answered"] = True
        meta["registry_endpoint"] = "other"
        meta["registry_decision"] = "answered"
        patches.hold_request_body(flow, _BODY_CAP_ERROR)
        if flow.request.method not in ("GET", "HEAD"):
            meta["registry_decision"] = "denied"  # a 4xx of the proxy's own
            meta["registry_error_code"] = "UNSUPPORTED"
            self._answer(flow, 405, api.registry_error("UNSUPPORTED", message="GET or HEAD"))
            flow.response.headers["Allow"] = "GET, HEAD"
            return None
        if path == "/livez":
            self._answer(flow, 200, b'{"status":"ok"}')
            return None
        return self._readyz(flow)

    async def _readyz(self, flow: http.HTTPFlow) -> None:
        try:
            problems = await self.readiness()
        except Exception:
            # Fail closed: answered here whatever happens, never left to the core, which
            # would forward it under `unmatched: pass`.
            logger.exception("registry: /readyz failed")
            problems = [{"problem": "internal error"}]
        if problems:
            body = api.registry_error("UNAVAILABLE", problems, "not ready")
            flow.metadata["registry_error_code"] = "UNAVAILABLE"
            self._answer(flow, 503, body)
        else:
            self._answer(flow, 200, b'{"status":"ready"}')

    def _answer(self, flow: http.HTTPFlow, status: int, body: bytes) -> None:
        head = flow.request.method == "HEAD"
        flow.response = http.Response.make(status, b"" if head else body, _HEADERS)
        if head:
            flow.response.headers["Content-Length"] = str(len(body))

    async def readiness(self) -> list[dict]:
        """What keeps the proxy from being ready (empty: ready)."""
        addon = core()
        if addon is None or getattr(addon, "rules_file", None) is None:
            return [{"rules": "not loaded"}]
        urls = {}
        default = reverse_target(ctx.options.mode)
        for upstream in addon.rules.upstreams:
            url = upstream.url or default
            if url is None:
                return [{"upstream": upstream.key, "problem": "no reverse-mode target"}]
            urls[upstream.key] = url
        now = time.monotonic()
        stale = [
            url
            for url in set(urls.values())
            if url not in self.probes or now - self.probes[url].at > PROBE_TTL
        ]
        if stale:
            if self.round is None or self.round.done():
                self.round = asyncio.ensure_future(self._probe_all(stale, addon.tls))
            # shield: a client hanging up must not cancel the round others wait for.
            await asyncio.shield(self.round)
        problems = []
        for key, url in urls.items():
            probe = self.probes.get(url)
            if probe is None or not probe.answered:
                problem = probe.problem if probe else "not probed"
                problems.append({"upstream": key, "problem": problem})
        return problems

    async def _probe_all(self, urls: list[str], tls) -> None:
        results = await asyncio.gather(*(asyncio.to_thread(_probe, url, tls) for url in urls))
        for url, probe in zip(urls, results, strict=True):
            previous = self.probes.get(url)
            if probe.answered != (previous.answered if previous else True):
                if probe.answered:
                    logger.info(f"registry: upstream {url} answers /v2/ again")
                else:
                    logger.warning(f"registry: upstream {url} {probe.problem}: not ready")
            self.probes[url] = probe

    def done(self) -> None:
        if self.round is not None:
            self.round.cancel()
            self.round = None


def _probe(url: str, tls) -> Probe:
    """One ``GET /v2/`` (blocking: run it in a thread)."""
    try:
        realm.fetch("GET", f"{url}/v2/", [], None, tls, PROBE_TIMEOUT)
    except realm.RealmUnreachable as e:
        return Probe(time.monotonic(), False, "timed out" if e.timeout else "unreachable")
    return Probe(time.monotonic(), True)
