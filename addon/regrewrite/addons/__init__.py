"""Small mitmproxy addons composed around the core (registry_rewrite.RegistryRewrite) in
the ``addons`` list of addon/registry_rewrite.py, the way mitmproxy composes its own
defaults. They read what the core records in ``flow.metadata`` (registry_endpoint,
registry_decision, ...) and never re-derive the name mapping.

Unlike the modules one level up, these import mitmproxy.
"""

from __future__ import annotations

from mitmproxy import ctx

from regrewrite.api import Origin

CORE = "registryrewrite"  # the core addon's name in mitmproxy's addon manager


def core():
    """The core addon (RegistryRewrite), or None when it is not loaded."""
    master = getattr(ctx, "master", None)
    return master.addons.get(CORE) if master is not None else None


def client_origin(flow) -> Origin:
    """This proxy's address as the client reached it: reverse mode rewrote Host before
    any addon sees it, so it comes from the connection (socket address, TLS and SNI)."""
    conn = flow.client_conn
    host, port = conn.sockname[0], conn.sockname[1]
    if conn.tls_established:
        return Origin("https", conn.sni or host, port)
    return Origin("http", host, port)


# --- body sizes, for metrics and the access log -----------------------------------------

# The label values and log fields these addons use, bounded: anything else is "other".
ENDPOINTS = frozenset(
    ("ping", "manifests", "blobs", "uploads", "tags", "catalog", "referrers", "token", "other")
)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def count_body(flow, which: str) -> None:
    """Count the body bytes of a streamed request or response as they pass, into
    ``flow.metadata["registry_bytes_<which>"]``, without holding any of them.

    Call it from requestheaders/responseheaders after the core has decided on streaming.
    Idempotent, so that the metrics and the access log can both ask for it.
    """
    message = flow.request if which == "request" else flow.response
    key = f"registry_bytes_{which}"
    if message is None or not message.stream or key in flow.metadata:
        return
    flow.metadata[key] = 0
    inner = message.stream

    def counting(chunk: bytes):
        out = inner(chunk) if callable(inner) else chunk
        if isinstance(out, bytes):
            flow.metadata[key] += len(out)
            return out
        out = list(out)  # an inner stream may yield several chunks for one
        flow.metadata[key] += sum(len(c) for c in out)
        return out

    message.stream = counting


def body_bytes(flow, which: str) -> int:
    """How many body bytes of the request or response passed (streamed or buffered)."""
    key = f"registry_bytes_{which}"
    if key in flow.metadata:
        return flow.metadata[key]
    message = flow.request if which == "request" else flow.response
    if message is None or message.raw_content is None:
        return 0
    return len(message.raw_content)
