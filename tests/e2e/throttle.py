"""A WAN-like TCP link on loopback: a relay with a shared bandwidth cap and a fixed
delay per new connection, counting the bytes that cross it (downstream and up).

Used by tests/e2e/test_cache.py (bytes over the link tell single flight from N
downloads) and bench/cache.py (a 25 MB/s, 20 ms link in front of the test registry).
TLS passes through untouched: the relay only moves bytes.
"""

from __future__ import annotations

import socket
import threading
import time

from tests.e2e.upstream import LOOPBACK

_CHUNK = 64 << 10


class _Bucket:
    """A token bucket shared by every connection: the link's total bandwidth."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(self.next_free, now)
            self.next_free = start + nbytes / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class ThrottleRelay:
    """`ThrottleRelay(target_port, rate=25e6, delay=0.02).start()`; `port`, `bytes_down`
    (target -> client), `bytes_up`, `connections`; `stop()` closes everything.

    At most `max_connections` at once (a load loop stays bounded); beyond that new
    connections are refused by closing them."""

    def __init__(
        self,
        target_port: int,
        *,
        rate: float | None = 25e6,
        delay: float = 0.02,
        max_connections: int = 128,
    ) -> None:
        self.target_port = target_port
        self.delay = delay
        self.bucket = _Bucket(rate)
        self.max_connections = max_connections
        self.lock = threading.Lock()
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def start(self) -> ThrottleRelay:
        self._thread.start()
        return self

    def reset_counts(self) -> None:
        with self.lock:
            self.bytes_down = self.bytes_up = self.connections = 0

    def stop(self) -> None:
        self._stopped.set()
        self.sock.close()
        with self.lock:
            conns = list(self._open)
        for s in conns:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if len(self._open) >= 2 * self.max_connections:
                    conn.close()
                    continue
                self.connections += 1
                self._open.add(conn)
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self.delay)  # the link's extra latency, once per connection
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=10)
        except OSError:
            self._forget(client)
            return
        upstream.settimeout(None)
        with self.lock:
            self._open.add(upstream)
        up = threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True)
        up.start()
        self._pump(upstream, client, True)
        up.join(timeout=60)
        self._forget(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                self.bucket.take(len(data))
                dst.sendall(data)
                with self.lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _forget(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
            with self.lock:
                self._open.discard(s)
