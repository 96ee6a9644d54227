"""Prometheus metrics on a separate address (``--set registry_metrics=HOST:PORT``).

Served by prometheus_client's own HTTP server thread from a private CollectorRegistry
(so nothing else in the process, nor a second instance in tests, adds to it). Every
label value comes from a small fixed set or the rules file's upstream keys: never a
repository name, tag, digest, user or secret, so cardinality stays bounded and nothing
leaks to whoever can scrape.

Placed after the core in the addons list: it reads the ``registry_*`` metadata the core
sets, and wraps body streams only once the core has decided on streaming.
"""

from __future__ import annotations

import logging
import threading

from mitmproxy import ctx, exceptions, http
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from regrewrite import api
from regrewrite.addons import ENDPOINTS, METHODS, body_bytes, core, count_body

logger = logging.getLogger(__name__)

# Seconds to response headers: from a few ms (cached manifest) to long blob uploads.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ERROR_CODES = frozenset(api.ERROR_MESSAGES) | {"UNAUTHORIZED", "TOOMANYREQUESTS"}


def parse_address(spec: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9090"``, ``"[::1]:9090"`` or ``":9090"`` (all addresses) -> (host, port)
    (port 0: any free one, see Metrics.port);
    ``""`` -> None (off). Raises ValueError quoting bad input."""
    spec = spec.strip()
    if not spec:
        return None
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{spec!r} is not HOST:PORT (e.g. 127.0.0.1:9090)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{spec!r}: put an IPv6 address in brackets, e.g. [::1]:9090")
    return host or "0.0.0.0", int(port)


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def code_label(flow: http.HTTPFlow) -> str:
    if flow.response is None:
        return "none"  # the client or the upstream went away before an answer
    status = flow.response.status_code
    return str(status) if 100 <= status <= 599 else "other"


def upstream_label(flow: http.HTTPFlow) -> str:
    # The rules' upstream keys: a handful, chosen by the operator.
    return str(flow.metadata.get("registry_upstream_key") or "none")


def endpoint_label(flow: http.HTTPFlow) -> str:
    endpoint = flow.metadata.get("registry_endpoint")
    return endpoint if endpoint in ENDPOINTS else "other"


class _RulesCollector:
    """The core's rule count and reload counters, read at scrape time."""

    def __init__(self, owner: Metrics) -> None:
        self.owner = owner

    def collect(self):
        addon = self.owner.core
        reloads = CounterMetricFamily(
            "registry_rewrite_rules_reloads",
            "Rules file reloads after a change, by result (ok, error: old rules kept).",
            labels=["result"],
        )
        rules = GaugeMetricFamily("registry_rewrite_rules", "Rules in force.")
        counts = dict(getattr(addon, "reloads", None) or {})
        for result in ("ok", "error"):
            reloads.add_metric([result], counts.get(result, 0))
        loaded = addon is not None and getattr(addon, "rules_file", None) is not None
        rules.add_metric([], len(addon.rules.names.rules) if loaded else 0)
        yield reloads
        yield rules


class Metrics:
    def __init__(self) -> None:
        self.core = None  # the core addon, found once running
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "registry_rewrite_requests",
            "Finished requests, by upstream key, endpoint, method and status code.",
            ["upstream", "endpoint", "method", "code"],
            registry=r,
        )
        self.denied = Counter(
            "registry_rewrite_denied",
            "Requests the proxy refused itself, by registry error code.",
            ["reason"],
            registry=r,
        )
        self.tokens = Counter(
            "registry_rewrite_token_requests",
            "Token requests, by upstream key and the status the client got.",
            ["upstream", "code"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "registry_rewrite_upstream_seconds",
            "Seconds from the request to the upstream's response headers.",
            ["upstream", "endpoint"],
            buckets=BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "registry_rewrite_bytes",
            "Body bytes through the proxy: direction=request (client to upstream) or "
            "response (to the client).",
            ["upstream", "direction"],
            registry=r,
        )
        r.register(_RulesCollector(self))
        # Label children by (metric, values): labels() takes a lock and validates each
        # time; the values are bounded, so this stays small.
        self.children: dict[tuple, object] = {}
        self.address: tuple[str, int] | None = None
        self.server = None
        self.thread: threading.Thread | None = None

    def load(self, loader):
        loader.add_option(
            "registry_metrics",
            str,
            "",
            "HOST:PORT to serve Prometheus metrics on (a separate listener, e.g. "
            "127.0.0.1:9090 or :9090 for all addresses). Default: off.",
        )

    def configure(self, updated):
        if "registry_metrics" in updated:
            try:
                address = parse_address(ctx.options.registry_metrics)
            except ValueError as e:
                raise exceptions.OptionsError(f"registry_metrics: {e}") from None
            if address != self.address:
                self.address = address
                if self.core is not None:  # running: move the listener now
                    self._stop()
                    self._start()

    def running(self):
        self.core = core()
        self._start()

    def done(self):
        self._stop()

    @property
    def port(self) -> int | None:
        """The port metrics are served on (useful with port 0)."""
        return self.server.server_address[1] if self.server is not None else None

    def _start(self) -> None:
        if self.address is None:
            return
        host, port = self.address
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            # mitmdump stops on an error logged during start-up, as for a busy proxy port.
            logger.error(f"registry_metrics: cannot listen on {host}:{port}: {e}")
            return
        logger.info(f"registry: Prometheus metrics at http://{host}:{self.port}/metrics")

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = self.thread = None

    def child(self, metric, *values: str):
        key = (metric, values)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*values)
        return found

    # --- hooks (cheap when off) -------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.server is not None and flow.live:
            count_body(flow, "request")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.server is None or not flow.live:
            return
        count_body(flow, "response")
        if flow.metadata.get("registry_decision") == "mapped" and flow.response is not None:
            seconds = flow.response.timestamp_start - flow.request.timestamp_start
            endpoint = endpoint_label(flow)
            self.child(self.upstream_seconds, upstream_label(flow), endpoint).observe(
                max(seconds, 0.0)
            )

    def response(self, flow: http.HTTPFlow) -> None:
        if self.server is not None and flow.live:
            self.finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.server is not None and flow.live:
            self.finished(flow)

    def finished(self, flow: http.HTTPFlow) -> None:
        upstream, endpoint, code = upstream_label(flow), endpoint_label(flow), code_label(flow)
        if flow.metadata.get("registry_metrics_done"):
            return  # a flow that errored after its response was counted
        flow.metadata["registry_metrics_done"] = True
        method = method_label(flow.request.method)
        self.child(self.requests, upstream, endpoint, method, code).inc()
        if flow.metadata.get("registry_decision") == "denied":
            reason = flow.metadata.get("registry_error_code")
            self.child(self.denied, reason if reason in ERROR_CODES else "other").inc()
        if endpoint == "token":
            self.child(self.tokens, upstream, code).inc()
        self.child(self.bytes, upstream, "request").inc(body_bytes(flow, "request"))
        self.child(self.bytes, upstream, "response").inc(body_bytes(flow, "response"))
