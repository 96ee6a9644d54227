"""mitmproxy script for bench/http2.py: logs each request's user agent and HTTP version."""

import logging

from mitmproxy import http


def requestheaders(flow: http.HTTPFlow) -> None:
    agent = flow.request.headers.get("User-Agent", "")
    logging.info(f"h2-probe |{agent}|{flow.request.http_version}")
