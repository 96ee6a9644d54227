"""The blob cache addon: serves blobs (and manifests by digest) from a local directory.

Composed after the core in addon/registry_rewrite.py, so every hook here sees a request
already mapped to its upstream name and origin.  Off unless ``registry_cache_dir`` is set.

- Miss: the upstream's body streams to the client as before; a thread writes it to a
  temp file and hashes it; only a matching digest and length are renamed into place.
- Hit: first the upstream is asked, with the client's own Authorization, whether this
  client may read this blob in this repository (``HEAD``).  Only a yes is served, by a
  ``307`` to a signed URL on the local sendfile server (blobs) or from the file
  (manifests).  Anything else sends the request upstream unchanged, so the client gets
  exactly the upstream's answer (401, 403, 404).
- Concurrent misses of one digest: one goes upstream; the others (once authorised)
  wait for it and are then served as hits.

The client's credential is used only in memory, for the authorisation request, and is
never stored in flow.metadata or on disk (a grant is remembered under a hash of it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import command, ctx, exceptions, http

from regrewrite import api, realm
from regrewrite.addons import client_origin, core, patches
from regrewrite.blobcache import (
    Backlog,
    Digest,
    Flights,
    Grants,
    Signer,
    Store,
    WriteBehind,
    parse_digest,
    parse_size,
    referenced_digests,
    shared_secret,
    upstream_dirname,
)
from regrewrite.blobserver import BlobServer
from regrewrite.contentview import bearer_info

logger = logging.getLogger(__name__)

URL_SECONDS = 60  # lifetime of a redirect URL; its blob is not evicted meanwhile
AUTH_TIMEOUT = 10.0  # seconds for the upstream's yes/no on a hit
WAIT_SECONDS = 600.0  # longest wait for another request's download of the same blob
LOOKS = 4  # looks at the disk per request (a failed file, a download waited for, ...)
MAX_BACKLOG = 64 << 20  # bytes waiting for the disk over all misses
MAX_QUEUED = 32 << 20  # bytes waiting for the disk per blob before caching gives up
MAX_AHEAD = 32  # blob questions asked ahead of the client at once, over all flows
# Manifests whose blobs are asked about ahead: image manifests and indexes are a few KiB;
# a 4 MiB one took 94 MB and 0.35 s to parse, again for every pull.
AHEAD_MANIFEST_LIMIT = 64 << 10
# Threads for HEADs upstream: as many as asking ahead may hold, and as many again as
# connections are kept, so a client's own question never waits behind a speed-up for
# someone else (16 stalled questions asked ahead held a tag's HEAD for their timeout).
ASK_WORKERS = MAX_AHEAD + realm.MAX_IDLE
FILE_WORKERS = 4  # the cache's disk work (stat, read, touch, eviction)
HASH_WORKERS = 4  # whole blobs hashed after a restart: threads of their own (see _hashed)
MAX_VERIFIED = 1 << 16  # files remembered as checked (see _forget_gone)
INLINE_BLOB = 64 << 10  # blobs up to this size are answered from the file, not redirected
INLINE_BUDGET = 32 << 20  # answers read from disk and not yet sent, over all flows
MANIFEST_LIMIT = 4 << 20  # manifests are cached up to this size (the spec's limit)
_AUTHORISED = frozenset((200, 302, 303, 307, 308))  # a redirect to storage is a yes too
_JSON = {"Docker-Distribution-API-Version": "registry/2.0"}
SERVE_MODES = ("auto", "redirect", "through", "public")
# Answers to requests without credentials, remembered and given again (_answer_plain).
PLAIN_SECONDS = 30.0
PLAIN_BODY_LIMIT = 4096
MAX_PLAIN = 256
PLAIN_KEY = "registry_cache_plain"  # flow.metadata: where the answer is remembered
_PLAIN_HEADERS = frozenset(
    (b"content-type", b"content-encoding", b"www-authenticate", b"docker-distribution-api-version")
)
# What an answer to a HEAD by tag relays from the upstream's answer to the same HEAD.
_TAG_HEADERS = frozenset(("content-type", "content-length", "docker-content-digest", "etag"))


@dataclass
class _Pending:
    """One flow's cache state, kept in memory (never in flow.metadata)."""

    key: tuple[str, Digest]
    kind: str  # "blobs" or "manifests"
    flight: asyncio.Future | None = None  # set when this flow fetches for everyone
    writer: WriteBehind | None = None
    by_tag: bool = False  # the digest is what a HEAD by tag named a moment before


class BlobCache:
    def __init__(self) -> None:
        self.store: Store | None = None
        self.server: BlobServer | None = None
        self.signer: Signer | None = None
        self.cap = 0
        self.grants = Grants(ttl=30.0)
        self.flights = Flights()
        self.pending: dict[str, _Pending] = {}
        self.asking: dict[bytes, asyncio.Future] = {}  # grant -> the upstream's answer to come
        self.ahead = 0  # questions asked ahead (_ask_ahead) not answered yet, and reads
        self.tasks: set[asyncio.Task] = set()
        # HEADs upstream block a thread each for up to AUTH_TIMEOUT: their own pool
        # (with asking ahead's manifest reading), so questions asked ahead never starve
        # asyncio's default executor (which resolves the upstreams' host names and runs
        # the cache's file looks).
        self.ask_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Answers read from disk (manifests, small blobs) until sent: bytes, and by flow.
        self.inline_held = 0
        self.backlog = Backlog(MAX_BACKLOG)
        self.inline: dict[str, int] = {}
        self.file_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # _plain_key -> (until, the core's rules it was made with, status, header
        # fields, body): see _answer_plain.
        self.plain: OrderedDict[tuple, tuple] = OrderedDict()
        # Files whose digest this process has checked (or written): (path, size, inode).
        self.verified: set[tuple[str, int, int]] = set()
        # Redirect targets handed out, until their URL expires (eviction spares them).
        self.pins: dict[str, float] = {}
        self.pins_lock = threading.Lock()
        self.logged_errors: set[str] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.counts = dict.fromkeys(
            ("hits", "misses", "waits", "bypass", "stored", "rejected", "evictions"), 0
        )
        self.counts.update(bytes_served=0, bytes_fetched=0)
        self.collecting = False

    def load(self, loader):
        loader.add_option(
            "registry_cache_dir",
            str | None,
            None,
            "Directory of the blob cache (off when unset). Replicas may share it.",
        )
        loader.add_option(
            "registry_cache_max_bytes",
            str,
            "10G",
            "Size cap of the blob cache, e.g. 50G; least recently served blobs go first.",
        )
        loader.add_option(
            "registry_cache_port",
            int,
            0,
            "Port of the local blob server cache hits are redirected to (0: any free "
            "port; set it when clients must reach it through a fixed port).",
        )
        loader.add_option(
            "registry_cache_serve",
            str,
            "auto",
            "How hits reach the client: auto (307 to the local blob server, over TLS with "
            "the proxy's own certificate when the client came over TLS), redirect (307 "
            "to plain HTTP even for TLS clients), through (the proxy relays the blob from "
            "the local blob server: slowest), public (307 to the proxy's public address "
            "under /blobs/, for a TLS-terminating balancer that routes that path to the "
            "replicas' blob servers on registry_cache_port; the replicas share "
            "registry_cache_dir).",
            choices=SERVE_MODES,
        )
        loader.add_option(
            "registry_cache_grant_seconds",
            int,
            30,
            "Seconds a client's confirmed right to read a repository is remembered "
            "(never past its token's expiry; 0: ask the upstream on every hit).",
        )

    def configure(self, updated):
        if "registry_cache_max_bytes" in updated:
            try:
                self.cap = parse_size(ctx.options.registry_cache_max_bytes)
            except ValueError as e:
                raise exceptions.OptionsError(f"registry_cache_max_bytes: {e}") from None
        if "registry_cache_grant_seconds" in updated:
            if ctx.options.registry_cache_grant_seconds < 0:
                raise exceptions.OptionsError("registry_cache_grant_seconds must be >= 0")
            self.grants = Grants(ttl=float(ctx.options.registry_cache_grant_seconds))
        if updated & {"registry_cache_dir", "registry_cache_port", "listen_host"}:
            self._open(ctx.options.registry_cache_dir)

    def _open(self, directory: str | None) -> None:
        self._close()
        if not directory:
            return
        store = Store(directory)
        try:
            os.makedirs(store.root, exist_ok=True)
        except OSError as e:
            raise exceptions.OptionsError(f"registry_cache_dir {directory!r}: {e}") from None
        if not os.access(store.root, os.W_OK):
            # Still serves what is there (a read-only copy of a warm directory).
            self._log_once(
                "readonly",
                f"registry cache: {store.root} is not writable; "
                "serving what it holds, caching nothing new",
            )
        signer = Signer(shared_secret(store.root))
        try:
            server = BlobServer(
                store,
                signer,
                ctx.options.listen_host or "",
                ctx.options.registry_cache_port,
                served=self._served,
            ).start()
        except OSError as e:
            raise exceptions.OptionsError(
                f"registry_cache_port {ctx.options.registry_cache_port}: {e}"
            ) from None
        self.store, self.signer, self.server = store, signer, server
        logger.info(
            f"registry cache: {store.root}, cap {self.cap} bytes, blob server on port {server.port}"
        )

    def _close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.store = self.server = self.signer = None
        self.grants.clear()
        self.plain.clear()

    def running(self):
        self.loop = asyncio.get_running_loop()
        # With the Metrics addon loaded, its registry serves our counters too.
        registry = getattr(ctx.master.addons.get("metrics"), "registry", None)
        if registry is not None and not self.collecting:
            registry.register(_Collector(self))
            self.collecting = True

    def done(self):
        self._close()
        for pool in (self.ask_pool, self.file_pool, self.hash_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.ask_pool = self.file_pool = self.hash_pool = None

    @command.command("registry.cache")
    def stats_command(self) -> str:
        """Counters of the blob cache since start."""
        text = " ".join(f"{k}={v}" for k, v in self.counts.items())
        logger.info(f"registry.cache: {text}")
        return text

    # --- requests -----------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.store is None or flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if req.method not in ("GET", "HEAD") or not _mapped(flow):
            return
        try:
            upstream = upstream_dirname(req.scheme, req.host, req.port)
            path, _ = api.split_target(req.path)
            repo = api.parse_repository_path(path)
            if "Authorization" not in req.headers and self._answer_plain(flow, upstream, repo):
                return
            if repo is None or repo.kind not in ("blobs", "manifests"):
                return
            digest = parse_digest(repo.reference)
            if digest is None:
                if repo.kind == "manifests":
                    await self._by_tag(flow, upstream, repo.name)
                return  # a blob by a digest we cannot verify: always upstream
            if req.method == "GET":
                await self._by_digest(flow, upstream, repo.name, repo.kind, digest)
        except Exception:
            # The cache must never fail a pull: the flow goes upstream as it stands.
            logger.exception("registry cache: lookup failed")
            self._land(flow.id, "failed")  # (waiters for its download are let go)

    async def _by_tag(self, flow: http.HTTPFlow, upstream: str, name: str) -> None:
        """A manifest by tag: the tag is resolved upstream every time, by a ``HEAD``
        with the client's own credentials on a kept connection (a new connection per
        request is what a warm pull spends its time on behind a WAN link). Its answer
        is a yes for this client, repository and digest: a cached manifest of that
        digest is served; otherwise the request goes upstream as it is, and what it
        brings back is cached under the digest once its content matches."""
        req = flow.request
        credential = req.headers.get("Authorization")
        if not credential:
            return  # (almost always a 401 with the challenge: one request, not two)
        reply = await self._ask_upstream(
            _origin_of(flow), req.path, credential, req.headers.get("Accept")
        )
        resolved = parse_tag_answer(reply)
        if resolved is None:
            return  # the upstream answers the request itself (401, 404, ...)
        digest, length, headers = resolved
        self._remember_grant(credential, Grants.key(credential, upstream, f"{name}@{digest}"))
        if req.method == "HEAD":
            # The upstream's own answer to this HEAD, relayed: nothing is served.
            response = http.Response.make(200, b"", _JSON)
            response.headers.update(headers)
            self._answer(flow, response)
            _comment(flow, "tag resolved upstream")
            return
        key = (upstream, digest)
        ident = await self._on_disk(_ident, self.store.path(upstream, digest))
        labelled = headers.get("content-type")
        if ident is not None and ident[1] == length:
            if await self._serve(flow, "manifests", upstream, name, digest, ident, False, labelled):
                return
        if self.flights.get(key) is None:
            self.pending[flow.id] = _Pending(key, "manifests", self.flights.start(key), by_tag=True)

    async def _by_digest(
        self, flow: http.HTTPFlow, upstream: str, name: str, kind: str, digest: Digest
    ) -> None:
        key = (upstream, digest)
        credential = flow.request.headers.get("Authorization")
        authorised = False
        waited = False
        # Bounded: a file that cannot be read (another replica's, unreadable to this
        # one) would be found again on every look.
        for _ in range(LOOKS):
            # The flight is looked at before the disk: a download lands only after
            # its file is in place, so "no file" and "no flight" seen in this order
            # cannot hide a download that finished during the look (measured: it
            # did, and the blob was fetched twice).
            flight = self.flights.get(key)
            ident = await self._on_disk(_ident, self.store.path(upstream, digest))
            if ident is None and flight is None:
                flight = self.flights.get(key)  # one that started during the look
            if ident is None and flight is None:
                # A miss: this flow fetches for everyone asking meanwhile.
                # (Counted and noted once the upstream answers 200: a refusal is none.)
                self.pending[flow.id] = _Pending(key, kind, self.flights.start(key))
                return
            if not credential:
                # Anonymous: the cache gives nothing; the upstream decides.
                return self._bypass(flow, "anonymous")
            if not authorised:
                authorised = await self._authorise(flow, upstream, name, digest, credential)
                if not authorised:
                    return self._bypass(flow, "not authorised")
            if ident is not None:
                if await self._serve(flow, kind, upstream, name, digest, ident, waited):
                    return
                continue  # the file failed its check and was removed
            waited = True
            self.counts["waits"] += 1
            try:
                await asyncio.wait_for(asyncio.shield(flight), WAIT_SECONDS)
            except TimeoutError:
                return self._bypass(flow, "waited too long")
        return self._bypass(flow, "the cached file could not be served")

    def _answer_plain(
        self, flow: http.HTTPFlow, upstream: str, repo: api.RepositoryPath | None
    ) -> bool:
        """A request without credentials (the ping, or a first pull request that a
        client sends before it has a token): the upstream's recent answer to the same,
        if there is one. It holds no client's data, only the challenge (with this
        proxy's realm), and spares a warm pull a round trip on a new upstream
        connection (75 ms behind the benchmark's link, twice per ctr pull)."""
        key = _plain_key(flow, upstream, repo)
        if key is None:
            return False
        flow.metadata[PLAIN_KEY] = list(key)  # the answer is remembered under it
        kept = self.plain.get(key)
        # Made with other rules (reloaded since): its challenge may name another token
        # path or service.
        if kept is None or kept[0] < time.monotonic() or kept[1] is not _rules_of(flow):
            return False
        _, _, status, fields, body = kept
        self._answer(flow, http.Response.make(status, body, fields))
        flow.metadata["registry_cache"] = "challenge"
        _comment(flow, "answered as the upstream did in the last seconds (no credentials)")
        return True

    def _keep_plain(self, flow: http.HTTPFlow) -> None:
        """Remember the core's answer (its challenge rewritten already) to a request
        without credentials, if it is a 401 (never content; a ping's 200 is streamed
        and its body not at hand)."""
        key, resp = tuple(flow.metadata[PLAIN_KEY]), flow.response
        if (
            resp is None
            or flow.metadata.get("registry_answered")
            or resp.status_code != 401
            or resp.raw_content is None
            or len(resp.raw_content) > PLAIN_BODY_LIMIT
        ):
            return
        fields = tuple((k, v) for k, v in resp.headers.fields if k.lower() in _PLAIN_HEADERS)
        self.plain[key] = (
            time.monotonic() + PLAIN_SECONDS,
            _rules_of(flow),
            resp.status_code,
            fields,
            resp.raw_content,
        )
        self.plain.move_to_end(key)
        while len(self.plain) > MAX_PLAIN:  # keys hold the Host a client sent: bounded
            self.plain.popitem(last=False)

    def _bypass(self, flow: http.HTTPFlow, why: str) -> None:
        logger.debug(f"registry cache: bypass ({why}) {flow.request.path}")
        self.counts["bypass"] += 1
        _comment(flow, f"cache bypass ({why})")

    async def _authorise(
        self, flow: http.HTTPFlow, upstream: str, name: str, digest: Digest, credential: str
    ) -> bool:
        """Whether the upstream lets this credential read this blob in this repository
        (HEAD, the client's own Authorization), or a recent yes to the same question.

        The remembered yes names the blob too: a right to one repository must not open
        every cached blob to a client that names them under it (the upstream answers
        404 for a blob the repository does not hold)."""
        grant = Grants.key(credential, upstream, f"{name}@{digest}")
        if self.grants.allowed(grant, time.time()):
            return True
        req = flow.request
        question = self._question(
            grant, _origin_of(flow), req.path, credential, req.headers.get("Accept")
        )
        return await asyncio.shield(question)

    def _question(
        self, grant: bytes, origin: str, path: str, credential: str, accept: str | None
    ) -> asyncio.Future:
        """The upstream's yes or no to `grant` (HEAD of `path`), asked once however many
        requests wait for it: a blob asked for ahead (see _ask_ahead) and then by the
        client is one HEAD."""
        question = self.asking.get(grant)
        if question is not None:
            return question

        async def ask() -> bool:
            reply = await self._ask_upstream(origin, path, credential, accept)
            if reply is None or reply.status not in _AUTHORISED:
                return False
            self._remember_grant(credential, grant)
            return True

        question = asyncio.ensure_future(ask())
        self.asking[grant] = question

        def settled(done: asyncio.Future) -> None:
            if self.asking.get(grant) is done:
                del self.asking[grant]
            if not done.cancelled() and done.exception() is not None:
                logger.warning(f"registry cache: asking the upstream failed: {done.exception()}")

        question.add_done_callback(settled)
        return question

    def _ask_ahead(
        self, flow: http.HTTPFlow, upstream: str, name: str, manifest: bytes, credential: str
    ) -> None:
        """Once a manifest is served, ask about the cached blobs it names at once, in
        the background: the client asks for them a moment later and finds the answer
        there (or on its way) instead of waiting for a HEAD each. Still one question
        per blob, with the client's own credential. At most MAX_AHEAD threads of the
        ask pool at a time, manifests being read included (each holds its manifest
        until then): the rest of the pool is for the questions clients wait on."""
        if len(manifest) > AHEAD_MANIFEST_LIMIT or self.ahead >= MAX_AHEAD:
            return
        if self.grants.ttl <= 0:
            return  # (no answer is remembered: one asked ahead would be thrown away)
        origin, accept = _origin_of(flow), flow.request.headers.get("Accept")
        store = self.store

        def cached_references() -> list[tuple[str, Digest]]:
            found = referenced_digests(manifest)
            return [(kind, d) for kind, d in found if store.size(upstream, d) is not None]

        async def ahead() -> None:
            try:
                references = await asyncio.get_running_loop().run_in_executor(
                    self._ask_pool(), cached_references
                )
            except Exception:  # only a speed-up: the client's own requests still ask
                logger.exception("registry cache: cannot read a manifest's references")
                return
            finally:
                self.ahead -= 1  # (read: counted from here on per question)
            for kind, digest in references:
                grant = Grants.key(credential, upstream, f"{name}@{digest}")
                if self.ahead >= MAX_AHEAD:
                    return
                if self.grants.allowed(grant, time.time()) or grant in self.asking:
                    continue
                path = f"/v2/{name}/{kind}/{digest}"
                question = self._question(
                    grant, origin, path, credential, accept if kind == "manifests" else None
                )
                # Counted once asked: a count for a question never asked would never
                # come down, and MAX_AHEAD of them would stop asking ahead for good.
                self.ahead += 1
                question.add_done_callback(self._ahead_done)

        task = asyncio.ensure_future(ahead())
        self.ahead += 1
        self.tasks.add(task)
        task.add_done_callback(self._ahead_ended)

    def _ahead_ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Only a speed-up: logged here rather than as a task nobody awaited.
            logger.warning(f"registry cache: asking ahead failed: {task.exception()!r}")

    def _ahead_done(self, _question: asyncio.Future) -> None:
        self.ahead -= 1

    async def _ask_upstream(
        self, origin: str, path: str, credential: str | None, accept: str | None
    ) -> realm.Reply | None:
        """The upstream's answer to a ``HEAD`` of `path` (a mapped request) with the
        client's own Authorization and Accept, on a kept connection; None if the
        upstream cannot be reached."""
        headers = [("Authorization", credential)] if credential else []
        if accept:
            headers.append(("Accept", accept))
        where = path.partition("?")[0]  # (a query may carry a secret: never logged)
        asked = asyncio.get_running_loop().run_in_executor(
            self._ask_pool(),
            realm.fetch,
            "HEAD",
            origin + path,
            headers,
            None,
            _tls_for_upstreams(),
            AUTH_TIMEOUT,
        )
        try:
            # AUTH_TIMEOUT holds per socket operation: an upstream trickling its answer
            # would hold the flow far longer. (The thread is left to its timeouts.)
            reply = await asyncio.wait_for(asked, 2 * AUTH_TIMEOUT)
        except TimeoutError:
            logger.info(f"registry cache: the upstream did not answer about {where} in time")
            return None
        except realm.RealmUnreachable as e:
            logger.info(f"registry cache: cannot ask the upstream about {where}: {_unqueried(e)}")
            return None
        except ValueError as e:
            # A client's header http.client cannot send (outside latin-1): no question.
            # Only the type is logged: http.client's message quotes the header.
            logger.info(
                f"registry cache: cannot ask the upstream about {where}: {type(e).__name__}"
            )
            return None
        logger.debug(f"registry cache: upstream answered {reply.status} for HEAD {where}")
        return reply

    def _ask_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.ask_pool is None:
            self.ask_pool = concurrent.futures.ThreadPoolExecutor(
                ASK_WORKERS, thread_name_prefix="registry-cache-ask"
            )
        return self.ask_pool

    def _on_disk(self, fn, *args):
        """Run disk work (a stat, a read, a touch, an eviction scan) in the
        cache's own threads: asyncio's default executor also resolves upstream host
        names. (Whole blobs are hashed in others: _hashed.)"""
        if self.file_pool is None:
            self.file_pool = concurrent.futures.ThreadPoolExecutor(
                FILE_WORKERS, thread_name_prefix="registry-cache-disk"
            )
        return asyncio.get_running_loop().run_in_executor(self.file_pool, fn, *args)

    def _touch(self, store: Store, path: str) -> None:
        """Mark a file as just served (eviction's clock), not awaited: the answer does
        not depend on it. (Queued behind the hit's own look at the disk, so touches
        cannot pile up faster than hits are answered; and ahead of any eviction the
        hit's download or a later one starts.)"""
        try:
            self._on_disk(store.touch, path)
        except RuntimeError:  # the pool is shutting down: the order is lost, nothing else
            pass

    def _hashed(self, store: Store, upstream: str, digest: Digest):
        """Whether a file not checked by this process holds its digest: a whole blob's
        hash, in threads apart from _on_disk's (four multi-GB hashes after a restart
        held all of those, and every other pull's stat of the cache waited)."""
        if self.hash_pool is None:
            self.hash_pool = concurrent.futures.ThreadPoolExecutor(
                HASH_WORKERS, thread_name_prefix="registry-cache-hash"
            )
        return asyncio.get_running_loop().run_in_executor(
            self.hash_pool, store.verify, upstream, digest
        )

    def _remember_grant(self, credential: str, grant: bytes) -> None:
        """A yes, remembered no longer than the credential's token lives."""
        info = bearer_info(credential)
        expires = (info or {}).get("claims", {}).get("exp")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            expires = None
        self.grants.remember(grant, time.time(), expires)

    async def _serve(self, flow: http.HTTPFlow, *args, **kwargs) -> bool:
        """Answer from the cache (see _serve_file); the memory an answer read from disk
        holds is given back at once unless the flow was answered with it."""
        try:
            served = await self._serve_file(flow, *args, **kwargs)
        except BaseException:
            self._release(flow)
            raise
        if not (served and flow.response is not None and flow.response.status_code == 200):
            self._release(flow)  # redirected, relayed, bypassed or a bad file
        return served

    async def _serve_file(
        self,
        flow: http.HTTPFlow,
        kind: str,
        upstream: str,
        name: str,
        digest: Digest,
        ident: tuple[str, int, int],
        waited: bool,
        content_type: str | None = None,
    ) -> bool:
        """Answer from the cache with the file `ident` names (as _ident found it a
        moment ago: one look at the disk per hit, since a thread hop costs up to the
        GIL's switch interval while mitmproxy's loop is busy; measured 5 ms each for
        parallel blob requests); False when the file turned out bad (now removed).
        A manifest is labelled `content_type` (the upstream's, from its HEAD) or by
        what it says it is."""
        path, size, _ = ident
        if kind == "manifests" and size > MANIFEST_LIMIT:
            # (A big blob asked for as a manifest: never read into memory; returning
            # False would ask again, for ever, since the file is fine.)
            self._bypass(flow, "larger than a manifest may be")
            return True
        store = self.store
        if path != store.path(upstream, digest):
            # registry_cache_dir was reloaded since the look: the redirect would name
            # the new directory's file, which the old one's check says nothing about.
            return False
        if ident not in self.verified:
            # Written by another replica or before a restart: check it once.
            if not await self._hashed(store, upstream, digest):
                return False
            self.verified.add(ident)
        inline = kind == "manifests" or (
            size <= INLINE_BLOB and "Range" not in flow.request.headers
        )
        if inline and not self._hold(flow, size):
            # Answers read from disk wait to be sent in memory: past their budget a
            # manifest goes upstream (a blob still gets the redirect below).
            if kind == "manifests":
                self._bypass(flow, "answers from disk over their memory budget")
                return True
            inline = False
        if kind == "manifests":
            read = await self._on_disk(_read_manifest, ident)
            if read is None:
                return False
            content, labelled = read
            if credential := flow.request.headers.get("Authorization"):
                self._ask_ahead(flow, upstream, name, content, credential)
            response = http.Response.make(
                200,
                content,
                {
                    **_JSON,
                    "Content-Type": content_type or labelled,
                    "Docker-Content-Digest": str(digest),
                },
            )
        elif inline:
            # A small blob (an image config, a small layer): from the file, over the
            # client's own connection; a redirect would cost a round trip and a new
            # (TLS) connection more than the blob itself.
            content = await self._on_disk(_read_small, ident)
            if content is None:
                return False
            response = http.Response.make(
                200,
                content,
                {
                    **_JSON,
                    "Content-Type": "application/octet-stream",
                    "Docker-Content-Digest": str(digest),
                },
            )
            self.counts["bytes_served"] += size
        else:
            relpath = store.relpath(upstream, digest)
            expires = int(time.time()) + URL_SECONDS
            with self.pins_lock:
                self.pins[path] = expires + 1
            target = f"/blobs/{quote(relpath)}?e={expires}&s={self.signer.sign(relpath, expires)}"
            mode = ctx.options.registry_cache_serve
            if mode == "public" and not _through_balancer(flow):
                # A client that reached this replica directly (no registry_public_url,
                # no balancer's forwarded headers): /blobs/ on this address is the proxy
                # itself, which does not serve it; the blob server's own port does.
                mode = "auto"
            public = _public_origin(flow)
            host = f"[{public.host}]" if ":" in public.host else public.host
            scheme = "http"
            if mode == "auto" and (public.scheme == "https" or flow.client_conn.tls_established):
                # A client that asked for TLS gets the blob over TLS, or relayed. (Behind
                # a TLS-terminating balancer the blob server has no certificate it trusts.)
                tls = flow.client_conn.tls_established and self._serve_tls(host)
                scheme = "https" if tls else ""
            if mode == "through" or not scheme:
                # Relayed by mitmproxy over the client's own connection: slower than
                # sendfile, but the blob never leaves in clear text.
                _redact(flow)
                req = flow.request
                req.headers.pop("Authorization", None)  # not needed by our own server
                req.scheme, req.host, req.port = "http", self.server.local_host, self.server.port
                req.path = target
                flow.metadata["registry_cache"] = "wait" if waited else "hit"
                self.counts["hits"] += 1
                _comment(flow, "cache hit" + (" (after single-flight wait)" if waited else ""))
                self._touch(store, path)
                return True
            if mode == "public":
                # The address clients reach the proxy at: the balancer in front ends
                # TLS and routes /blobs/ to the replicas' blob servers (which share the
                # cache directory and its signing key, so any of them serves the URL).
                location = f"{public}{target}"
            else:
                location = f"{scheme}://{host}:{self.server.port}{target}"
            response = http.Response.make(
                307,
                b"",
                {**_JSON, "Location": location, "Docker-Content-Digest": str(digest)},
            )
        self._touch(store, path)
        self._answer(flow, response)
        flow.metadata["registry_cache"] = "wait" if waited else "hit"
        self.counts["hits"] += 1
        _comment(flow, "cache hit" + (" (after single-flight wait)" if waited else ""))
        return True

    def relay_signed(self, flow: http.HTTPFlow) -> bool:
        """A URL this cache signed (serve=public) that reached the proxy itself: the
        balancer in front does not route /blobs/ to the blob servers (deploy/haproxy.cfg
        without RR_BLOBS1, an ingress without that path). Refused there, the hit failed
        the pull; under `unmatched: pass` it went upstream with the client's credentials.
        Relayed from the local blob server instead (as serve=through): True when taken.
        Called by the core before it decides; anything not signed is left to it."""
        req = flow.request
        server, signer = self.server, self.signer
        if server is None or signer is None or req.method not in ("GET", "HEAD"):
            return False
        if "Transfer-Encoding" in req.headers or req.headers.get("Content-Length", "0") != "0":
            return False  # (no request body to hold or pass on: the core's to refuse)
        path, query = api.split_target(req.path)
        expires = api.query_value(query, "e") or ""
        signature = api.query_value(query, "s") or ""
        if not signer.check(path[len("/blobs/") :], expires, signature, time.time()):
            return False
        meta = flow.metadata
        meta["registry_endpoint"] = "blobs"
        meta["registry_decision"] = "answered"
        meta["registry_answered"] = True  # (the core's response hooks leave it alone)
        meta["registry_cache"] = "relayed"
        _redact(flow)
        req.headers.pop("Authorization", None)  # not needed by our own server
        req.scheme, req.host, req.port = "http", server.local_host, server.port
        _comment(flow, "cache hit's signed URL reached the proxy: relayed")
        return True

    def _hold(self, flow: http.HTTPFlow, size: int) -> bool:
        """Count an answer read from disk until its flow's response hook (or error):
        False, counting nothing, when INLINE_BUDGET would be passed."""
        if self.inline_held + size > INLINE_BUDGET:
            return False
        self.inline_held += size
        self.inline[flow.id] = self.inline.get(flow.id, 0) + size
        return True

    def _release(self, flow: http.HTTPFlow) -> None:
        self.inline_held -= self.inline.pop(flow.id, 0)

    @staticmethod
    def _answer(flow: http.HTTPFlow, response: http.Response) -> None:
        """Answer the request ourselves; the core leaves the answer alone."""
        patches.hold_request_body(flow)
        _redact(flow)
        # Last: should anything above fail, the request goes upstream (the cache never
        # fails a pull); once answered, no credential is left in the flow.
        flow.response = response
        flow.metadata["registry_answered"] = True

    def _serve_tls(self, host: str) -> bool:
        """Let the blob server speak TLS for `host` with the certificate mitmproxy
        presents for it (its --certs, or one from its CA); False if that fails."""
        server = self.server
        name = host.strip("[]")
        if server.has_tls(name):
            return True
        tlsconfig = ctx.master.addons.get("tlsconfig")
        certstore = getattr(tlsconfig, "certstore", None)
        if certstore is None:
            return False
        try:
            try:
                san = x509.IPAddress(ipaddress.ip_address(name))
            except ValueError:
                san = x509.DNSName(name)
            entry = certstore.get_cert(name, [san])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            # load_cert_chain reads files only: a private directory, removed at once.
            with tempfile.TemporaryDirectory(prefix="regcache-tls-") as tmp:
                cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
                with open(cert, "wb") as f:
                    f.write(entry.cert.to_pem())
                    for extra in entry.chain_certs:
                        f.write(extra.to_pem())
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(
                        entry.privatekey.private_bytes(
                            serialization.Encoding.PEM,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        )
                    )
                context.load_cert_chain(cert, key)
        except (OSError, ValueError, ssl.SSLError) as e:
            self._log_once("tls", f"registry cache: no TLS for the blob server ({e})")
            return False
        server.add_tls(name, context)
        return True

    # --- responses (misses) -------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("registry_cache") == "relayed" and flow.response is not None:
            flow.response.stream = True  # (a blob: never held in memory)
            return
        pending = self.pending.get(flow.id)
        if pending is None or pending.flight is None:
            return
        try:
            self._start_writing(flow, pending)
        except Exception:
            # Caching is given up; the response passes as the core set it up.
            logger.exception("registry cache: cannot cache this response")
            if pending.writer is not None:
                pending.writer.abort()
            else:
                self._land(flow.id, "failed")

    def _start_writing(self, flow: http.HTTPFlow, pending: _Pending) -> None:
        resp = flow.response
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        limit = MANIFEST_LIMIT if pending.kind == "manifests" else self.cap
        if resp.status_code != 200 or (length is not None and length > limit):
            self._land(flow.id, "not cacheable")
            return
        flow.metadata["registry_cache"] = "miss"
        self.counts["misses"] += 1
        _comment(flow, "cache miss")
        if not resp.stream:
            return  # buffered (a manifest shown in mitmweb): stored in response()
        upstream, digest = pending.key
        loop = self.loop or asyncio.get_running_loop()

        def done(outcome: str) -> None:
            loop.call_soon_threadsafe(self._written, flow.id, pending, outcome)

        writer = WriteBehind(
            self.store, upstream, digest, max_queued=MAX_QUEUED, backlog=self.backlog, done=done
        )
        pending.writer = writer

        def stream(chunk: bytes) -> bytes:
            if chunk:
                writer.feed(chunk)
            else:
                writer.close(length)
            return chunk

        resp.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        self._release(flow)
        if self.store is not None and PLAIN_KEY in flow.metadata:
            try:
                self._keep_plain(flow)
            except Exception:
                logger.exception("registry cache: cannot keep the answer")
        pending = self.pending.get(flow.id)
        if pending is None or pending.flight is None:
            self.pending.pop(flow.id, None)
            return
        resp = flow.response
        if pending.writer is None and resp is not None and not resp.stream:
            if resp.status_code == 200 and resp.raw_content is not None:
                # A buffered body (mitmweb shows manifests): store it from a thread.
                upstream, digest = pending.key
                writer = WriteBehind(
                    self.store,
                    upstream,
                    digest,
                    max_queued=MAX_QUEUED,
                    backlog=self.backlog,
                    done=lambda outcome: self.loop.call_soon_threadsafe(
                        self._written, flow.id, pending, outcome
                    ),
                )
                writer.feed(resp.raw_content)
                writer.close(len(resp.raw_content))
                pending.writer = writer
                return
            self._land(flow.id, "not cacheable")

    def error(self, flow: http.HTTPFlow) -> None:
        self._release(flow)
        pending = self.pending.get(flow.id)
        if pending is None:
            return
        logger.debug(f"registry cache: flow failed ({flow.error}); not cached")
        if pending.writer is not None:
            pending.writer.abort()  # its callback lands the flight
        else:
            self._land(flow.id, "failed")

    def _land(self, flow_id: str, outcome: str) -> None:
        pending = self.pending.pop(flow_id, None)
        if pending is not None and pending.flight is not None:
            self.flights.finish(pending.key, pending.flight, outcome == "stored")

    def _written(self, flow_id: str, pending: _Pending, outcome: str) -> None:
        upstream, digest = pending.key
        logger.debug(f"registry cache: {digest} {outcome}")
        writer = pending.writer
        if writer is not None:
            self.counts["bytes_fetched"] += writer.received
        if outcome == "stored":
            self.counts["stored"] += 1
            path = self.store.path(upstream, digest) if self.store else None
            # The new file is known good; then eviction scans the directory. Both in a
            # thread, then waiters are let in.
            task = asyncio.ensure_future(self._on_disk(self._stored, path))
            task.add_done_callback(lambda _: self._land(flow_id, outcome))
            return
        if outcome == "corrupt" and pending.by_tag:
            # Most likely the tag moved between our HEAD and the client's GET (the
            # client got what the tag names now): no sign of a corrupt upstream.
            logger.debug(f"registry cache: the tag no longer named {digest}; not cached")
        elif outcome == "corrupt":
            self.counts["rejected"] += 1
            logger.warning(f"registry cache: {digest} from upstream did not match; not cached")
        elif outcome.startswith("error:"):
            self._log_once(outcome, f"registry cache: cannot write ({outcome[6:]}); not caching")
        self._land(flow_id, outcome)

    def _stored(self, path: str | None) -> None:
        ident = _ident(path) if path is not None else None
        if ident is not None:
            self.verified.add(ident)
        self._evict()
        if len(self.verified) > MAX_VERIFIED:
            self._forget_gone()

    def _forget_gone(self) -> None:
        """Bound the files remembered as checked: those no longer in the directory
        (evicted here or by another replica) are forgotten; if that is not enough, all
        are, and each is hashed again when next served (slower, never wrong)."""
        store = self.store
        present = {path for path, _, _ in store.entries()} if store is not None else set()
        kept = {ident for ident in list(self.verified) if ident[0] in present}
        self.verified = kept if len(kept) <= MAX_VERIFIED else set()

    def _evict(self) -> None:
        store, server = self.store, self.server
        if store is None:
            return
        now = time.time()
        with self.pins_lock:
            for path, until in list(self.pins.items()):
                if until < now:
                    del self.pins[path]
            pins = set(self.pins)

        def pinned(path: str) -> bool:
            return path in pins or (server is not None and server.busy(path))

        removed, _ = store.evict(self.cap, pinned)
        self.counts["evictions"] += removed

    def _served(self, nbytes: int) -> None:
        self.counts["bytes_served"] += nbytes  # (from a server thread; a counter only)

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self.logged_errors:
            self.logged_errors.add(kind)
            logger.warning(message)


class _Collector:
    """registry_rewrite_cache_*_total, read from the addon's counters when scraped."""

    METRICS = {
        "hits": "Requests answered from the cache (after the upstream confirmed access).",
        "misses": "Requests that fetched a blob upstream for the cache.",
        "bytes_served": "Bytes the local blob server sent.",
        "bytes_fetched": "Bytes of missed blobs that passed through to the cache writer.",
        "evictions": "Blobs removed to stay under registry_cache_max_bytes.",
    }

    def __init__(self, owner: BlobCache) -> None:
        self.owner = owner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        for name, text in self.METRICS.items():
            yield CounterMetricFamily(
                f"registry_rewrite_cache_{name}", text, value=self.owner.counts[name]
            )


def _mapped(flow: http.HTTPFlow) -> bool:
    """Whether the core sent this request upstream under a mapped name."""
    decision = flow.metadata.get("registry_decision")
    if decision is not None:
        return decision == "mapped"
    # Before the core sets registry_decision: it routed the flow and did not answer it.
    return "registry_route" in flow.metadata and not flow.metadata.get("registry_answered")


def parse_tag_answer(reply: realm.Reply | None) -> tuple[Digest, int, dict] | None:
    """(digest, length, the fields of _TAG_HEADERS, lower-cased) of a 200 to a HEAD by
    tag, when it names exactly one verifiable digest and one length; else None (the
    upstream answers the request itself). Repeated fields that disagree are no
    answer: which one a client would believe is anyone's guess."""
    if reply is None or reply.status != 200:
        return None
    headers: dict[str, str] = {}
    for k, v in reply.headers:
        k = k.lower()
        if k in _TAG_HEADERS and headers.setdefault(k, v) != v:
            return None
    digest = parse_digest(headers.get("docker-content-digest", ""))
    length = headers.get("content-length", "")
    # (isascii: "²" is a digit to isdigit, not to int)
    if digest is None or not (length.isascii() and length.isdigit()):
        return None
    return digest, int(length), headers


def _unqueried(e: Exception) -> str:
    """An exception's message without the queries of the URLs it quotes (http.client's
    InvalidURL quotes the whole target)."""
    return re.sub(r"\?[^'\"\s]*", "?…", str(e))


def _ident(path: str) -> tuple[str, int, int] | None:
    """(path, size, inode) of a cached file, or None when there is none (blocking)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, st.st_size, st.st_ino


def _plain_key(flow: http.HTTPFlow, upstream: str, repo: api.RepositoryPath | None):
    """What the answer to a request without credentials depends on: the upstream, this
    proxy's public address (the realm), and the ping or the method, kind and repository
    (both names: aliases share an upstream name) of a pull request; None otherwise."""
    method = flow.request.method
    public = str(_public_origin(flow))
    if flow.metadata.get("registry_endpoint") == "ping":
        return (upstream, public, method, "ping")
    if repo is None or repo.kind not in ("manifests", "blobs", "tags/list"):
        return None
    client_name = flow.metadata.get("registry_client_name")
    mirror = flow.metadata.get("registry_mirror")  # (its realm names the namespace)
    return (upstream, public, method, repo.kind, repo.name, str(client_name), str(mirror), "pull")


def _origin_of(flow: http.HTTPFlow) -> str:
    """scheme://host[:port] the (mapped) request goes to."""
    req = flow.request
    return f"{req.scheme}://{api.Origin(req.scheme, req.host, req.port).netloc}"


def _read_manifest(ident: tuple[str, int, int]) -> tuple[bytes, str] | None:
    """A cached manifest and its media type (in a thread: up to 4 MiB of JSON); None
    if the file is not the one `ident` names any more (see _read_small)."""
    content = _read_small(ident)
    return None if content is None else (content, _manifest_type(content))


def _read_small(ident: tuple[str, int, int]) -> bytes | None:
    """The cached file `ident` names, whole; None if the file at its path is not that
    one any more: the look that found (and checked) it came before the upstream's yes,
    seconds ago, and a file put in its place meanwhile is checked by no one."""
    path, size, inode = ident
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_ino != inode:
                return None
            content = f.read(size + 1)
    except OSError:
        return None
    return content if len(content) == size else None


def _manifest_type(content: bytes) -> str:
    """A manifest's media type, from the manifest itself (as the registry stored it)."""
    try:
        doc = json.loads(content)
    except ValueError:
        return "application/octet-stream"
    if isinstance(doc, dict):
        if isinstance(doc.get("mediaType"), str):
            return doc["mediaType"]
        if doc.get("schemaVersion") == 1:
            return "application/vnd.docker.distribution.manifest.v1+prettyjws"
        if "manifests" in doc:
            return "application/vnd.oci.image.index.v1+json"
    return "application/vnd.oci.image.manifest.v1+json"


def _tls_for_upstreams():
    """The core's TLS context for upstreams (mitmproxy's ssl_* options, built once)."""
    found = core()
    return found.tls if found is not None else realm.tls_context(False, None, None)


def _public_origin(flow: http.HTTPFlow) -> api.Origin:
    """Where clients reach this proxy, as the core derives it for the token realm."""
    found = core()
    return found.public_origin(flow) if found is not None else client_origin(flow)


def _through_balancer(flow: http.HTTPFlow) -> bool:
    """Whether clients reach the proxy at an address other than the one this flow
    connected to: registry_public_url, or a trusted balancer's forwarded headers."""
    found = core()
    return found is not None and found.advertised_origin(flow) is not None


def _rules_of(flow: http.HTTPFlow) -> object | None:
    """The rules the core maps this flow with (None without the core)."""
    found = core()
    return found.flow_rules.get(flow, found.rules) if found is not None else None


def _comment(flow: http.HTTPFlow, note: str) -> None:
    flow.comment = f"{flow.comment} · {note}" if flow.comment else note


def _redact(flow: http.HTTPFlow) -> None:
    """Our own answer skips the core's response hooks: keep the credential out of it."""
    auth = flow.request.headers.get("Authorization")
    if auth:
        flow.request.headers["Authorization"] = auth.split(" ", 1)[0] + " <redacted>"
