"""mitmweb with the addon, and a client for mitmweb's own HTTP and WebSocket API.

Used by test_mitmweb.py and by screenshot_mitmweb.py. Like everything in upstream.py,
it listens on 127.0.0.1 only (proxy and web UI), on free ports, with a private confdir.

mitmweb 12 guards its API: every request needs the web password (or the random token it
prints as ``?token=...``) as ``Authorization: Bearer`` or ``?token=``, and requests other
than GET need tornado's XSRF double submit (a ``_mitmproxy_xsrf`` cookie equal to an
``X-XSRFToken`` header). The launcher sets ``web_password`` to a random value, so the
client knows it without parsing the log.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.parse
import urllib.request
from pathlib import Path

from tests.e2e.upstream import (
    LOOPBACK,
    LaunchError,
    Mitmdump,
    free_port,
    wait_for_port,
)


class Mitmweb(Mitmdump):
    """`mitmweb` in reverse mode in front of `upstream_url`, loading the addon.

    Same arguments as `Mitmdump`; `web_url` is the UI (open it with `login_url`),
    `api` a `MitmwebAPI` for it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_path = self.dir / "mitmweb.log"
        self.web_port = 0
        self.password = secrets.token_hex(16)

    @property
    def web_url(self) -> str:
        return f"http://{LOOPBACK}:{self.web_port}"

    @property
    def login_url(self) -> str:
        """The UI with the password as ``?token=`` (mitmweb then sets its auth cookie)."""
        return f"{self.web_url}/?token={self.password}"

    @property
    def api(self) -> MitmwebAPI:
        return MitmwebAPI(self.web_url, self.password)

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[0] = str(Path(cmd[0]).with_name("mitmweb"))
        return cmd + [
            "--web-host",
            LOOPBACK,
            "--web-port",
            str(self.web_port),
            "--set",
            "web_open_browser=false",
            "--set",
            f"web_password={self.password}",
        ]

    def start(self, timeout: float = 30.0) -> Mitmweb:
        self.web_port = free_port()
        super().start(timeout)
        try:
            wait_for_port(self.web_port, timeout=timeout, proc=self.proc, describe=self.log_text)
        except LaunchError:
            self.stop()
            raise
        return self


class MitmwebAPI:
    """The JSON API the mitmweb UI itself uses."""

    def __init__(self, base_url: str, password: str, timeout: float = 30.0):
        self.base_url = base_url
        self.password = password
        self.timeout = timeout
        self._xsrf = secrets.token_hex(16)

    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        headers = {"Authorization": f"Bearer {self.password}"}
        data = None
        if method != "GET":
            headers["Cookie"] = f"_mitmproxy_xsrf={self._xsrf}"
            headers["X-XSRFToken"] = self._xsrf
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data, headers, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def get_json(self, path: str):
        return json.loads(self._request("GET", path))

    def flows(self) -> list[dict]:
        """`GET /flows`: every flow as mitmweb's UI gets it (headers, comment, marked...)."""
        return self.get_json("/flows")

    def content_view(self, flow_id: str, message: str = "response", view: str = "auto") -> dict:
        """`GET /flows/<id>/<message>/content/<view>.json`: text, view_name, description."""
        quoted = urllib.parse.quote(view, safe="")
        return self.get_json(f"/flows/{flow_id}/{message}/content/{quoted}.json")

    def content(self, flow_id: str, message: str = "response") -> bytes:
        """The raw body (what the UI offers as download)."""
        return self._request("GET", f"/flows/{flow_id}/{message}/content.data")

    def content_dump(self) -> bytes:
        """`GET /flows/dump`: every flow as a mitmproxy flow file (the UI's File > Save)."""
        return self._request("GET", "/flows/dump")

    def state(self) -> dict:
        return self.get_json("/state")

    def command(self, name: str, *arguments: str):
        """Run a mitmproxy command as the UI's command bar does; returns its value."""
        reply = json.loads(self._request("POST", f"/commands/{name}", {"arguments": arguments}))
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["value"]

    def matching(self, expr: str) -> set[str]:
        """Ids of the flows a filter expression (``~marked``, ``~comment x``) matches, as
        mitmweb's own filter box computes them (over its /updates WebSocket)."""
        return asyncio.run(self._matching(expr))

    async def _matching(self, expr: str) -> set[str]:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        ws_url = self.base_url.replace("http://", "ws://", 1) + "/updates"
        request = HTTPRequest(ws_url, headers={"Authorization": f"Bearer {self.password}"})
        conn = await websocket_connect(request)
        try:
            conn.write_message(
                json.dumps(
                    {"type": "flows/updateFilter", "payload": {"name": "test", "expr": expr}}
                )
            )
            while True:
                raw = await asyncio.wait_for(conn.read_message(), self.timeout)
                if raw is None:
                    raise ConnectionError("mitmweb closed the /updates WebSocket")
                message = json.loads(raw)
                if message.get("type") == "flows/filterUpdate":
                    return set(message["payload"]["matching_flow_ids"] or ())
        finally:
            conn.close()
