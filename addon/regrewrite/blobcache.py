"""A content-addressed blob store on disk, safe to share between proxy replicas.

Layout: ``ROOT/<upstream>/<algorithm>/<hex>``, where ``<upstream>`` names the upstream
origin (``https_registry.example_443``), so entries of different upstreams never mix.
Temporary files live in ``ROOT/<upstream>/tmp/`` and enter the store only by an atomic
rename after their digest and length checked out.  There are no lock files: a replica
that crashes leaves at most a temporary file, which eviction removes once it is old.
A file's mtime is the time it was last served (the LRU clock), so replicas sharing the
directory share it too.

Nothing here imports mitmproxy (addon/regrewrite/addons/cache.py wires it in).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ALGORITHMS = {"sha256": 64, "sha512": 128}  # hex length of each supported digest
STALE_TEMP_SECONDS = 3600.0  # a temp file untouched this long belongs to a dead writer
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """``50G`` / ``512MiB`` / ``1.5t`` / ``1000`` -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (e.g. 50G, 512M, 1000000)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r}: the size must be positive")
    return size


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self):
        return hashlib.new(self.algorithm)


def parse_digest(reference: str) -> Digest | None:
    """A digest this cache can verify (sha256/sha512, lower-case hex), else None.

    Tags and other algorithms are never cached: only a digest names fixed content."""
    algorithm, sep, value = reference.partition(":")
    length = ALGORITHMS.get(algorithm)
    if not sep or length is None or len(value) != length:
        return None
    if not all(c in "0123456789abcdef" for c in value):
        return None
    return Digest(algorithm, value)


MAX_REFERENCES = 16  # descriptors of one manifest whose access is asked ahead


def referenced_digests(manifest: bytes) -> tuple[tuple[str, Digest], ...]:
    """("blobs" or "manifests", digest) of what an image manifest (config, layers) or
    an index (manifests) points to, at most MAX_REFERENCES; none for anything else.

    Descriptors with ``urls`` (foreign layers) are left out: a registry need not hold
    those, so a manifest naming one says nothing about what the repository holds."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return ()
    if not isinstance(doc, dict):
        return ()
    descriptors = [("blobs", doc.get("config"))]
    for field, kind in (("layers", "blobs"), ("manifests", "manifests")):
        if isinstance(doc.get(field), list):
            descriptors.extend((kind, d) for d in doc[field])
    found: dict[Digest, str] = {}
    for kind, d in descriptors:
        if not isinstance(d, dict) or "urls" in d or not isinstance(d.get("digest"), str):
            continue
        digest = parse_digest(d["digest"])
        if digest is not None:
            found.setdefault(digest, kind)
            if len(found) == MAX_REFERENCES:
                break
    return tuple((kind, digest) for digest, kind in found.items())


def upstream_dirname(scheme: str, host: str, port: int) -> str:
    """A directory name for one upstream origin (stable across replicas and restarts).

    Readable when the host is (``https_registry.example_443``); a host whose characters
    had to be replaced (``a_b`` and ``a-b``, IPv6 addresses) also gets a hash of itself,
    so that two upstreams never share blobs, grants or questions. (After a "_", which no
    replaced host keeps: after a "-", the host ``a-b-<that hash>`` named a_b's directory.)"""
    lowered = host.lower()
    safe = re.sub(r"[^a-z0-9.-]", "-", lowered)
    if safe != lowered:
        safe += "_" + hashlib.sha256(lowered.encode()).hexdigest()[:12]
    return f"{scheme}_{safe}_{port}"


class Store:
    """The blob files under one root directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def relpath(self, upstream: str, digest: Digest) -> str:
        return f"{upstream}/{digest.algorithm}/{digest.hex}"

    def path(self, upstream: str, digest: Digest) -> str:
        return os.path.join(self.root, upstream, digest.algorithm, digest.hex)

    def resolve(self, relpath: str) -> str | None:
        """The file of a relpath made by `relpath` (None for anything else)."""
        parts = relpath.split("/")
        if len(parts) != 3 or parts[0] in ("", ".", "..") or "\\" in relpath:
            return None
        if parse_digest(f"{parts[1]}:{parts[2]}") is None:
            return None
        return os.path.join(self.root, *parts)

    def size(self, upstream: str, digest: Digest) -> int | None:
        """Size of a cached blob, or None (blocking: a stat)."""
        try:
            return os.stat(self.path(upstream, digest)).st_size
        except OSError:
            return None

    def touch(self, path: str) -> None:
        """Mark as just served (the LRU clock); a read-only directory only loses order.
        The time is given to the nanosecond: the kernel's own (``utime(path)``) moves in
        ticks of a few ms, and two hits within one tick tied in eviction order."""
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
        except OSError:
            pass

    def verify(self, upstream: str, digest: Digest, size: int | None = None) -> bool:
        """Hash a cached file (blocking); a file that does not match is removed."""
        path = self.path(upstream, digest)
        h = digest.hasher()
        total = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    total += len(chunk)
        except OSError:
            return False
        if h.hexdigest() == digest.hex and (size is None or size == total):
            return True
        logger.warning(f"registry cache: {digest} on disk does not match its digest; removed")
        try:
            os.unlink(path)
        except OSError:
            pass
        return False

    def entries(self) -> Iterable[tuple[str, int, float]]:
        """(path, size, mtime) of every stored blob; stale temp files are removed."""
        now = time.time()
        try:
            upstreams = list(os.scandir(self.root))
        except OSError:
            return
        for up in upstreams:
            if not up.is_dir(follow_symlinks=False):
                continue
            for sub in _listing(up.path):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                temp = sub.name == "tmp"
                if not temp and sub.name not in ALGORITHMS:
                    continue
                for e in _listing(sub.path):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile (another replica)
                    if temp:
                        if now - st.st_mtime > STALE_TEMP_SECONDS:
                            _unlink(e.path)
                        continue
                    yield e.path, st.st_size, st.st_mtime

    def evict(self, cap: int, pinned: Callable[[str], bool]) -> tuple[int, int]:
        """Remove the least recently served blobs until the store holds at most `cap`
        bytes; `pinned(path)` blobs (being served) stay. Returns (removed, bytes left)."""
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        removed = 0
        for path, size, _ in entries:
            if total <= cap:
                break
            if pinned(path):
                continue
            if _unlink(path):
                removed += 1
            total -= size  # gone, by us or by another replica
        return removed, total


def _listing(path: str) -> Iterator[os.DirEntry]:
    """A directory's entries, one at a time; none if it went away meanwhile (another
    replica, a volume cleaned up by hand): one scan must not stop at it."""
    try:
        it = os.scandir(path)
    except OSError:
        return
    with it:
        yield from it


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        logger.debug(f"registry cache: cannot remove {path}: {e}")
        return False


class Backlog:
    """Bytes waiting for the disk over all writers: the per-blob bound alone let every
    concurrent miss hold its own 32 MiB while a slow (network) disk fell behind."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.queued + nbytes > self.limit:
                return False
            self.queued += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.queued -= nbytes


class WriteBehind:
    """Writes one blob to a temp file from a thread, hashing as it goes.

    `feed()` never blocks the caller: when more than `max_queued` bytes wait for the
    disk (or the shared `backlog` is full), the write is given up (the client is never
    slowed down for the cache) and the bytes are dropped.  `close(length)` ends the
    stream; the worker renames the file
    into place only if the digest matches and `length` (when known) was reached.
    `done` is called in the worker thread with the outcome: "stored", "corrupt",
    "aborted", "overflow" or "error:<errno>".
    """

    def __init__(
        self,
        store: Store,
        upstream: str,
        digest: Digest,
        *,
        max_queued: int,
        done: Callable[[str], None],
        backlog: Backlog | None = None,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.digest = digest
        self.max_queued = max_queued
        self.done = done
        self.backlog = backlog
        self.queued = 0
        self.received = 0
        self.failed = False
        self._finished = False  # the worker stopped taking data (under _lock)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="blobcache-write")
        self._thread.start()

    def feed(self, chunk: bytes) -> None:
        if self.failed or not chunk:
            return
        self.received += len(chunk)
        with self._lock:
            if self._finished:
                return
            over = self.queued + len(chunk) > self.max_queued
            if over or (self.backlog is not None and not self.backlog.take(len(chunk))):
                self.failed = True
                self._queue.put(("overflow", None))
                return
            self.queued += len(chunk)
        self._queue.put(("data", chunk))

    def close(self, expected_length: int | None) -> None:
        if not self.failed:
            self._queue.put(("end", expected_length))

    def abort(self) -> None:
        if not self.failed:
            self.failed = True
            self._queue.put(("abort", None))

    def _run(self) -> None:
        outcome = "aborted"
        temp = None
        try:
            directory = os.path.join(self.store.root, self.upstream)
            tmpdir = os.path.join(directory, "tmp")
            os.makedirs(tmpdir, exist_ok=True)
            final = self.store.path(self.upstream, self.digest)
            name = f"{self.digest.hex[:16]}.{os.getpid()}.{os.urandom(6).hex()}"
            temp = os.path.join(tmpdir, name)
            h = self.digest.hasher()
            written = 0
            with open(temp, "wb") as f:
                while True:
                    kind, value = self._queue.get()
                    if kind == "data":
                        with self._lock:
                            self.queued -= len(value)
                        if self.backlog is not None:
                            self.backlog.give(len(value))
                        h.update(value)
                        f.write(value)
                        written += len(value)
                        continue
                    if kind != "end":
                        outcome = kind
                        break
                    if h.hexdigest() != self.digest.hex or (value is not None and value != written):
                        outcome = "corrupt"
                        break
                    f.flush()
                    os.fsync(f.fileno())  # a renamed file is a complete one, even after a crash
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.rename(temp, final)  # atomic; a replica's identical copy may be replaced
                    temp = None
                    outcome = "stored"
                    break
        except OSError as e:
            outcome = f"error:{e.errno}:{e.strerror}"
            self.failed = True
        finally:
            if temp is not None:
                _unlink(temp)
            # What is still queued is dropped with this writer: its share goes back.
            with self._lock:
                self._finished = True
                left, self.queued = self.queued, 0
            if self.backlog is not None and left:
                self.backlog.give(left)
        try:
            self.done(outcome)
        except Exception:  # the callback must never kill the writer silently
            logger.exception("registry cache: write callback failed")


class Signer:
    """Short-lived signed URLs for the local blob server (HMAC-SHA256)."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def sign(self, relpath: str, expires: int) -> str:
        msg = f"{relpath}\n{expires}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def check(self, relpath: str, expires: str, signature: str, now: float) -> bool:
        if not expires.isdigit() or int(expires) < now:
            return False
        return hmac.compare_digest(self.sign(relpath, int(expires)), signature)


def shared_secret(root: str) -> bytes:
    """The signing key of every replica that shares `root` (so a redirect made by one
    replica is honoured by another behind the same address). Created once, without a
    lock: the first link() wins and the others read its file."""
    path = os.path.join(root, ".signing-key")
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 32:
            return key
    except OSError:
        pass
    key = os.urandom(32)
    temp = f"{path}.{os.getpid()}.{os.urandom(6).hex()}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        finally:
            _unlink(temp)
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return key  # a read-only directory: this replica signs with its own key


class Grants:
    """Positive authorisation answers, remembered briefly and never past `expires`.

    Keyed by a hash of the credential, the upstream and the repository: the credential
    itself is never kept."""

    def __init__(self, ttl: float, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._until: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def key(credential: str, upstream: str, repository: str) -> bytes:
        # (surrogateescape: mitmproxy hands a header's bytes that are not UTF-8 so)
        text = f"{credential}\0{upstream}\0{repository}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()

    def allowed(self, key: bytes, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def remember(self, key: bytes, now: float, expires: float | None) -> None:
        until = now + self.ttl
        if expires is not None:
            until = min(until, expires)
        if until <= now:
            return
        self._until[key] = until
        self._until.move_to_end(key)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def clear(self) -> None:
        self._until.clear()


class Flights:
    """Downloads in progress, by (upstream, digest): the first miss fetches, later
    requests for the same blob wait for it instead of going upstream too."""

    def __init__(self) -> None:
        self._flights: dict[tuple[str, Digest], asyncio.Future] = {}

    def get(self, key: tuple[str, Digest]) -> asyncio.Future | None:
        return self._flights.get(key)

    def start(self, key: tuple[str, Digest]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._flights[key] = fut
        return fut

    def finish(self, key: tuple[str, Digest], fut: asyncio.Future, stored: bool) -> None:
        if self._flights.get(key) is fut:
            del self._flights[key]
        if not fut.done():
            fut.set_result(stored)

    def __len__(self) -> int:
        return len(self._flights)
