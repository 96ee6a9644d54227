"""realm.fetch keeps connections to a token service alive between token requests (a new
TLS handshake per token cost milliseconds, see bench/), and recovers when the service
has closed a kept connection.  A plain-HTTP server on 127.0.0.1 stands in for it."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from regrewrite import realm


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1
        self.connection.settimeout(self.server.idle_timeout)

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass

    def do_GET(self):
        self.server.requests += 1
        body = b'{"token":"t%d"}' % self.server.requests
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.server.close_after:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except TimeoutError:
            self.close_connection = True  # an idle keep-alive connection: drop it


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, idle_timeout: float = 5.0, close_after: bool = False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.idle_timeout = idle_timeout
        self.close_after = close_after


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs) -> tuple[_Server, str]:
        server = _Server(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/auth?scope=x"

    realm.close_idle()
    yield start
    realm.close_idle()
    for server in servers:
        server.shutdown()
        server.server_close()


def _get(url):
    return realm.fetch("GET", url, [], None, realm.tls_context(False, None, None), 5.0)


def test_token_requests_share_one_connection(serve):
    server, url = serve()
    bodies = [_get(url).body for _ in range(5)]
    assert bodies == [b'{"token":"t%d"}' % i for i in range(1, 6)]
    assert server.connections == 1


def test_a_connection_the_server_closed_is_replaced(serve):
    server, url = serve(idle_timeout=0.2)
    assert _get(url).status == 200
    time.sleep(0.6)  # the server drops the idle connection
    reply = _get(url)
    assert reply.status == 200 and reply.body == b'{"token":"t2"}'
    assert server.connections == 2


def test_connection_close_is_honoured(serve):
    server, url = serve(close_after=True)
    for _ in range(3):
        assert _get(url).status == 200
    assert server.connections == 3


def test_connections_are_kept_per_service(serve):
    a, url_a = serve()
    b, url_b = serve()
    for _ in range(3):
        _get(url_a)
        _get(url_b)
    assert (a.connections, b.connections) == (1, 1)


def test_an_unreachable_service_is_still_reported(serve):
    server, url = serve()
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(realm.RealmUnreachable):
        _get(f"http://127.0.0.1:{port}/auth")
