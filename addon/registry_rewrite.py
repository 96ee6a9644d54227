"""Serve a Docker/OCI registry under different repository names.

    mitmdump --mode reverse:https://UPSTREAM -s addon/registry_rewrite.py \\
        --set registry_rules=rules.yaml

The registry protocol itself (names, scopes, challenges, Location, Link, bodies)
lives in the ``registry`` package beside this file; this class only wires it to
mitmproxy's hooks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import OrderedDict
from urllib.parse import quote, urlencode, urlsplit

from mitmproxy import command, contentviews, ctx, exceptions, http
from mitmproxy.net.http.http1 import assemble_response

from regrewrite import api, auth, realm
from regrewrite.addons.accesslog import AccessLog
from regrewrite.addons.health import Health
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
from regrewrite.names import Route, is_valid_name
from regrewrite.rules import Rules, RulesError, load_rules

logger = logging.getLogger(__name__)

RELOAD_INTERVAL = 1.0  # seconds between looks at the rules file's mtime
CATALOG_CURSORS = 1024  # opaque _catalog cursors remembered (see _catalog_cursor)
JSON_BODY_LIMIT = 4 << 20  # error and listing bodies we buffer to rewrite
# Response headers responseheaders rewrites (raw, lower case).
_NAMING_HEADERS = frozenset((b"www-authenticate", b"location", b"link"))


class RegistryRewrite:
    def __init__(self) -> None:
        self.rules = Rules()
        self.rules_file: str | None = None
        self.rules_stamp: tuple[float, int] | None = None
        self.reloads = {"ok": 0, "error": 0}  # rules file reloads, read by the metrics
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
        # mitmweb, mitmproxy and mitmdump show registry messages through this view.
        self.contentview = RegistryContentview(lambda: self.rules)

    def load(self, loader):
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
                self.rules = load_rules(path)
            except RulesError as e:
                if not self.started:
                    # mitmdump stops when an error is logged during start-up; raising
                    # here would bury the message under a traceback.
                    logger.error(f"registry: {e}")
                    return
                raise exceptions.OptionsError(str(e)) from None
            self.rules_file = path
            self.rules_stamp = _stamp(path)
            logger.info(
                f"registry: {len(self.rules.names.rules)} rules from {path}, "
                f"unmatched names: {self.rules.unmatched}"
            )
        if "registry_public_url" in updated:
            url = ctx.options.registry_public_url
            try:
                self.public = Origin.parse(url) if url else None
            except ValueError as e:
                raise exceptions.OptionsError(f"registry_public_url: {e}") from e
            if url and urlsplit(url).path not in ("", "/"):
                raise exceptions.OptionsError(
                    f"registry_public_url {url!r}: give scheme://host[:port] without a path"
                )
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
        _registry_style_proxy_errors(True)
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch_rules())

    def done(self):
        _registry_style_proxy_errors(False)
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
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

    @property
    def realm(self) -> str | None:
        """The default upstream's token realm, as learned."""
        return self.learned.get("default", (None, None))[0]

    @realm.setter
    def realm(self, value: str) -> None:
        self.learned["default"] = (value, self.service)

    @property
    def service(self) -> str | None:
        return self.learned.get("default", (None, None))[1]

    # --- rules reload -------------------------------------------------------------

    async def _watch_rules(self) -> None:
        seen = self.rules_stamp
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            stamp = _stamp(self.rules_file) if self.rules_file else None
            if stamp != seen:
                # Still being written, maybe: load it once it has stopped changing, so a
                # half-saved file that happens to parse never takes effect.
                seen = stamp
                continue
            self.reload_rules()

    def reload_rules(self) -> None:
        """Take a changed rules file into use; an invalid one leaves the old rules."""
        if self.rules_file is None:
            return
        stamp = _stamp(self.rules_file)
        if stamp == self.rules_stamp:
            return
        self.rules_stamp = stamp
        try:
            rules = load_rules(self.rules_file)
        except RulesError as e:
            logger.error(f"registry: {e} (the previous rules stay in force)")
            self.reloads["error"] += 1
            return
        self.reloads["ok"] += 1
        self.rules = rules
        self.cursors.clear()
        logger.info(f"registry: reloaded {len(rules.names.rules)} rules from {self.rules_file}")

    # --- requests -----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        rules = self.rules
        _drop_client_authority(flow.request)
        # In reverse mode the request already targets the default upstream.
        default = Origin(flow.request.scheme, flow.request.host, flow.request.port)
        flow.metadata["registry_upstream"] = flow.metadata["registry_default"] = default
        path, query = api.split_target(flow.request.path)
        if path == rules.token_path:
            # The token form must be read to map its scopes: no streaming.
            flow.metadata["registry_token"] = True
            if flow.request.method not in ("GET", "POST"):
                _refuse(flow, 405, "UNSUPPORTED", None, "token endpoint takes GET or POST")
            return
        if path in ("/v2/", "/v2"):
            if len(rules.upstreams) > 1:
                self._answer_ping(flow)  # one challenge for all upstreams
            else:
                flow.request.stream = True
            return
        if not path.startswith("/v2/"):
            # Not the registry API: under deny, nothing else of the upstream is exposed.
            if rules.unmatched == "deny":
                _refuse(flow, 404, "UNSUPPORTED", None, f"not a registry endpoint: {path}")
            else:
                flow.request.stream = True
            return
        if api.is_catalog(path):
            self._catalog_request(flow, rules, query)
            return
        repo = api.parse_repository_path(path)
        if repo is None:
            if rules.unmatched == "deny":
                _refuse(flow, 404, "UNSUPPORTED", None, f"unknown registry endpoint {path}")
            else:
                flow.request.stream = True
            return
        # containerd as a mirror adds ?ns=<registry host>: names are that upstream's own.
        ns = api.query_value(query, "ns")
        mirror = rules.mirror(ns) if ns else None
        route = self._route(flow, rules, repo.name, mirror=mirror)
        if route is None:
            return
        code = repo.reference_error()
        if code is not None:
            _refuse(flow, 400, code, {"reference": repo.reference}, f"malformed {repo.kind} path")
            return
        note = ""
        if repo.kind == "blobs/uploads" and api.query_value(query, "from") is not None:
            source = _mount_source(rules, api.query_value(query, "from"), mirror)
            if source is not None and source.registry == route.registry:
                query = api.replace_query_value(query, "from", source.name)
            else:
                # No mount from a source no rule maps, nor across upstreams: ask for a plain
                # upload, as a registry that cannot mount answers 202 (refusing the POST
                # fails containerd's push). The client's `from` never goes upstream.
                query = api.drop_query_values(query, ("mount", "from"))
                where = "another upstream" if source is not None else "outside the rules"
                note = f" · mount from {where} dropped"
        if route.registry != 0:
            self._retarget(flow, rules.upstreams[route.registry].url)
        if mirror is not None:
            flow.metadata["registry_mirror"] = ns
        flow.metadata["registry_route"] = route.registry
        new_path = api.RepositoryPath(route.name, repo.endpoint).path()
        flow.request.path = new_path + ("?" + query if query else "")
        flow.request.stream = not (self.show_manifests and _keep_manifest(flow, flow.request))
        via = "" if route.registry == 0 else f" @{rules.upstreams[route.registry].key}"
        flow.comment = (
            f"{repo.name} → {route.name}{via} · {repo.kind} {flow.request.method} {repo.reference}"
        ).rstrip() + note

    def _retarget(self, flow: http.HTTPFlow, url: str) -> None:
        """Send the flow to another upstream (its Host, SNI and TLS follow the URL)."""
        origin = Origin.parse(url)
        flow.request.scheme = origin.scheme
        flow.request.host = origin.host
        flow.request.port = origin.port
        flow.metadata["registry_upstream"] = origin

    def _answer_ping(self, flow: http.HTTPFlow) -> None:
        """``/v2/`` with several upstreams: a client authenticated for any of them may
        go on; others are told to fetch a token from this proxy."""
        flow.metadata["registry_answered"] = True  # our own answer: nothing to rewrite
        if flow.request.headers.get("Authorization", "").lower().startswith("bearer "):
            flow.response = http.Response.make(200, b"{}", _JSON_HEADERS)
            return
        service = self.rules.service or self.service
        params = (("realm", f"{self._public(flow)}{self.rules.token_path}"),)
        if service:
            params += (("service", service),)
        body = api.registry_error("UNAUTHORIZED", message="authentication required")
        flow.response = http.Response.make(
            401,
            body,
            {**_JSON_HEADERS, "WWW-Authenticate": str(auth.Challenge("Bearer", params))},
        )

    def _route(
        self,
        flow: http.HTTPFlow,
        rules: Rules,
        name: str,
        what: str = "name",
        mirror: int | None = None,
    ) -> Route | None:
        """Where a client name goes, or None after refusing the flow.

        With a mirror hint the name is already the upstream's own: it must be one a
        rule makes reachable.
        """
        if not is_valid_name(name):
            _refuse(flow, 400, "NAME_INVALID", {what: name}, f"invalid repository name {name!r}")
            return None
        if mirror is not None:
            if rules.client_name(name, mirror) is None:
                _refuse(flow, 404, "NAME_UNKNOWN", {what: name}, f"no rule reaches {name}")
                return None
            return Route(mirror, name)
        found = rules.names.lookup(name)
        if found is None:
            if rules.unmatched == "pass":
                return Route(0, name)
            _refuse(flow, 404, "NAME_UNKNOWN", {what: name}, f"no rule for {name}")
            return None
        if not is_valid_name(found.name):
            _refuse(
                flow,
                400,
                "NAME_INVALID",
                {what: name},
                f"{name} maps to invalid upstream name {found.name!r}",
            )
            return None
        return found

    def _public(self, flow: http.HTTPFlow) -> Origin:
        return self.public or flow.metadata.get("registry_public") or _client_origin(flow)

    def _catalog_request(self, flow: http.HTTPFlow, rules: Rules, query: str) -> None:
        last = api.query_value(query, "last")
        if last:
            if last in self.cursors:
                upstream_last = self.cursors[last]
            else:
                upstream_last = rules.upstream_name(last)
            if upstream_last is None:
                _refuse(flow, 400, "NAME_INVALID", {"last": last}, f"unknown cursor {last!r}")
                return
            query = api.replace_query_value(query, "last", upstream_last)
            flow.request.path = "/v2/_catalog?" + query
        flow.comment = "catalog"

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get("registry_token"):
            await self._token(flow)

    async def _token(self, flow: http.HTTPFlow) -> None:
        """Answer a token request by asking the upstream's realm, scopes mapped."""
        rules = self.rules
        req = flow.request
        _, query = api.split_target(req.path)
        form = (req.get_text(strict=False) or "") if req.method == "POST" else ""
        registry, map_name = self._token_upstream(rules, query, form)
        upstream = rules.upstreams[registry]
        # With several upstreams each token service wants its own service name (the
        # client only knows the one of the proxy's own challenge).
        several = len(rules.upstreams) > 1
        learned_realm, learned_service = self.learned.get(upstream.key, (None, None))
        upstream_realm = upstream.realm or learned_realm
        service = upstream.service or learned_service
        if upstream_realm is None or (several and service is None):
            # e.g. the proxy restarted and the client kept its realm: ask the upstream.
            origin = flow.metadata["registry_default"] if registry == 0 else None
            await self._discover_realm(upstream.key, origin or Origin.parse(upstream.url))
            learned_realm, learned_service = self.learned.get(upstream.key, (None, None))
            upstream_realm = upstream.realm or learned_realm
            service = upstream.service or learned_service
        if upstream_realm is None:
            _refuse(flow, 502, "UNAVAILABLE", None, "the upstream advertises no token realm")
            return

        mapped: list[tuple[str, str]] = []
        dropped: list[str] = []

        def map_scope(value: str) -> str | None:
            result = auth.map_scopes(value, map_name)
            mapped.extend(result.mapped)
            dropped.extend(result.dropped)
            return result.value or None

        query = api.drop_query_values(auth.replace_form_values(query, "scope", map_scope), ("ns",))
        body = None
        if req.method == "POST":
            body = auth.replace_form_values(form, "scope", map_scope).encode()
        if several and service:
            if body is not None:
                body = auth.set_form_value(body.decode(), "service", service).encode()
            else:
                query = auth.set_form_value(query, "service", service)
        url = upstream_realm + (("&" if "?" in upstream_realm else "?") + query if query else "")
        req.url = url
        headers = [(k, v) for k, v in req.headers.items() if k.lower() in realm.FORWARDED_HEADERS]
        if upstream.credentials is not None:
            # The proxy's own account on this upstream: a GET with Basic auth, whatever
            # grant the client tried (its credentials are for the proxy, not this upstream).
            scopes = auth.form_values(body.decode(), "scope") if body else []
            if body is not None:
                pairs = [("service", service)] if service else []
                pairs += [("scope", x) for x in scopes]
                url = upstream_realm + ("?" + urlencode(pairs, quote_via=quote) if pairs else "")
                req.method, req.url, req.content, body = "GET", url, b"", None
            basic = auth.basic_credentials(
                upstream.credentials.username, upstream.credentials.password()
            )
            headers = [(k, v) for k, v in headers if k.lower() not in ("authorization",)]
            headers.append(("Authorization", basic))
        flow.comment = _token_comment(mapped, dropped)
        # The flow now shows what goes upstream, less the secrets (they are in `headers`).
        _redact_credentials(flow)
        if body is not None:
            req.content = auth.redact_form(body.decode()).encode()
        try:
            reply = await asyncio.to_thread(
                realm.fetch,
                req.method,
                url,
                headers,
                body,
                self.tls,
                ctx.options.registry_token_timeout,
            )
        except realm.RealmUnreachable as e:
            logger.warning(f"registry: token service unreachable: {e}")
            status, code = (504, "UNAVAILABLE") if e.timeout else (502, "UNAVAILABLE")
            _refuse(flow, status, code, None, f"token service {urlsplit(url).netloc}: {e}")
            return
        keep = {"content-type", "cache-control", "pragma", "www-authenticate"}
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in reply.headers
            if k.lower() in keep
        ]
        flow.response = http.Response.make(reply.status, reply.body, headers)
        if reply.status != 200:
            flow.marked = ":warning:"
            flow.comment += f" · token service answered {reply.status}"
        else:
            shortfall = token_shortfall(reply.body, mapped)
            if shortfall:
                flow.comment += f" · not granted: {' '.join(shortfall)}"

    def _token_upstream(self, rules: Rules, query: str, form: str):
        """Which upstream a token request is for, and how its scope names map there.

        A client's scopes for one request name one upstream (a mount across upstreams
        is turned into an upload); scopes of other upstreams are dropped. The first scope
        asking to push decides, else the first scope; with none (``docker login``), the
        default upstream.
        """
        ns = api.query_value(query, "ns")
        mirror = rules.mirror(ns) if ns else None
        if mirror is not None:
            return mirror, lambda n: n if rules.client_name(n, mirror) is not None else None
        scopes = [
            scope
            for value in auth.form_values(query, "scope") + auth.form_values(form, "scope")
            for scope in auth.parse_scopes(value)
            if rules.route(scope.name) is not None
        ]
        # A push names its target with push and a mount source with pull only.
        writes = [s for s in scopes if {"push", "delete", "*"} & set(s.actions.split(","))]
        chosen = (writes or scopes or [None])[0]
        registry = rules.route(chosen.name).registry if chosen is not None else 0

        def map_name(name: str) -> str | None:
            found = rules.route(name)
            return found.name if found is not None and found.registry == registry else None

        return registry, map_name

    async def _discover_realm(self, key: str, upstream: Origin) -> None:
        try:
            reply = await asyncio.to_thread(
                realm.fetch, "GET", f"{upstream}/v2/", [], None, self.tls, 10.0
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
        _redact_credentials(flow)
        if flow.metadata.get("registry_answered") or flow.response is None:
            return
        if flow.metadata.get("registry_token") or not flow.live:
            return  # (a flow loaded from a file was rewritten when it was live)
        rules = self.rules
        resp = flow.response
        upstream: Origin | None = flow.metadata.get("registry_upstream")
        if upstream is None:
            return
        if resp.status_code not in (401, 403) and not any(
            k.lower() in _NAMING_HEADERS for k, _ in resp.headers.fields
        ):
            # Nothing here names a repository or points back at us (most blob and
            # manifest responses): skip the header lookups below, ~2 µs each.
            if not self._body_needs_rewrite(flow):
                resp.stream = not (self.show_manifests and _keep_manifest(flow, resp))
            return
        public = self._public(flow)
        client_name = self._client_names(flow)
        token_url = f"{public}{rules.token_path}"
        if "registry_mirror" in flow.metadata:
            token_url += f"?ns={flow.metadata['registry_mirror']}"

        challenges = resp.headers.get_all("WWW-Authenticate")
        if challenges:
            key = rules.upstreams[flow.metadata.get("registry_route", 0)].key
            resp.headers.set_all(
                "WWW-Authenticate",
                [self._challenge(key, value, token_url, client_name) for value in challenges],
            )
        if resp.status_code in (401, 403):
            note = auth_note(
                resp.status_code,
                resp.headers.get_all("WWW-Authenticate"),
                flow.request.headers.get("Authorization"),
            )
            flow.comment = f"{flow.comment} · {note.comment}" if flow.comment else note.comment
            if note.failed:
                flow.marked = ":lock:"

        def rewrite(url: str) -> str:
            return api.rewrite_url(url, upstream, public, client_name, self._catalog_cursor)

        if "Location" in resp.headers:
            resp.headers["Location"] = rewrite(resp.headers["Location"])
        if "Link" in resp.headers:
            resp.headers["Link"] = api.rewrite_link(resp.headers["Link"], rewrite)

        if not self._body_needs_rewrite(flow):
            resp.stream = not (self.show_manifests and _keep_manifest(flow, resp))

    def _client_names(self, flow: http.HTTPFlow):
        """How names from this flow's upstream map back to what its client uses."""
        rules = self.rules
        registry = flow.metadata.get("registry_route", 0)
        if "registry_mirror" in flow.metadata:
            # A mirror client speaks the upstream's own names.
            return lambda n: n if rules.client_name(n, registry) is not None else None
        return lambda n: rules.client_name(n, registry)

    def _challenge(self, key: str, value: str, token_url: str, client_name) -> str:
        """Send the client to our token endpoint, with scopes in client names."""
        service = self.rules.service if key == "default" else None
        try:
            rewritten = auth.rewrite_challenge(value, token_url, client_name, service)
        except ValueError:
            logger.warning(f"registry: unparseable challenge from upstream: {value[:200]!r}")
            return value
        if rewritten.realm:
            self._learn_realm(key, rewritten.realm, rewritten.service)
        return rewritten.header

    def _body_needs_rewrite(self, flow: http.HTTPFlow) -> bool:
        resp = flow.response
        status = resp.status_code
        if flow.request.method == "HEAD" or (status < 400 and status != 200):
            return False
        if status == 200:
            # Decide by path first: most 200s are blobs and manifests, whose headers
            # need not be looked at.
            path, _ = api.split_target(flow.request.path)
            if not api.is_catalog(path):
                repo = _repository_path(path)
                if repo is None or repo.kind != "tags/list":
                    return False
        length = resp.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > JSON_BODY_LIMIT):
            return False
        return status == 200 or "json" in resp.headers.get("Content-Type", "")

    def error(self, flow: http.HTTPFlow) -> None:
        _redact_credentials(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.stream or flow.metadata.get("registry_answered"):
            return
        if not flow.live or flow.metadata.get("registry_kept_manifest"):
            return  # loaded from a file, or a manifest whose bytes must not change
        if flow.metadata.get("registry_token") or "registry_upstream" not in flow.metadata:
            return
        client_name = self._client_names(flow)
        path, _ = api.split_target(flow.request.path)
        content = resp.content or b""
        try:
            if resp.status_code >= 400:
                new = api.rewrite_errors(content, client_name)
                if new is not None:
                    resp.content = new
            elif api.is_catalog(path):
                resp.content = api.rewrite_catalog(content, client_name)
            else:
                repo = api.parse_repository_path(path)
                if repo is not None:
                    client = client_name(repo.name) or repo.name
                    resp.content = api.rewrite_tags_list(content, client)
        except ValueError:
            logger.warning(f"registry: cannot rewrite {flow.request.path}: body is not JSON")

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


_JSON_HEADERS = {
    "Content-Type": "application/json",
    "Docker-Distribution-API-Version": "registry/2.0",
}


def _refuse(flow: http.HTTPFlow, status: int, code: str, detail, reason: str) -> None:
    """Answer the client ourselves with a registry-style JSON error."""
    body = api.registry_error(code, detail)
    head = flow.request.method == "HEAD"
    flow.response = http.Response.make(
        status,
        b"" if head else body,
        {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"},
    )
    if head:
        flow.response.headers["Content-Length"] = str(len(body))  # what GET would send
    flow.metadata["registry_refused"] = flow.metadata["registry_answered"] = True
    flow.marked = ":no_entry:"
    flow.comment = f"denied: {reason}" if status < 500 else f"failed: {reason}"


_MITMPROXY_ERROR_PAGES: dict = {}


def _registry_style_proxy_errors(enable: bool) -> None:
    """Make mitmproxy's own error answers (upstream refused, reset or timed out) registry
    JSON errors instead of HTML pages, which registry clients cannot show.

    mitmproxy has no option for this, so its page builders are swapped while the addon
    is loaded; the details stay in mitmproxy's log, not in the answer (they name the
    upstream's address).
    """
    from mitmproxy.proxy.layers.http import _http1, _http2, _http3

    if not enable:
        for (module, name), original in _MITMPROXY_ERROR_PAGES.items():
            setattr(module, name, original)
        _MITMPROXY_ERROR_PAGES.clear()
        return

    def body(status_code: int, message: str) -> bytes:
        if status_code in (502, 503, 504):
            return api.registry_error("UNAVAILABLE")
        return api.registry_error("UNKNOWN", message=message or None)

    def make_error_response(status_code: int, message: str = "") -> bytes:
        resp = http.Response.make(
            status_code,
            body(status_code, message),
            {
                "Content-Type": "application/json",
                "Docker-Distribution-API-Version": "registry/2.0",
                "Connection": "close",
            },
        )
        return assemble_response(resp)

    for module, name, replacement in (
        (_http1, "make_error_response", make_error_response),
        (_http2, "format_error", body),
        (_http3, "format_error", body),
    ):
        if hasattr(module, name) and (module, name) not in _MITMPROXY_ERROR_PAGES:
            _MITMPROXY_ERROR_PAGES[(module, name)] = getattr(module, name)
            setattr(module, name, replacement)


# Each flow's upstream path is parsed up to three times across its hooks (bench/hookcost.py).
# RepositoryPath is immutable, so the parses can be shared.
_repository_path = functools.lru_cache(maxsize=1024)(api.parse_repository_path)


def _keep_manifest(flow: http.HTTPFlow, message: http.Message) -> bool:
    """Whether to buffer a manifest body (4 MiB at most, by the spec) instead of streaming
    it, so mitmweb and mitmdump can show it. Its bytes pass unchanged."""
    repo = _repository_path(api.split_target(flow.request.path)[0])
    length = message.headers.get("Content-Length", "")
    keep = (
        repo is not None
        and repo.kind == "manifests"
        and length.isdigit()
        and int(length) <= JSON_BODY_LIMIT
    )
    if keep and message is flow.response:
        flow.metadata["registry_kept_manifest"] = True
    return keep


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


def _mount_source(rules: Rules, name: str, mirror: int | None) -> Route | None:
    """Where a mount's ``from`` lies upstream (as ``_route`` finds it), or None when no
    rule reaches it; never refuses: a mount that cannot be done becomes an upload."""
    if not is_valid_name(name):
        return None
    if mirror is not None:
        return Route(mirror, name) if rules.client_name(name, mirror) is not None else None
    found = rules.names.lookup(name)
    if found is None:
        return Route(0, name) if rules.unmatched == "pass" else None
    return found if is_valid_name(found.name) else None


# A client sends the same token with every request of a pull or push; decoding it each
# time cost ~25-50 µs per flow (bench/hookcost.py). The dicts are shared: read-only.
_bearer_info = functools.lru_cache(maxsize=256)(bearer_info)


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
            # The token's claims (not the token) stay, for the contentview.
            info = _bearer_info(text)
            if info is not None:
                flow.metadata["registry_bearer"] = info
            value = text.split(" ", 1)[0].encode("latin-1") + b" <redacted>"
        fields.append((key, value))
    headers.fields = tuple(fields)


def _token_comment(mapped: list[tuple[str, str]], dropped: list[str]) -> str:
    parts = [f"token: {len(mapped)} scope{'s' if len(mapped) != 1 else ''} mapped"]
    parts += [f"{a} → {b}" for a, b in mapped]
    if dropped:
        parts.append(f"dropped {' '.join(dropped)}")
    return " · ".join(parts)


def _client_origin(flow: http.HTTPFlow) -> Origin:
    """This proxy's address as the client reached it (reverse mode rewrote Host)."""
    conn = flow.client_conn
    host, port = conn.sockname[0], conn.sockname[1]
    if conn.tls_established:
        return Origin("https", conn.sni or host, port)
    return Origin("http", host, port)


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size


# Health answers /livez and /readyz and TrustedProxies reads forwarding headers before
# the core drops them; both must come first.
# Metrics and AccessLog read what the core decided, so they come after it.
addons = [Health(), TrustedProxies(), RegistryRewrite(), Metrics(), AccessLog()]
