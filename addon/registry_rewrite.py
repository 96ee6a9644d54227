"""Serve a Docker/OCI registry under different repository names.

    mitmdump --mode reverse:https://UPSTREAM -s addon/registry_rewrite.py \\
        --set registry_rules=rules.yaml

The registry protocol itself (names, scopes, challenges, Location, Link, bodies)
lives in the ``registry`` package beside this file; this class only wires it to
mitmproxy's hooks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import traceback
import weakref
from collections import OrderedDict
from urllib.parse import urlsplit

from mitmproxy import command, contentviews, ctx, exceptions, http

from regrewrite import api, auth, decide, realm
from regrewrite.addons import client_origin, patches
from regrewrite.addons.accesslog import AccessLog
from regrewrite.addons.cache import BlobCache
from regrewrite.addons.decisionlog import DecisionLog
from regrewrite.addons.health import Health, reverse_target
from regrewrite.addons.idle import UnloadIdle
from regrewrite.addons.metrics import Metrics
from regrewrite.addons.trusted import TrustedProxies
from regrewrite.api import Origin
from regrewrite.contentview import (
    RegistryContentview,
    auth_note,
    bearer_info,
    describe_rules,
    token_shortfall,
)
from regrewrite.explain import explain
from regrewrite.rules import Rules, RulesError

logger = logging.getLogger(__name__)

RELOAD_INTERVAL = 1.0  # seconds between looks at the rules file
RULES_FILE_MAX = 4 << 20  # a rules file larger than this is refused, not read
CATALOG_CURSORS = 1024  # opaque _catalog cursors remembered (see _catalog_cursor)
ISSUED_TOKENS = 4096  # which upstream issued a token, for the newest ones handed out
USER_LIMIT = 256  # characters of registry_user (a client-chosen token subject) kept
TOKEN_WORKERS = 8  # concurrent token fetches; more wait (up to registry_token_timeout)
# Bodies up to this size are rewritten on the event loop; larger ones (up to the 4 MiB
# cap) in a worker thread, so no JSON work blocks other flows for long.
INLINE_REWRITE = 64 << 10
# Response headers responseheaders rewrites (raw, lower case).
_NAMING_HEADERS = frozenset((b"www-authenticate", b"location", b"link"))


class RegistryRewrite:
    def __init__(self) -> None:
        self.rules = Rules()
        self.rules_file: str | None = None
        self.rules_digest: bytes | None = None  # sha256 of the file the rules came from
        self.reloads = {"ok": 0, "error": 0}
        self.public: Origin | None = None
        self.tls = realm.tls_context(False, None, None)
        # Each upstream's token endpoint and service, learned from its challenges,
        # by upstream key ("default" is the reverse-mode target).
        self.learned: dict[str, tuple[str, str | None]] = {}
        self.warned_realm: dict[str, str] = {}
        self.cursors: OrderedDict[str, str] = OrderedDict()
        self.watcher: asyncio.Task | None = None
        self.started = False
        # Buffer manifests (not blobs) so they can be shown: only when someone looks.
        self.show_manifests = False
        # The rules each live flow was mapped with: its response maps back with the same
        # ones, whatever a reload did meanwhile. Only for live flows (weak keys).
        self.flow_rules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Token fetches block a thread each for up to registry_token_timeout: their own
        # pool, so they never starve asyncio's default executor (which resolves the
        # upstreams' host names). Rules loading and big JSON rewrites get another.
        self.token_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.work_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.failures_logged: set[tuple[str, str]] = set()
        # Which upstream issued each token this proxy handed out, by sha256 (no token is
        # kept): a token never goes to another upstream's registry.
        self.issued: OrderedDict[bytes, str] = OrderedDict()
        # Credentials of the flows in memory, for replays in this process (weak keys:
        # they go when mitmweb or the console drops the flow).
        self.replay_secrets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Where live flows go (scheme, host, port): a replay edited to go elsewhere gets
        # no kept credential and teaches no realm.
        self.live_target: tuple | None = None
        # mitmweb, mitmproxy and mitmdump show registry messages through this view.
        self.contentview = RegistryContentview(lambda: self.rules)

    def load(self, loader):
        # The body caps must hold from the first connection: mitmproxy may accept
        # connections before this addon's running() (a startup race the e2e test hit).
        patches.enable()
        loader.add_option(
            "registry_rules",
            str,
            "rules.yaml",
            "Rules file mapping client repository names to upstream names (YAML). "
            "Edits take effect without a restart.",
        )
        loader.add_option(
            "registry_public_url",
            str | None,
            None,
            "scheme://host[:port] clients use to reach this proxy, advertised as the token "
            "realm and in Location headers. Default: derived from each client connection.",
        )
        loader.add_option(
            "registry_token_timeout",
            int,  # not float: mitmproxy cannot parse float options given with --set
            30,
            "Seconds to wait for the upstream token service before answering 504.",
        )
        contentviews.add(self.contentview)

    def configure(self, updated):
        # mitmweb and the console show bodies; mitmdump prints them from flow_detail 3.
        self.show_manifests = (
            "web_port" in ctx.options
            or "console_layout" in ctx.options
            or ("flow_detail" in ctx.options and ctx.options.flow_detail >= 3)
        )
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Token requests and refusals are answered without the upstream, so connect
            # only when a request must go there (and keep working while it is down).
            ctx.options.connection_strategy = "lazy"
        if "registry_rules" in updated:
            path = ctx.options.registry_rules
            try:
                data = _read_rules_file(path)
                self.rules = _parse_rules_file(path, data)
            except RulesError as e:
                if not self.started:
                    # mitmdump stops when an error is logged during start-up; raising
                    # here would bury the message under a traceback.
                    logger.error(f"registry: {e}")
                    return
                raise exceptions.OptionsError(str(e)) from None
            self.rules_file = path
            self.rules_digest = hashlib.sha256(data).digest()
            logger.info(
                f"registry: {len(self.rules.names.rules)} rules from {path}, "
                f"unmatched names: {self.rules.unmatched}"
            )
            _log_aliases(self.rules)
        if "registry_public_url" in updated:
            self.public = parse_public_url(ctx.options.registry_public_url)
        if "registry_token_timeout" in updated and ctx.options.registry_token_timeout <= 0:
            raise exceptions.OptionsError("registry_token_timeout must be a positive number")
        if updated & {
            "ssl_insecure",
            "ssl_verify_upstream_trusted_ca",
            "ssl_verify_upstream_trusted_confdir",
        }:
            self.tls = realm.tls_context(
                ctx.options.ssl_insecure,
                ctx.options.ssl_verify_upstream_trusted_ca,
                ctx.options.ssl_verify_upstream_trusted_confdir,
            )

    def running(self):
        self.started = True
        patches.enable()
        if self.token_pool is None:
            self.token_pool = concurrent.futures.ThreadPoolExecutor(
                TOKEN_WORKERS, thread_name_prefix="registry-token"
            )
            self.work_pool = concurrent.futures.ThreadPoolExecutor(
                2, thread_name_prefix="registry-work"
            )
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch_rules())

    def done(self):
        patches.disable()
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        for pool in (self.token_pool, self.work_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.token_pool = self.work_pool = None
        realm.close_idle()
        # mitmproxy 12 has no public way to unregister a contentview.
        views = contentviews.registry
        if views.get(self.contentview.name) is self.contentview:
            del views._by_name[self.contentview.name.lower()]
            views.on_change.send(self.contentview)

    @command.command("registry.rules")
    def rules_command(self) -> str:
        """The rules in force, their file, unmatched, token_path and the upstream's token
        realm and service (as configured or learned)."""
        text = describe_rules(
            self.rules,
            self.rules_file,
            self.realm,
            self.service,
            str(self.public) if self.public else None,
            self.learned,
        )
        logger.info(f"registry.rules:\n{text}")
        return text

    @command.command("registry.explain")
    def explain_command(self, text: str) -> str:
        """Where a client name goes (rule, upstream name, upstream, realm, service) or why
        it is refused; which client name an upstream name is shown as; or the scope a
        token request sends upstream for a scope such as repository:team/app:pull,push."""
        answer = explain(self.rules, text, self.learned)
        logger.info(f"registry.explain {text}:\n{answer}")
        return answer

    @property
    def realm(self) -> str | None:
        """The default upstream's token realm, as learned."""
        return self.learned.get("default", (None, None))[0]

    @property
    def service(self) -> str | None:
        return self.learned.get("default", (None, None))[1]

    # --- rules reload -------------------------------------------------------------

    async def _watch_rules(self) -> None:
        """Take a changed rules file into use once it has stopped changing (so a
        half-saved file that happens to parse never takes effect). Changes are found by
        content, so a copy that keeps size and mtime (cp -p, rsync -a) counts too.
        Reading and checking the file happen in a worker thread; nothing here ends the
        watcher: any failure is logged and the rules in force stay."""
        seen: bytes | None = self.rules_digest
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                seen = await self._poll_rules(seen)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must outlive any failure
                logger.error(
                    "registry: reloading the rules failed (the previous rules stay in "
                    f"force):\n{traceback.format_exc()}"
                )
                self.reloads["error"] += 1

    async def _poll_rules(self, seen: bytes | None) -> bytes | None:
        """One look at the rules file; returns its digest, to compare with next time."""
        if self.rules_file is None:
            return seen
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                self.work_pool, _read_rules_file, self.rules_file
            )
        except RulesError:
            return None  # gone or unreadable for now (e.g. mid-rename): look again
        digest = hashlib.sha256(data).digest()
        if digest != self.rules_digest and digest == seen:
            await self.reload_rules(data)
        return digest  # changed since the last look: wait a round for it to settle

    async def reload_rules(self, data: bytes | None = None) -> None:
        """Take the rules file (``data``, its bytes, when already read) into use; an
        invalid one leaves the rules in force. Reading and checking run off the loop."""
        path = self.rules_file
        if path is None:
            return
        loop = asyncio.get_running_loop()
        try:
            if data is None:
                data = await loop.run_in_executor(self.work_pool, _read_rules_file, path)
            self.rules_digest = hashlib.sha256(data).digest()
            rules = await loop.run_in_executor(self.work_pool, _parse_rules_file, path, data)
        except RulesError as e:
            logger.error(f"registry: {e} (the previous rules stay in force)")
            self.reloads["error"] += 1
            return
        self.rules = rules
        self.cursors.clear()
        self.reloads["ok"] += 1
        logger.info(f"registry: reloaded {len(rules.names.rules)} rules from {path}")
        _log_aliases(rules)

    # --- requests -----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            self._requestheaders(flow)
        except Exception as e:  # noqa: BLE001 - fail closed, whatever went wrong
            self._fail(flow, "requestheaders", e)

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        rules = self.rules
        req = flow.request
        # Raw field lookups: mitmproxy's Headers.get costs several µs each on this path.
        authorization = _raw_header(req.headers, b"authorization")
        if flow.is_replay == "request":
            self._prepare_replay(flow)
            authorization = _raw_header(req.headers, b"authorization")
        else:
            self._keep_for_replay(flow, "authorization", authorization)
            self.live_target = (req.scheme, req.host, req.port)  # the reverse-mode target
        _drop_client_authority(req)
        if req.path.startswith("/blobs/"):
            # A blob cache hit's signed URL (registry_cache_serve=public) that the balancer
            # sent here, not to the blob servers: the cache relays it, never upstream.
            cache = ctx.master.addons.get("blobcache")
            if cache is not None and cache.relay_signed(flow):
                return
        # In reverse mode the request already targets the default upstream.
        default = Origin(req.scheme, req.host, req.port)
        endpoint, decision = decide.decide_request(
            rules,
            req.method,
            req.path,
            self.cursors,
            self.show_manifests,
            _raw_header(req.headers, b"content-length"),
        )
        meta = flow.metadata
        meta["registry_endpoint"] = endpoint
        meta["registry_upstream"] = meta["registry_default"] = default
        meta["registry_user"] = _user(authorization)
        if isinstance(decision, decide.Refusal):
            _refuse(flow, decision)
        elif isinstance(decision, decide.Ping):
            self._answer_ping(flow)
        elif isinstance(decision, decide.TokenEndpoint):
            # The form is read (up to the cap) to map its scopes: no streaming. (Under
            # stream_large_bodies mitmproxy set stream before this hook; left set, the
            # request went to the upstream's /auth with the client's credentials.)
            req.stream = False
            meta["registry_token"] = True
            meta[patches.REQUEST_CAP] = decide.REQUEST_BODY_CAP
            meta[patches.CAP_ERROR] = api.registry_error(
                "SIZE_INVALID",
                {"limit": decide.REQUEST_BODY_CAP},
                f"token request body larger than {decide.REQUEST_BODY_CAP} bytes",
            ).decode()
        else:
            self._forward(flow, rules, decision, default)

    def _forward(
        self, flow: http.HTTPFlow, rules: Rules, d: decide.Forward, default: Origin
    ) -> None:
        """Apply a Forward decision: every value is computed before the first change."""
        upstream = rules.upstreams[d.registry]
        origin = Origin.parse(upstream.url) if upstream.url else default
        basic = d.drop_basic and any(
            k.lower() == b"authorization" and v[:6].lower() == b"basic "
            for k, v in flow.request.headers.fields
        )
        foreign = len(rules.upstreams) > 1 and self._foreign_bearer(flow, rules, upstream)
        meta = flow.metadata
        # From here on nothing can fail: plain assignments of checked values.
        req = flow.request
        # The client's own request line, to show it again once the flow has gone
        # upstream (so a person reads, edits and replays it in client names).
        meta["registry_client_target"] = req.path
        meta["registry_upstream_target"] = d.target
        if basic or foreign:
            del req.headers["Authorization"]
        if origin != default:
            req.scheme, req.host, req.port = origin.scheme, origin.host, origin.port
        req.path = d.target
        req.stream = d.stream
        self.flow_rules[flow] = rules
        meta["registry_upstream"] = origin
        meta["registry_route"] = d.registry
        meta["registry_upstream_key"] = upstream.key
        meta["registry_decision"] = "mapped"
        if d.client_name is not None:
            meta["registry_client_name"] = d.client_name
            meta["registry_upstream_name"] = d.upstream_name
        if d.mirror is not None:
            meta["registry_mirror"] = d.mirror
        if d.comment:
            withheld = (
                " · client's Basic credentials withheld"
                if basic
                else f" · token of upstream {foreign} withheld"
                if foreign
                else ""
            )
            flow.comment = d.comment + withheld

    def _foreign_bearer(self, flow: http.HTTPFlow, rules: Rules, upstream) -> str | None:
        """The key of the upstream whose token service issued this request's Bearer token,
        when that is another upstream than the one the request goes to: a token goes
        only to the registry it is for. Known for the tokens this proxy handed out; else
        from a JWT's audience, when it names another upstream's service."""
        authorization = flow.request.headers.get("Authorization", "")
        if authorization[:7].lower() != "bearer ":
            return None
        token = authorization[7:].strip()
        issuer = self.issued.get(hashlib.sha256(token.encode("latin-1", "replace")).digest())
        if issuer is None:
            claims = (_bearer_info(authorization) or {}).get("claims") or {}
            audience = claims.get("aud")
            audiences = {audience} if isinstance(audience, str) else set(audience or ())
            services = {u.key: self._realm_of(u)[1] for u in rules.upstreams}
            if services.get(upstream.key) in audiences or not audiences:
                return None
            issuer = next((k for k, s in services.items() if s and s in audiences), None)
        return issuer if issuer is not None and issuer != upstream.key else None

    def _record_issued(self, body: bytes, key: str) -> None:
        """Remember which upstream issued the tokens of a token response (by hash)."""
        if len(body) > 64 << 10:
            return
        try:
            doc = json.loads(body)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        for field in ("token", "access_token"):
            token = doc.get(field)
            if isinstance(token, str):
                self.issued[hashlib.sha256(token.encode("latin-1", "replace")).digest()] = key
        while len(self.issued) > ISSUED_TOKENS:
            self.issued.popitem(last=False)

    def _keep_for_replay(self, flow: http.HTTPFlow, what: str, secret: str | None) -> None:
        """Keep a credential in memory, for a replay of this flow in this process; never
        in the flow (which mitmweb shows and flow files save). Gone with the flow."""
        if secret:
            self.replay_secrets.setdefault(flow, {})[what] = secret

    def _prepare_replay(self, flow: http.HTTPFlow) -> None:
        """A replayed flow is mapped anew, with the rules in force now: it shows (and was
        edited in) client names since it went upstream the first time."""
        meta = flow.metadata
        # The kept credentials go only where they came from: not to a host, port or
        # scheme edited in (a way to read them, or to send them in clear text).
        req = flow.request
        same = self._replay_target(flow) == (req.scheme, req.host, req.port)
        # (registry_public is this pass's: TrustedProxies ran before the core. Or the
        # first pass's, kept; but a flow file stores it as a list: not an origin.)
        for key in [k for k in meta if k.startswith("registry_")]:
            if key != "registry_public" or not isinstance(meta[key], Origin):
                del meta[key]
        flow.comment, flow.marked = "", ""
        kept = self.replay_secrets.get(flow, {}) if same else {}
        # Only the value the addon redacted is replaced: one a person typed in is theirs.
        values = [v for k, v in req.headers.fields if k.lower() == b"authorization"]
        note = "replay"
        if any(v.endswith(b" <redacted>") for v in values):
            req.headers.pop("Authorization", None)
            if "authorization" in kept:
                req.headers["Authorization"] = kept["authorization"]
            elif not same and self.replay_secrets.get(flow):
                note = "replay without credentials (sent elsewhere than the original)"
            else:
                note = "replay without credentials (flows keep none once saved)"
        elif values:
            # Typed into the edited flow: sent as it is, and kept for the next replay.
            self._keep_for_replay(flow, "authorization", req.headers["Authorization"])
        if "form" in kept and req.method == "POST":
            # The form as edited, with the secrets redacted in it put back.
            edited = (req.raw_content or b"").decode("latin-1")
            req.content = _restore_form(edited, kept["form"]).encode("latin-1")
        meta["registry_replay"] = note
        if not same:
            # Sent elsewhere (or where it should go is not known): what that host
            # advertises is never learned as the upstream's realm, where every client's
            # token request goes with its credentials.
            meta["registry_elsewhere"] = True

    def _replay_target(self, flow: http.HTTPFlow) -> tuple | None:
        """Where a replay of ``flow`` is meant to go: the reverse-mode target, else where
        live flows went, else (a replay-only process: no client to mislead) where the
        flow itself went, as recorded."""
        url = reverse_target(ctx.options.mode) if "mode" in ctx.options else None
        if url is not None:
            return tuple(Origin.parse(url))
        if self.live_target is not None:
            return self.live_target
        recorded = flow.metadata.get("registry_default")
        return tuple(recorded) if isinstance(recorded, (list, tuple)) else None

    def _answer_ping(self, flow: http.HTTPFlow) -> None:
        """``/v2/`` with several upstreams: a client authenticated for any of them may
        go on; others are told to fetch a token from this proxy."""
        if flow.request.headers.get("Authorization", "").lower().startswith("bearer "):
            _answer(flow, http.Response.make(200, b"{}", api.JSON_HEADERS), "ping: 200")
            return
        service = self.rules.service or self.service
        params = (("realm", f"{self.public_origin(flow)}{self.rules.token_path}"),)
        if service:
            params += (("service", service),)
        body = api.registry_error("UNAUTHORIZED", message="authentication required")
        headers = {**api.JSON_HEADERS, "WWW-Authenticate": str(auth.Challenge("Bearer", params))}
        _answer(flow, http.Response.make(401, body, headers), "auth: 401 challenge")

    def public_origin(self, flow: http.HTTPFlow) -> Origin:
        """Where this flow's client reaches the proxy: the advertised origin, else the
        client connection."""
        return self.advertised_origin(flow) or client_origin(flow)

    def advertised_origin(self, flow: http.HTTPFlow) -> Origin | None:
        """registry_public_url, else what a trusted balancer said (TrustedProxies); None
        when the client connected to this proxy directly, as far as it can tell."""
        return self.public or flow.metadata.get("registry_public")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not flow.metadata.get("registry_token"):
            return
        try:
            await self._token(flow)
        except Exception as e:  # noqa: BLE001 - fail closed, whatever went wrong
            self._fail(flow, "token", e)

    async def _token(self, flow: http.HTTPFlow) -> None:
        """Answer a token request by asking the upstream's realm, scopes mapped."""
        rules = self.rules
        req = flow.request
        _, query = api.split_target(req.path)
        form = ""
        if req.method == "POST":
            raw = req.raw_content or b""
            # Redacted before anything can refuse it: the flow is shown and saved.
            _redact_form(req, raw.decode("latin-1"))
            if not raw.isascii():
                _refuse(flow, decide.Refusal(400, "UNSUPPORTED", "token form is not ASCII"))
                return
            form = raw.decode("ascii")
            self._keep_for_replay(flow, "form", form)
        registry, map_name = decide.token_upstream(rules, query, form)
        upstream = rules.upstreams[registry]
        flow.metadata["registry_upstream_key"] = upstream.key
        # With several upstreams each token service wants its own service name (the
        # client only knows the one of the proxy's own challenge).
        several = len(rules.upstreams) > 1
        upstream_realm, service = self._realm_of(upstream)
        if (upstream_realm is None or (several and service is None)) and (
            "registry_elsewhere" not in flow.metadata
        ):
            # e.g. the proxy restarted and the client kept its realm: ask the upstream.
            origin = flow.metadata["registry_default"] if registry == 0 else None
            await self._discover_realm(upstream.key, origin or Origin.parse(upstream.url))
            upstream_realm, service = self._realm_of(upstream)
        if upstream_realm is None:
            _refuse(
                flow,
                decide.Refusal(
                    502, "UNAVAILABLE", f"upstream {upstream.key} advertises no token realm"
                ),
            )
            return
        account = None
        if decide.credentials_mode(rules, registry) == "account":
            try:
                account = await asyncio.get_running_loop().run_in_executor(
                    self.work_pool, _account_header, upstream
                )
            except Exception as e:  # noqa: BLE001 - a secret that cannot be read
                _refuse(
                    flow,
                    decide.Refusal(
                        502,
                        "UNAVAILABLE",
                        f"credentials of upstream {upstream.key} cannot be read: {_secret_free(e)}",
                        {"upstream": upstream.key},  # which one to fix (never why: a path)
                    ),
                )
                return
        plan = decide.plan_token(
            rules,
            req.method,
            query,
            form,
            list(req.headers.items()),
            upstream_realm,
            service,
            registry,
            map_name,
            account,
        )
        # The flow keeps the client's request (secrets redacted), so a replay asks anew.
        _redact_credentials(flow)
        flow.comment = plan.comment
        try:
            reply = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(
                    self.token_pool,
                    realm.fetch,
                    plan.method,
                    plan.url,
                    list(plan.headers),
                    plan.body,
                    self.tls,
                    ctx.options.registry_token_timeout,
                ),
                # The fetch times out on its own; this bounds the wait for a free worker.
                ctx.options.registry_token_timeout + 1,
            )
        except (realm.RealmUnreachable, TimeoutError) as e:
            timeout = isinstance(e, TimeoutError) or e.timeout
            where = urlsplit(plan.url).netloc
            logger.warning(f"registry: token service {where} unreachable: {e or 'timed out'}")
            status = 504 if timeout else 502
            reason = f"token service {where} ({upstream.key}): {e or 'timed out'}"
            if upstream.realm and self.learned.get(upstream.key, (None,))[0] not in (
                None,
                upstream.realm,
            ):
                reason += (
                    f"; the rules pin realm {upstream.realm} but the upstream advertises "
                    f"{self.learned[upstream.key][0]}: remove 'realm' from the rules to use it"
                )
            _refuse(flow, decide.Refusal(status, "UNAVAILABLE", reason))
            return
        keep = {"content-type", "cache-control", "pragma", "www-authenticate"}
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in reply.headers
            if k.lower() in keep
        ]
        comment = plan.comment
        marked = ""
        if reply.status != 200:
            marked = ":warning:"
            comment += f" · token service answered {reply.status}"
        else:
            self._record_issued(reply.body, upstream.key)
            shortfall = token_shortfall(reply.body, plan.mapped)
            if shortfall:
                comment += f" · not granted: {' '.join(shortfall)}"
        _answer(flow, http.Response.make(reply.status, reply.body, headers), comment)
        if marked:
            flow.marked = marked

    def _realm_of(self, upstream) -> tuple[str | None, str | None]:
        learned_realm, learned_service = self.learned.get(upstream.key, (None, None))
        return upstream.realm or learned_realm, upstream.service or learned_service

    async def _discover_realm(self, key: str, upstream: Origin) -> None:
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                self.token_pool, realm.fetch, "GET", f"{upstream}/v2/", [], None, self.tls, 10.0
            )
        except realm.RealmUnreachable as e:
            logger.warning(f"registry: cannot ask {upstream} for its token realm: {e}")
            return
        for k, v in reply.headers:
            if k.lower() == "www-authenticate":
                self._learn_challenge(key, v)

    def _learn_challenge(self, key: str, header: str) -> None:
        try:
            challenges = auth.parse_challenges(header)
        except ValueError:
            return
        for c in challenges:
            if c.scheme.lower() == "bearer" and c.get("realm"):
                self._learn_realm(key, c.get("realm"), c.get("service"))

    def _learn_realm(self, key: str, upstream_realm: str, service: str | None) -> None:
        configured = next((u.realm for u in self.rules.upstreams if u.key == key), None)
        if (
            configured
            and upstream_realm != configured
            and self.warned_realm.get(key) != upstream_realm
        ):
            self.warned_realm[key] = upstream_realm
            logger.warning(
                f"registry: upstream {key} advertises token realm {upstream_realm} but the "
                f"rules configure {configured}; using the configured one"
            )
        learned_realm, learned_service = self.learned.get(key, (None, None))
        if learned_realm != upstream_realm and not configured:
            logger.info(f"registry: upstream {key} token realm is {upstream_realm}")
        self.learned[key] = (upstream_realm, service or learned_service)

    # --- responses ----------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            _redact_credentials(flow)
            if flow.metadata.get("registry_answered") or flow.response is None:
                return
            if flow.metadata.get("registry_decision") != "mapped" or not flow.live:
                return  # (a flow loaded from a file was rewritten when it was live)
            self._responseheaders(flow)
        except Exception as e:  # noqa: BLE001 - fail closed, whatever went wrong
            self._fail(flow, "responseheaders", e)

    def _responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        rules = self.flow_rules.get(flow, self.rules)
        names = {k.lower() for k, _ in resp.headers.fields}
        request_path = api.split_target(flow.request.path)[0]
        length = _raw_header(resp.headers, b"content-length") or ""
        keep_manifest = (
            self.show_manifests
            and length.isdigit()
            and int(length) <= decide.RESPONSE_BODY_CAP
            and _is_manifest(flow)
        )
        if resp.status_code not in (401, 403) and not (names & _NAMING_HEADERS):
            # Nothing here names a repository or points back at us (most blob and
            # manifest responses): only the body may need work.
            content_type = _raw_header(resp.headers, b"content-type") or ""
            kind = decide.body_rewrite(
                flow.request.method, resp.status_code, request_path, content_type
            )
            self._body_plan(flow, kind, keep_manifest and kind is None)
            return
        upstream: Origin = flow.metadata["registry_upstream"]
        key = flow.metadata.get("registry_upstream_key", "default")
        registry = next(i for i, u in enumerate(rules.upstreams) if u.key == key)
        public = self.public_origin(flow)
        token_url = f"{public}{rules.token_path}"
        if "registry_mirror" in flow.metadata:
            token_url += f"?ns={flow.metadata['registry_mirror']}"
        mirror = registry if "registry_mirror" in flow.metadata else None
        plan = decide.plan_response(
            method=flow.request.method,
            path=request_path,
            status=resp.status_code,
            content_type=resp.headers.get("Content-Type", ""),
            challenges=resp.headers.get_all("WWW-Authenticate"),
            location=resp.headers.get("Location"),
            link=resp.headers.get("Link"),
            upstream=upstream,
            public=public,
            token_url=token_url,
            service=rules.service if key == "default" else None,
            client_name=_client_names(rules, flow),
            catalog_cursor=self._catalog_cursor,
            keep_manifest=keep_manifest,
            allow=decide.allowed_actions(rules, mirror),
        )
        note = None
        if resp.status_code in (401, 403):
            challenges = dict(plan.headers).get("WWW-Authenticate", ())
            note = auth_note(
                resp.status_code, list(challenges), flow.request.headers.get("Authorization")
            )
        # Decided: apply.
        for name, values in plan.headers:
            resp.headers.set_all(name, list(values))
        if "registry_elsewhere" not in flow.metadata:
            for learned_realm, service in plan.learned:
                self._learn_realm(key, learned_realm, service)
        if note is not None:
            flow.comment = f"{flow.comment} · {note.comment}" if flow.comment else note.comment
            if note.failed:
                flow.marked = ":lock:"
        self._body_plan(flow, plan.rewrite, plan.keep)

    def _body_plan(self, flow: http.HTTPFlow, kind: str | None, keep: bool) -> None:
        resp = flow.response
        if kind is None and not keep:
            resp.stream = True
            return
        if kind == "redirect":
            # Emptied as it arrives: buffered, the courtesy link counted against the
            # budget of capped bodies (a storage redirect got a 502 while rewrites held it).
            resp.headers.pop("Content-Encoding", None)
            if "transfer-encoding" not in resp.headers:
                resp.headers["Content-Length"] = "0"
            resp.stream = _dropped
            return
        # Buffered to be rewritten (or shown): never more than the cap.
        resp.stream = False
        flow.metadata["registry_rewrite"] = kind
        flow.metadata[patches.RESPONSE_CAP] = decide.RESPONSE_BODY_CAP
        flow.metadata[patches.CAP_ERROR] = api.registry_error(
            "UNAVAILABLE",
            {"limit": decide.RESPONSE_BODY_CAP},
            f"the upstream's {kind or 'manifest'} body is larger than the "
            f"{decide.RESPONSE_BODY_CAP}-byte cap this proxy rewrites",
        ).decode()
        if keep:
            flow.metadata["registry_kept_manifest"] = True

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("registry_decision") == "mapped":
            # mitmproxy answers the client itself (upstream unreachable, reset, a cap).
            flow.metadata["registry_decision"] = "error"
        _redact_credentials(flow)
        _show_client_request(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._response(flow)
        finally:
            if flow.live:
                _show_client_request(flow)
                if "registry_replay" in flow.metadata:
                    flow.comment = f"{flow.metadata['registry_replay']} · {flow.comment}"

    async def _response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or not flow.live:
            return
        if "registry_failed" in flow.metadata:
            # responseheaders failed on a response without a body: it never goes out.
            _fail_response(flow, flow.metadata["registry_failed"])
            return
        if flow.metadata.get("registry_answered"):
            return
        kind = flow.metadata.get("registry_rewrite")
        if resp.stream or kind is None:
            return
        try:
            rules = self.flow_rules.get(flow, self.rules)
            path = api.split_target(flow.request.path)[0]
            raw = resp.raw_content or b""
            if kind == "error-page":
                content = raw  # replaced unread: any Content-Encoding will do
            else:
                try:
                    content = decide.decode_body(raw, resp.headers.get("Content-Encoding", ""))
                except ValueError:
                    if kind != "errors":
                        raise
                    # An error we cannot read (br from a CDN) is replaced unread.
                    kind, content = "error-page", raw
            args = (kind, content, path, _client_names(rules, flow), resp.status_code)
            if len(content) > INLINE_REWRITE and self.work_pool is not None:
                loop = asyncio.get_running_loop()
                held = len(raw) + (len(content) if content is not raw else 0)
                with patches.holding(held):
                    new = await loop.run_in_executor(self.work_pool, decide.rewrite_body, *args)
            else:
                new = decide.rewrite_body(*args)
        except Exception as e:  # noqa: BLE001 - never pass on what we could not rewrite
            self._fail(flow, "response", e)
            return
        resp.headers.pop("Content-Encoding", None)
        if kind in ("error-page", "errors") and new:
            resp.headers["Content-Type"] = api.JSON_HEADERS["Content-Type"]
        resp.content = new

    def _catalog_cursor(self, upstream_last: str) -> str:
        """The client-side ``last=`` for an upstream one: its client name, or an opaque
        cursor when the upstream name has none (so hidden names stay hidden)."""
        client = self.rules.client_name(upstream_last)
        if client is not None:
            return client
        cursor = "~" + os.urandom(9).hex()
        self.cursors[cursor] = upstream_last
        while len(self.cursors) > CATALOG_CURSORS:
            self.cursors.popitem(last=False)
        return cursor

    # --- failing closed -------------------------------------------------------------

    def _fail(self, flow: http.HTTPFlow, hook: str, e: Exception) -> None:
        """The addon could not finish its work on a flow: the client gets a JSON error
        (500 for a request, 502 for a response) and nothing half-done goes anywhere."""
        where = f"{type(e).__name__} in {hook}"
        key = (hook, "".join(traceback.format_exception(e)[-2:]))
        path = flow.request.path.partition("?")[0]  # a query may carry a token or password
        if key not in self.failures_logged and len(self.failures_logged) < 256:
            self.failures_logged.add(key)
            logger.error(
                f"registry: {where} for {flow.request.method} {path[:200]}:\n"
                + "".join(traceback.format_exception(e))
            )
        else:
            logger.error(f"registry: {where}: {_secret_free(e)}")
        reason = f"{where}: {_secret_free(e)}"
        if hook in ("requestheaders", "token"):
            _refuse(flow, decide.Refusal(500, "UNKNOWN", reason))
            return
        flow.metadata["registry_failed"] = reason
        if hook == "response":
            _fail_response(flow, reason)
            return
        # responseheaders: the upstream's headers must not reach the client. A body is
        # not read past its first byte (cap 0: the client gets our 502); a response
        # without one is replaced in the response hook.
        flow.response.stream = False
        flow.metadata[patches.RESPONSE_CAP] = 0
        flow.metadata[patches.CAP_ERROR] = api.registry_error(
            "UNAVAILABLE", message=f"the proxy could not rewrite the upstream's answer: {where}"
        ).decode()


def _log_aliases(rules: Rules, most: int = 20) -> None:
    """Say which rules overlap: not an error (the first rule wins both ways), but a
    client name that works as an alias may surprise whoever wrote the rules."""
    for alias in rules.aliases[:most]:
        logger.info(
            f"registry: {alias.later} is an alias of {alias.earlier} for names such as "
            f"{alias.example} (they map back through the earlier rule)"
        )
    if len(rules.aliases) > most:
        logger.info(f"registry: ... and {len(rules.aliases) - most} more overlapping pairs")


def parse_public_url(url: str | None) -> Origin | None:
    if not url:
        return None
    try:
        origin = Origin.parse(url)
        path = urlsplit(url).path
    except ValueError as e:
        raise exceptions.OptionsError(f"registry_public_url {url!r}: {e}") from None
    if path not in ("", "/"):
        raise exceptions.OptionsError(
            f"registry_public_url {url!r}: give scheme://host[:port] without a path"
        )
    return origin


def _read_rules_file(path: str) -> bytes:
    """The rules file's bytes (blocking: run it off the event loop once running)."""
    try:
        with open(path, "rb") as f:
            data = f.read(RULES_FILE_MAX + 1)
    except OSError as e:
        raise RulesError(f"{path}: cannot read rules file: {e}") from e
    if len(data) > RULES_FILE_MAX:
        raise RulesError(f"{path}: larger than {RULES_FILE_MAX} bytes; not a rules file")
    return data


def _parse_rules_file(path: str, data: bytes) -> Rules:
    """Parse and check the rules (may take a while for many rules: off the loop)."""
    from regrewrite.rules import parse_rules

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RulesError(f"{path}: cannot read rules file: {e}") from e
    try:
        return parse_rules(text, path)
    except RulesError:
        raise
    except Exception as e:  # noqa: BLE001 - a checker bug must not stop the proxy
        raise RulesError(f"{path}: cannot check the rules: {type(e).__name__}: {e}") from e


def _account_header(upstream) -> str:
    """Basic credentials of the proxy's own account on ``upstream`` (reads a secret
    file: run it off the event loop)."""
    credentials = upstream.credentials
    password = credentials.password()
    if not password:
        raise ValueError(f"the password of {credentials.username} is empty")
    return auth.basic_credentials(credentials.username, password)


def _secret_free(e: BaseException) -> str:
    """An exception's message, cut short; our own messages never hold secrets, and an
    OSError's names at most a file."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def _answer(flow: http.HTTPFlow, response: http.Response, comment: str) -> None:
    """Answer the client ourselves (not an error)."""
    patches.hold_request_body(flow)  # (a POST /v2/ to the ping answer: capped too)
    flow.response = response
    flow.metadata["registry_answered"] = True
    flow.metadata["registry_decision"] = "answered"
    flow.comment = comment


def _refuse(flow: http.HTTPFlow, refusal: decide.Refusal) -> None:
    """Answer the client ourselves with a registry-style JSON error. A body the client
    still sends is not read past REQUEST_BODY_CAP (patches.REQUEST_CAP)."""
    body = refusal.body
    head = flow.request.method == "HEAD"
    response = http.Response.make(refusal.status, b"" if head else body, api.JSON_HEADERS)
    if head:
        response.headers["Content-Length"] = str(len(body))  # what GET would send
    flow.response = response
    meta = flow.metadata
    meta["registry_refused"] = meta["registry_answered"] = True
    meta["registry_decision"] = "denied" if refusal.status < 500 else "error"
    meta["registry_error_code"] = refusal.code
    if refusal.client_name is not None:
        meta["registry_client_name"] = refusal.client_name
    patches.hold_request_body(
        flow,
        api.registry_error(
            refusal.code,
            refusal.detail,
            f"{api.ERROR_MESSAGES.get(refusal.code, refusal.code)} (request body over "
            f"{decide.REQUEST_BODY_CAP} bytes not read)",
        ).decode(),
    )
    flow.marked = ":no_entry:"
    flow.comment = (
        f"denied: {refusal.reason}" if refusal.status < 500 else (f"failed: {refusal.reason}")
    )


def _dropped(chunk: bytes) -> list[bytes]:
    """A body stream that passes nothing on ([]: an empty chunk would end a chunked
    HTTP/1 body early)."""
    return []


def _fail_response(flow: http.HTTPFlow, reason: str) -> None:
    """Replace an upstream response we could not rewrite with a JSON 502."""
    # The client is told only where it failed: the exception's message may quote what
    # could not be rewritten (upstream names, hosts); that stays in the log and comment.
    where = reason.partition(": ")[0]
    body = api.registry_error(
        "UNAVAILABLE", message=f"the proxy could not rewrite the upstream's answer: {where}"
    )
    head = flow.request.method == "HEAD"
    flow.response = http.Response.make(502, b"" if head else body, api.JSON_HEADERS)
    meta = flow.metadata
    meta["registry_decision"] = "error"
    meta["registry_error_code"] = "UNAVAILABLE"
    flow.marked = ":no_entry:"
    flow.comment = f"{flow.comment} · failed: {reason}" if flow.comment else f"failed: {reason}"


def _show_client_request(flow: http.HTTPFlow) -> None:
    """Once a flow has gone upstream, show the request as the client sent it (its path
    and the reverse-mode target): what a person reads and edits, and what a replay maps
    anew. What went upstream stays in the comment and in ``registry_upstream_target``."""
    meta = flow.metadata
    target = meta.pop("registry_client_target", None)
    if target is None:
        return
    default = meta.get("registry_default")
    req = flow.request
    req.path = target
    if default is not None and (req.scheme, req.host, req.port) != tuple(default):
        # (only when retargeted: mitmproxy's host setter also rewrites the Host header)
        req.scheme, req.host, req.port = default[0], default[1], default[2]


def _client_names(rules: Rules, flow: http.HTTPFlow) -> api.MapName:
    """How names from this flow's upstream map back to what its client uses."""
    key = flow.metadata.get("registry_upstream_key", "default")
    registry = next((i for i, u in enumerate(rules.upstreams) if u.key == key), None)
    if registry is None:
        raise LookupError(f"upstream {key} is no longer in the rules")
    if "registry_mirror" in flow.metadata:
        # A mirror client speaks the upstream's own names.
        return lambda n: n if rules.client_name(n, registry) is not None else None
    return lambda n: rules.client_name(n, registry)


def _is_manifest(flow: http.HTTPFlow) -> bool:
    repo = api.parse_repository_path(api.split_target(flow.request.path)[0])
    return repo is not None and repo.kind == "manifests"


def _drop_client_authority(request: http.Request) -> None:
    """Forget where the client claims the request was meant to go.

    An absolute-form target (``GET http://other/v2/ HTTP/1.1``) would reach the upstream
    with the client's authority in it, and distribution builds Location URLs from that
    and from ``X-Forwarded-Host``/``-Proto`` and ``Forwarded``: the client would be sent
    to a host of its choosing, under the upstream's names.  (Host itself is already set
    to the upstream by reverse mode.)
    """
    if not (request.is_http2 or request.is_http3):
        request.authority = ""  # origin form; h2's :authority is the Host, already upstream
    # One pass over the raw fields finds none in nearly every request; the Headers view
    # (keys(), pop()) would cost ~15 µs per request even then (bench/hookcost.py).
    for raw, _ in request.headers.fields:
        lowered = raw.lower()
        if lowered == b"forwarded" or lowered.startswith(b"x-forwarded-"):
            break
    else:
        return
    for name in list(request.headers.keys()):
        if name.lower() == "forwarded" or name.lower().startswith("x-forwarded-"):
            request.headers.pop(name, None)


def _raw_header(headers: http.Headers, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), from the raw fields."""
    for key, value in headers.fields:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _user(authorization: str | None) -> str | None:
    """Who the client says it is: a Bearer token's subject or a Basic username."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError, binascii.Error):
            decoded = base64.b64decode(value.strip(), validate=True).decode()
            name, colon, _ = decoded.partition(":")
            # Without a colon it is not user:password: the whole value may be a token.
            return name[:USER_LIMIT] if colon else None
        return None
    info = _bearer_info(authorization)
    sub = (info or {}).get("claims", {}).get("sub") if isinstance(info, dict) else None
    # An unverified token's subject: the client's to choose, so bounded.
    return sub[:USER_LIMIT] if isinstance(sub, str) else None


# Claims of the Bearer tokens seen lately, by the sha256 of the header: a client sends
# the same token with every request of a pull or push, and decoding it each time cost
# ~25-50 µs per flow (bench/hookcost.py). Keyed by a hash so no token stays in memory.
_BEARER_CACHE: OrderedDict[bytes, dict | None] = OrderedDict()


def _bearer_info(authorization: str) -> dict | None:
    key = hashlib.sha256(authorization.encode("latin-1", "replace")).digest()
    if key in _BEARER_CACHE:
        _BEARER_CACHE.move_to_end(key)
        return _BEARER_CACHE[key]
    info = bearer_info(authorization)
    _BEARER_CACHE[key] = info
    if len(_BEARER_CACHE) > 256:
        _BEARER_CACHE.popitem(last=False)
    return info


def _restore_form(edited: str, original: str) -> str:
    """``edited`` (a redacted token form, perhaps changed by hand) with the secrets of
    ``original`` in place of its ``<redacted>`` values."""
    out = edited
    for field in auth.SECRET_FIELDS:
        secrets = auth.form_values(original, field)
        if secrets:
            secret = secrets[0]
            out = auth.replace_form_values(
                out, field, lambda v, s=secret: s if v == "<redacted>" else v
            )
    return out


def _redact_form(request: http.Request, form: str) -> None:
    """Blank the secrets of a token form in the flow (a replay puts the kept ones back)."""
    try:
        request.content = auth.redact_form(form).encode("latin-1")
    except Exception:  # noqa: BLE001 - nothing rather than the secret
        request.content = b""


def _redact_credentials(flow: http.HTTPFlow) -> None:
    """Once a request has gone upstream, keep its credentials out of logs and flow dumps."""
    # On the raw fields: several times cheaper than Headers.get/set on this hot path.
    headers = flow.request.headers
    if not any(k.lower() == b"authorization" for k, _ in headers.fields):
        return
    fields = []
    for key, value in headers.fields:
        if key.lower() == b"authorization":
            text = value.decode("latin-1")
            # The token's claims (not the token) stay, for the contentview. Only for the
            # view: a failure to decode them must not stop the redaction (nor escape the
            # hook, which would pass the upstream's response on as it is).
            try:
                info = _bearer_info(text)
            except Exception:  # noqa: BLE001
                info = None
            if info is not None:
                flow.metadata["registry_bearer"] = info
            value = text.split(" ", 1)[0].encode("latin-1") + b" <redacted>"
        fields.append((key, value))
    headers.fields = tuple(fields)


# Health answers /livez and /readyz and TrustedProxies reads forwarding headers before
# the core drops them; both must come first.
# Metrics, AccessLog and DecisionLog read what the core decided, so they come after it.
addons = [
    Health(),
    TrustedProxies(),
    RegistryRewrite(),
    BlobCache(),  # after the core: sees mapped requests; before Metrics: it wraps our stream
    Metrics(),
    AccessLog(),
    DecisionLog(),
    UnloadIdle(),
]
