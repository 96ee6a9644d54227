"""Real HAProxy (Debian's) running deploy/haproxy.cfg, with the addresses filled in
through the environment variables the file documents (RR_BIND, RR_CERT, RR_REPLICA1-3,
RR_BLOBS1-3, RR_STATS). Used by tests/e2e/test_haproxy.py and bench/cache.py."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.upstream import (
    LOOPBACK,
    REPO_ROOT,
    LaunchError,
    TestCA,
    _Service,
    free_port,
    wait_for_port,
)

HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy.cfg"
_SYNC = "e2e-log-sync"
# deploy/haproxy.cfg's log line: `option httplog`'s with the path for the request target
# (log-format %ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc
# %ac/%fc/%bc/%sc/%rc %sq/%bq %hr %hs "%HM %HP %HV").
_LOG_LINE = re.compile(
    r"^\S+ \[[^\]]+\] \S+ (?P<backend>[^/\s]+)/(?P<server>\S+) \S+ (?P<status>-?\d+) "
    r"\S+ \S+ \S+ \S+ \S+/\S+/\S+/\S+/\+?(?P<retries>\d+) .*\"(?P<method>\S+) "
    r"(?P<uri>\S+) HTTP/[\d.]+\"$"
)


@dataclass(frozen=True)
class LogEntry:
    server: str
    status: int
    retries: int
    method: str
    uri: str

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


class HAProxy(_Service):
    """`haproxy -f deploy/haproxy.cfg` with its RR_* variables pointing at loopback."""

    def __init__(
        self,
        ca: TestCA,
        replicas: list[str],
        blobs: list[str] = (),
        *,
        health: tuple[str, str] | None = None,
    ):
        """`health`: another server behind the same configuration (bench/cache.py puts
        distribution there): its health check's path and `http-check expect` argument
        instead of the proxy's /readyz and 200."""
        self.ca = ca
        self.replicas = replicas
        self.blobs = list(blobs)  # the replicas' blob servers (RR_BLOBS1-3), if any
        self.dir = Path(tempfile.mkdtemp(prefix="e2e-haproxy-"))
        self.config = HAPROXY_CFG
        if health is not None:
            text = HAPROXY_CFG.read_text()
            for line, replacement in (
                ("uri /readyz\n", f"uri {health[0]}\n"),
                ("http-check expect status 200\n", f"http-check expect {health[1]}\n"),
            ):
                assert text.count(line) == 1, f"deploy/haproxy.cfg: no single {line!r}"
                text = text.replace(line, replacement)
            self.config = self.dir / "haproxy.cfg"
            self.config.write_text(text)
        self.log_path = self.dir / "haproxy.log"
        self.port = 0
        self.stats_port = 0
        self.proc: subprocess.Popen | None = None
        self._mark = 0

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RR_BIND=f"{LOOPBACK}:{self.port}",
            RR_CERT=str(self.ca.combined_pem),  # HAProxy takes key and chain in one PEM
            RR_STATS=f"{LOOPBACK}:{self.stats_port}",
        )
        for i, address in enumerate(self.replicas, 1):
            env[f"RR_REPLICA{i}"] = address
        for i, address in enumerate(self.blobs, 1):
            env[f"RR_BLOBS{i}"] = address
        return env

    def start(self, timeout: float = 20.0) -> HAProxy:
        self.port, self.stats_port = free_port(), free_port()
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(self.config)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self._launch(["haproxy", "-f", str(self.config)], self.env(), timeout)
        try:
            wait_for_port(self.stats_port, timeout=timeout, proc=self.proc, describe=self.log_text)
        except LaunchError:
            self.stop()
            raise
        return self

    def stats(self, backend: str = "replicas") -> dict[str, dict[str, str]]:
        """The stats CSV rows of `backend`, by server name (and BACKEND)."""
        url = f"http://{LOOPBACK}:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode().lstrip("# ")
        return {
            row["svname"]: row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == backend
        }

    def wait_states(
        self, want: dict[str, str], timeout: float = 30.0, backend: str = "replicas"
    ) -> dict:
        """Wait until each named server's status starts with the wanted one (UP, DOWN)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats(backend)
            states = {name: stats[name]["status"] for name in want}
            if all(states[n].startswith(s) for n, s in want.items()):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"servers {states}, wanted {want}\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def _sync_log(self, timeout: float = 10.0) -> None:
        """Make sure every request HAProxy finished so far is in its log.

        HAProxy logs a request when it ends, possibly just after the client has read the
        answer: a marker request sent after those, once logged, shows they are too.
        """
        marker = uuid.uuid4().hex
        url = f"{self.url}/livez/{_SYNC}-{marker}"  # (the log shows paths, no query)
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=self.ca.client_context()):
                pass
        except urllib.error.HTTPError:
            pass  # any answer will do: it is logged all the same
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            if time.monotonic() > deadline:
                raise TimeoutError("HAProxy's log did not show the sync request")
            time.sleep(0.05)

    def entries(self, *, since_mark: bool = False, backend: str = "replicas") -> list[LogEntry]:
        """Requests HAProxy sent to `backend`, in the order they ended."""
        self._sync_log()
        text = self.log_text()
        if since_mark:
            text = text[self._mark :]
        found = []
        for line in text.splitlines():
            m = _LOG_LINE.match(line)
            if m and m.group("backend") == backend and _SYNC not in m.group("uri"):
                found.append(
                    LogEntry(
                        m.group("server"),
                        int(m.group("status")),
                        int(m.group("retries")),
                        m.group("method"),
                        m.group("uri"),
                    )
                )
        return found

    def mark(self) -> None:
        """Remember the end of the log, for `entries(since_mark=True)`."""
        self._sync_log()
        self._mark = len(self.log_text())
