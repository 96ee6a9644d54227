"""A mitmproxy script the e2e tests load beside the addon (`-s`): it logs, for every request,
whether the client reached mitmdump over TLS, so tests can tell how a real client came in
(docker, for one, picks https or http by itself). Read back with
`proxycheck.client_transports`.
"""

from __future__ import annotations

import logging

from mitmproxy import http

MARKER = "e2e-transport"


def requestheaders(flow: http.HTTPFlow) -> None:
    scheme = "https" if flow.client_conn.tls_established else "http"
    # The addon rewrites token requests in `request`, so /auth is still /auth here.
    path = flow.request.path.split("?", 1)[0]
    logging.info(f"{MARKER} {scheme} {flow.request.method} {path}")
