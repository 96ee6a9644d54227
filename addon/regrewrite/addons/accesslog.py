"""A JSON access log (``--set registry_access_log=PATH``, ``-`` for standard output).

One object per finished flow (response and error hooks):

    {"ts": "2026-12-01T14:00:00.123Z", "client": "10.0.0.7", "user": "alice",
     "method": "GET", "endpoint": "manifests", "client_name": "team/app",
     "upstream_name": "acme_team/app", "upstream": "default", "status": 200,
     "bytes": 1234, "duration_ms": 12.5, "decision": "mapped"}

The hooks only put a small dict on a bounded queue; a background thread serializes and
writes, so a slow disk never stalls the proxy. When the queue is full (the disk cannot
keep up with QUEUE_SIZE records), records are dropped and counted: the first drop is
logged as a warning, the total when the log closes.

Nothing secret is written: no header, no query string, no body; ``user`` is what the
core records (a token's subject or a Basic username), never a credential.
Placed after the core in the addons list.
"""

from __future__ import annotations

import datetime
import json
import logging
import queue
import sys
import threading
import time
from typing import IO

from mitmproxy import ctx, exceptions, http

from regrewrite.addons import ENDPOINTS, body_bytes, count_body

logger = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # records waiting for the writer thread
# Characters kept of a name or user: a refused name is the client's, of any length, and
# the queue's memory is bounded only if each record is.
FIELD_LIMIT = 512
FLUSH_INTERVAL = 0.05  # seconds the writer waits between batches
_STOP = object()


def fields(flow: http.HTTPFlow) -> tuple:
    """What the log needs of a finished flow, read cheaply on the event loop; ``entry``
    makes the record of it in the writer thread."""
    md = flow.metadata
    req, resp = flow.request, flow.response
    end = resp.timestamp_end if resp is not None and resp.timestamp_end else None
    if end is None:
        end = flow.error.timestamp if flow.error is not None else time.time()
    peer = flow.client_conn.peername
    return (
        req.timestamp_start,
        peer[0] if peer else None,
        _clip(md.get("registry_user")),
        _clip(req.method),
        md.get("registry_endpoint"),
        _clip(md.get("registry_client_name")),
        _clip(md.get("registry_upstream_name")),
        md.get("registry_upstream_key"),
        resp.status_code if resp is not None else None,
        body_bytes(flow, "response"),
        end,
        md.get("registry_decision"),
    )


def _clip(value):
    if isinstance(value, str) and len(value) > FIELD_LIMIT:
        return value[: FIELD_LIMIT - 1] + "…"
    return value


def entry(values: tuple) -> dict:
    """The access log record (plain values only)."""
    start, client, user, method, endpoint, client_name, upstream_name = values[:7]
    upstream, status, size, end, decision = values[7:]
    return {
        "ts": _iso(start),
        "client": client,
        "user": user,
        "method": method,
        "endpoint": endpoint if endpoint in ENDPOINTS else "other",
        "client_name": client_name,
        "upstream_name": upstream_name,
        "upstream": upstream,
        "status": status,
        "bytes": size,
        "duration_ms": round(max(end - start, 0.0) * 1000, 3),
        "decision": decision,
    }


def record(flow: http.HTTPFlow) -> dict:
    return entry(fields(flow))


def _iso(ts: float) -> str:
    t = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class _Writer(threading.Thread):
    def __init__(self, out: IO[str], close: bool) -> None:
        super().__init__(name="registry-access-log", daemon=True)
        self.out = out
        self.close = close
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self.unwritable = 0

    def offer(self, values: tuple) -> None:
        try:
            self.queue.put_nowait(values)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    f"registry_access_log: {QUEUE_SIZE} records waiting to be written; "
                    "dropping records until the writer catches up"
                )

    def run(self) -> None:
        try:
            stop = False
            while not stop:
                batch = [self.queue.get()]
                # Take what has piled up, write it in one go, flush once.
                while True:
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                stop = batch[-1] is _STOP
                lines = [
                    line
                    for values in batch
                    if values is not _STOP and (line := self.line(values)) is not None
                ]
                if lines:
                    try:
                        self.out.write("\n".join(lines) + "\n")
                        self.out.flush()
                    except (OSError, ValueError) as e:
                        logger.error(f"registry_access_log: cannot write: {e}")
                if not stop:
                    # Let records gather: fewer wake-ups of this thread, each taking the
                    # GIL from the event loop, at the price of lines FLUSH_INTERVAL late.
                    time.sleep(FLUSH_INTERVAL)
        finally:
            if self.close:
                self.out.close()

    def line(self, values: tuple) -> str | None:
        """One record as JSON; None for one that cannot be (counted, logged once): it
        must not end this thread, and with it the log."""
        try:
            return json.dumps(entry(values), separators=(",", ":"))
        except Exception as e:  # noqa: BLE001
            self.unwritable += 1
            if self.unwritable == 1:
                logger.error(f"registry_access_log: a record could not be written: {e!r}")
            return None

    def finish(self, timeout: float = 5.0) -> None:
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self.join(timeout)
        if self.dropped:
            logger.warning(f"registry_access_log: {self.dropped} records were dropped")
        if self.unwritable:
            logger.warning(f"registry_access_log: {self.unwritable} records could not be written")


class AccessLog:
    def __init__(self) -> None:
        self.writer: _Writer | None = None

    def load(self, loader):
        loader.add_option(
            "registry_access_log",
            str,
            "",
            "Write one JSON object per finished request to this file ('-': standard "
            "output); appends. Default: off.",
        )

    def configure(self, updated):
        if "registry_access_log" not in updated:
            return
        path = ctx.options.registry_access_log
        self._stop()
        if not path:
            return
        if path == "-":
            out, close = sys.stdout, False
        else:
            try:
                # Opened here so that a bad path is an option error; written elsewhere.
                out, close = open(path, "a", encoding="utf-8"), True  # noqa: SIM115
            except OSError as e:
                raise exceptions.OptionsError(f"registry_access_log: {e}") from None
        self.writer = _Writer(out, close)
        self.writer.start()

    def done(self):
        self._stop()

    def _stop(self) -> None:
        if self.writer is not None:
            self.writer.finish()
            self.writer = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.writer is not None and flow.live:
            count_body(flow, "response")

    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def _log(self, flow: http.HTTPFlow) -> None:
        if self.writer is None or not flow.live or flow.metadata.get("registry_logged"):
            return
        flow.metadata["registry_logged"] = True  # a response hook, then an error: once
        self.writer.offer(fields(flow))
