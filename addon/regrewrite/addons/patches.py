"""Two changes to mitmproxy's HTTP layer that no option or hook offers, applied while
the addon is loaded (``enable``) and undone when it is unloaded (``disable``).

1. Registry-style errors: mitmproxy's own answers (upstream refused, reset or timed
   out; a body over a cap) are HTML pages, which registry clients cannot show. Its page
   builders are swapped for ones that answer a registry JSON error; the details stay in
   mitmproxy's log, not in the answer (they name the upstream's address). Over HTTP/2
   the headers it sends with them say text/html: they are relabelled JSON.
2. Body caps per flow: mitmproxy reads the whole request body of a flow that already has
   a response before it answers, and buffers every response body it does not stream,
   without limit (``body_size_limit`` is global and would also stop blob uploads, which
   are streamed). A flow whose metadata holds ``REQUEST_CAP`` or ``RESPONSE_CAP`` is
   failed as soon as its buffered body would pass that many bytes, the way mitmproxy
   fails a body over ``body_size_limit``: the client gets 413 (request) or 502
   (response) with the registry error in ``CAP_ERROR``, and the connection is closed
   (HTTP/1) or the stream ended (HTTP/2). At most the cap is ever held.
"""

from __future__ import annotations

import contextlib
import weakref

from mitmproxy import flow as mflow
from mitmproxy import http, version
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy.layers import http as layers_http
from mitmproxy.proxy.layers.http import _http1, _http2, _http3
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

from regrewrite import api, decide

REQUEST_CAP = "registry_request_cap"
RESPONSE_CAP = "registry_response_cap"
CAP_ERROR = "registry_cap_error"  # the registry JSON error to answer past a cap (str)

_ORIGINALS: dict = {}


def hold_request_body(flow: http.HTTPFlow, cap_error: str | None = None) -> None:
    """Prepare a request the proxy answers itself (any addon, in ``requestheaders``).

    mitmproxy reads a body sent along before it answers: never stream it (streaming
    with a response set is an error in mitmproxy) and read at most REQUEST_BODY_CAP of
    it, then 413 with ``cap_error``. No "100 Continue" either: mitmproxy would send one
    after the hook, the client its body, and past the cap no answer could reach it
    (mitmproxy only closes the connection once it has sent an interim answer)."""
    flow.request.stream = False
    flow.request.headers.pop("Expect", None)
    flow.metadata.setdefault(REQUEST_CAP, decide.REQUEST_BODY_CAP)
    if cap_error is not None:
        flow.metadata[CAP_ERROR] = cap_error


def _error_body(status_code: int, message: str) -> bytes:
    if message.startswith('{"errors"'):
        return message.encode()  # a registry error the addon made (a body cap's)
    if status_code in (502, 503, 504):
        return api.registry_error("UNAVAILABLE")
    return api.registry_error("UNKNOWN", message=message or None)


# The headers mitmproxy's HTTP/2 layer sends with an error of its own (after :status).
_H2_ERROR_HEADERS = [(b"server", version.MITMPROXY.encode()), (b"content-type", b"text/html")]


def _json_h2_errors(original):
    def send_headers(self, stream_id, headers, *args, **kwargs):
        if isinstance(headers, list) and headers[1:] == _H2_ERROR_HEADERS:
            headers = [*headers[:2], (b"content-type", api.JSON_HEADERS["Content-Type"].encode())]
        return original(self, stream_id, headers, *args, **kwargs)

    send_headers.__wrapped__ = original
    return send_headers


def _make_error_response(status_code: int, message: str = "") -> bytes:
    resp = http.Response.make(
        status_code, _error_body(status_code, message), {**api.JSON_HEADERS, "Connection": "close"}
    )
    return assemble_response(resp)


# All capped bodies being buffered at once, across flows: the per-flow caps alone let
# many concurrent flows add up (16 concurrent 4 MiB _catalog answers peaked at 191 MB).
# Past this, a flow that would buffer more is failed with a 502 asking to retry.
BUFFER_BUDGET = 32 << 20
_buffering: weakref.WeakSet = weakref.WeakSet()  # the HttpStreams buffering a capped body
_held = 0  # bytes of bodies read and waiting for (or in) their rewrite: see holding()


def buffered() -> int:
    """Bytes of capped bodies held right now: arriving, or read and being rewritten."""
    arriving = sum(len(s.request_body_buf) + len(s.response_body_buf) for s in list(_buffering))
    return _held + arriving


@contextlib.contextmanager
def holding(nbytes: int):
    """Count a body that has been read, while its rewrite waits and runs, against the
    budget: bodies arriving meanwhile are failed (502, retry) rather than piling up
    behind the rewrites (16 concurrent 3.5 MiB _catalog answers peaked at 193 MB when
    only arriving bodies counted). Used on the event loop only."""
    global _held
    _held += nbytes
    try:
        yield
    finally:
        _held -= nbytes


def _capped(original, request: bool):
    data_event = layers_http.RequestData if request else layers_http.ResponseData
    key = REQUEST_CAP if request else RESPONSE_CAP

    def state(self, event):
        cap = self.flow.metadata.get(key) if self.flow is not None else None
        if cap is not None and isinstance(event, data_event):
            buf = self.request_body_buf if request else self.response_body_buf
            if len(buf) + len(event.data) > cap:
                buf.clear()
                yield from _fail_over_cap(self, request, cap)
                return
            _buffering.add(self)
            if buffered() + len(event.data) > BUFFER_BUDGET:
                buf.clear()
                yield from _fail_over_cap(self, request, cap, budget=True)
                return
            # Buffered here, not by the original: it would also apply stream_large_bodies
            # and start streaming a flow that must be answered or rewritten (a token form
            # to the upstream's /auth, a _catalog to the client unfiltered).
            buf += event.data
            return
        yield from original(self, event)

    state.__wrapped__ = original
    return state


def _fail_over_cap(stream, request: bool, cap: int, budget: bool = False):
    """What mitmproxy does for a body over ``body_size_limit``, with our error: the flow's
    own cap (413 for a request, 502 for a response), or the budget of all flows (502)."""
    flow = stream.flow
    what = "request" if request else "response"
    if budget:
        message = api.registry_error(
            "UNAVAILABLE",
            {"limit": BUFFER_BUDGET},
            f"the proxy is buffering {BUFFER_BUDGET} bytes of other flows' bodies; retry",
        ).decode()
        flow.error = mflow.Error(f"{what} body over the proxy's {BUFFER_BUDGET}-byte budget")
        code = layers_http.ErrorCode.GENERIC_SERVER_ERROR
    else:
        message = (
            flow.metadata.get(CAP_ERROR)
            or api.registry_error(
                "SIZE_INVALID", {"limit": cap}, f"{what} body larger than {cap} bytes"
            ).decode()
        )
        flow.error = mflow.Error(f"{what} body larger than the proxy's {cap}-byte cap")
        code = (
            layers_http.ErrorCode.REQUEST_TOO_LARGE
            if request
            else layers_http.ErrorCode.RESPONSE_TOO_LARGE
        )
    yield layers_http.HttpErrorHook(flow)
    yield layers_http.SendHttp(
        layers_http.ResponseProtocolError(stream.stream_id, message, code),
        stream.context.client,
    )
    stream.client_state = stream.state_errored
    if not request:
        yield layers_http.SendHttp(
            layers_http.RequestProtocolError(stream.stream_id, message, code),
            stream.context.server,
        )
        stream.server_state = stream.state_errored
    flow.live = False


def enable() -> None:
    if _ORIGINALS:
        return
    stream_cls = layers_http.HttpStream
    for owner, name, replacement in (
        (_http1, "make_error_response", _make_error_response),
        (_http2, "format_error", _error_body),
        (_http3, "format_error", _error_body),
        (
            BufferedH2Connection,
            "send_headers",
            _json_h2_errors(BufferedH2Connection.send_headers),
        ),
        (
            stream_cls,
            "state_consume_request_body",
            _capped(stream_cls.state_consume_request_body, True),
        ),
        (
            stream_cls,
            "state_consume_response_body",
            _capped(stream_cls.state_consume_response_body, False),
        ),
    ):
        if hasattr(owner, name):
            _ORIGINALS[(owner, name)] = getattr(owner, name)
            setattr(owner, name, replacement)


def disable() -> None:
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()
