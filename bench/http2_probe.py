"""mitmproxy script for bench/http2.py: what each side of the proxy negotiates and advertises.

Logs, per flow, the client's user agent, the HTTP version the client spoke to the proxy, the
one the upstream answered in, and the client's TLS version and ALPN offers
(`h2-probe |agent|client version|upstream version|TLS`), and,
when an HTTP/2 connection of the proxy closes, what was sent and received on it
(`h2-settings {json}`): the SETTINGS frames of both peers, the WINDOW_UPDATE frames on the
connection (stream 0) and on streams, and the DATA frames' count and largest size.

Observation only, for the benchmark's probe runs (never timed): it wraps two methods of h2's
H2Connection on mitmproxy's own subclass, which is no supported mitmproxy API.
"""

import json
import logging

import h2.settings
import hyperframe.frame as hf
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import _http2, _http_h2

_conns: dict[str, tuple[str, _http_h2.BufferedH2Connection]] = {}


def _setting_names(settings: dict[int, int]) -> dict[str, int]:
    names = {}
    for code, value in settings.items():
        try:
            names[h2.settings.SettingCodes(code).name] = value
        except ValueError:
            names[str(code)] = value
    return names


class _Stats:
    def __init__(self) -> None:
        self.settings: dict[str, list[dict[str, int]]] = {"sent": [], "received": []}
        self.window_updates: dict[str, dict[str, list[int]]] = {
            "sent": {"connection": [], "streams": []},
            "received": {"connection": [], "streams": []},
        }
        self.data = {d: {"frames": 0, "bytes": 0, "largest": 0} for d in ("sent", "received")}

    def frame(self, direction: str, frame: hf.Frame) -> None:
        if isinstance(frame, hf.DataFrame):
            d = self.data[direction]
            d["frames"] += 1
            d["bytes"] += len(frame.data)
            d["largest"] = max(d["largest"], len(frame.data))
        elif isinstance(frame, hf.WindowUpdateFrame):
            where = "connection" if frame.stream_id == 0 else "streams"
            self.window_updates[direction][where].append(frame.window_increment)
        elif isinstance(frame, hf.SettingsFrame) and "ACK" not in frame.flags:
            self.settings[direction].append(_setting_names(frame.settings))


def _stats(conn: object) -> _Stats | None:
    return getattr(conn, "_bench_h2_stats", None)


_orig_receive = _http_h2.BufferedH2Connection._receive_frame
_orig_prepare = _http_h2.BufferedH2Connection._prepare_for_sending
_orig_init = _http2.Http2Connection.__init__
_orig_initiate = _http_h2.BufferedH2Connection.initiate_connection


def _receive_frame(self, frame):
    if (st := _stats(self)) is not None:
        st.frame("received", frame)
    return _orig_receive(self, frame)


def _prepare_for_sending(self, frames):
    if (st := _stats(self)) is not None:
        for f in frames:
            st.frame("sent", f)
    return _orig_prepare(self, frames)


def _initiate_connection(self):
    # h2 writes its first SETTINGS frame straight into the send buffer, not through
    # _prepare_for_sending: it carries every local setting.
    if (st := _stats(self)) is not None:
        st.settings["sent"].append(_setting_names(dict(self.local_settings.items())))
    return _orig_initiate(self)


def _init(self, context, conn):
    _orig_init(self, context, conn)
    self.h2_conn._bench_h2_stats = _Stats()
    side = "client" if conn is context.client else "upstream"
    _conns[conn.id] = (side, self.h2_conn)


_http_h2.BufferedH2Connection._receive_frame = _receive_frame
_http_h2.BufferedH2Connection._prepare_for_sending = _prepare_for_sending
_http_h2.BufferedH2Connection.initiate_connection = _initiate_connection
_http2.Http2Connection.__init__ = _init


def _report(conn: connection.Connection) -> None:
    entry = _conns.pop(conn.id, None)
    if entry is None:
        return
    side, h2_conn = entry
    st = _stats(h2_conn)

    def window(direction: str, where: str) -> dict[str, int]:
        values = st.window_updates[direction][where]
        return {"count": len(values), "first": values[0] if values else 0, "sum": sum(values)}

    report = {
        "side": side,  # client: the proxy's connection with the client; upstream: with the registry
        "settings_sent": st.settings["sent"],
        "settings_received": st.settings["received"],
        "window_updates": {
            d: {w: window(d, w) for w in ("connection", "streams")} for d in ("sent", "received")
        },
        "data": st.data,
        "effective": {
            "local": {
                "max_frame_size": h2_conn.local_settings.max_frame_size,
                "initial_window_size": h2_conn.local_settings.initial_window_size,
            },
            "remote": {
                "max_frame_size": h2_conn.remote_settings.max_frame_size,
                "initial_window_size": h2_conn.remote_settings.initial_window_size,
            },
        },
    }
    logging.info("h2-settings " + json.dumps(report, sort_keys=True))


def client_disconnected(client: connection.Client) -> None:
    _report(client)


def server_disconnected(data: server_hooks.ServerConnectionHookData) -> None:
    _report(data.server)


def responseheaders(flow: http.HTTPFlow) -> None:
    agent = flow.request.headers.get("User-Agent", "")
    client = flow.client_conn
    offers = ",".join(a.decode() for a in client.alpn_offers) or "no ALPN"
    tls = f"{client.tls_version} offering {offers}" if client.tls_established else "no TLS"
    logging.info(
        f"h2-probe |{agent}|{flow.request.http_version}|{flow.response.http_version}|{tls}"
    )
