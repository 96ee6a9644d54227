"""One log line per flow the proxy decided itself, so mitmdump's output tells a denial
from an upstream answer.

mitmdump prints ``GET /v2/x/manifests/1 << 404`` alike for a name the rules refused and
for a 404 from the upstream; flow comments and marks, which tell them apart, show only in
mitmweb and the console. This addon writes, at the default verbosity::

    registry: denied GET /v2/x/manifests/1 -> 404 NAME_UNKNOWN: no rule for x

for every flow the proxy refused, answered or failed itself (but a successful answer with
nothing to say, such as a health probe's), and for every flow whose
authorisation failed (the upstream's 403, or its 401 to a request that carried
credentials; an anonymous client's first 401 is the normal start of the token dance and
is not logged). ``--set registry_log_comments=true`` logs every flow's comment: the
whole mapping trail.

It reads what the core decided from ``flow.metadata`` (``registry_decision``,
``registry_error_code``) and the comment; it never maps a name itself. The line holds
the method, the path without its query, the status, the error code and the comment:
no header, query or body, so never a credential or token.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http

logger = logging.getLogger(__name__)

# Decisions the proxy made without the upstream having the last word.
OWN_DECISIONS = frozenset(("denied", "answered", "error"))
# Bounds for one line: paths and comments are client-influenced and may be long.
PATH_LIMIT = 256
COMMENT_LIMIT = 1024


def auth_failed(status: int, had_credentials: bool, marked: str) -> bool:
    """Whether an answer means the client's authorisation failed (not the first 401 of
    an anonymous client, which only asks it to fetch a token)."""
    # The core marks 🔒 what the upstream refused to a client with credentials.
    return status == 403 or (status == 401 and (had_credentials or marked == ":lock:"))


def format_line(
    decision: str,
    method: str,
    path: str,
    status: int | str,
    code: str | None,
    comment: str,
) -> str:
    """``registry: denied GET /v2/x/manifests/1 -> 404 NAME_UNKNOWN: no rule for x``."""
    path = path.split("?", 1)[0]  # a query may carry account names or form values
    comment = comment.strip()
    # The comment of a refusal repeats the decision ("denied: no rule for x").
    for prefix in ("denied: ", "failed: "):
        if comment.startswith(prefix):
            comment = comment[len(prefix) :]
            break
    result = f"{status} {code}" if code else f"{status}"
    line = f"registry: {decision} {method} {_clip(_one_line(path), PATH_LIMIT)} -> {result}"
    if comment:
        line += f": {_clip(_one_line(comment), COMMENT_LIMIT)}"
    return line


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str) -> str:
    # Names in comments come from clients: no control character may start a forged line.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DecisionLog:
    def __init__(self) -> None:
        self.log_all = False

    def load(self, loader):
        loader.add_option(
            "registry_log_comments",
            bool,
            False,
            "Log every flow's comment (the whole mapping trail). By default only flows the "
            "proxy refused, answered or failed itself, and failed authorisations, are logged.",
        )

    def configure(self, updated):
        if "registry_log_comments" in updated:
            self.log_all = ctx.options.registry_log_comments

    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or not flow.live:
            return
        status = resp.status_code
        decision = flow.metadata.get("registry_decision")
        if decision is None:
            return  # not a flow the registry addon saw
        # Most flows are mapped 2xx/3xx: decided without touching headers or body.
        if not (
            (decision in OWN_DECISIONS and (status >= 400 or flow.comment))
            or self.log_all
            or (
                status in (401, 403)
                and auth_failed(status, "authorization" in flow.request.headers, flow.marked)
            )
        ):
            return
        code = flow.metadata.get("registry_error_code")
        line = format_line(
            decision, flow.request.method, flow.request.path, status, code, flow.comment
        )
        if decision == "error":
            logger.warning(line)
        else:
            logger.info(line)

    def error(self, flow: http.HTTPFlow) -> None:
        # The upstream failed (refused, reset, timed out; mitmproxy answers the client
        # itself) or the client went away: say which mapping it was for.
        if not flow.live or flow.error is None:
            return
        if "registry_decision" not in flow.metadata:
            return
        line = format_line(
            "error",
            flow.request.method,
            flow.request.path,
            "no response",
            None,
            f"{flow.error.msg} · {flow.comment}" if flow.comment else flow.error.msg,
        )
        logger.info(line)
