"""Real docker and containerd clients, each backed by a private daemon, for the e2e tests.

`Dockerd` runs its own dockerd (which spawns its own containerd) and `Containerd` runs a bare
containerd driven by `ctr`. Every file of either daemon lives in one short-named temp dir, so
tests run side by side with each other and with any system daemon, and leave nothing behind.

Facts about these clients that the tests rely on (found on Debian 12, docker.io 20.10.24,
containerd 1.6.20; test_clients_direct.py pins them down):

* dockerd treats every registry on 127.0.0.0/8 (and any name resolving there, e.g. localhost)
  as an "insecure registry": it tries https first WITHOUT certificate verification, and falls
  back to plain http. So there is no CA to install for loopback registries: dockerd 20.10
  never reads /etc/docker/certs.d for them (that path is hard-coded and only read for "secure"
  registries), and a wrong or self-signed certificate is accepted silently.
  Consequence: docker reaches a mitmdump started "without TLS" over https all the same
  (mitmproxy's reverse mode accepts a TLS ClientHello on its port; docker does not verify).
* `docker login` makes the daemon fetch a token with GET + Basic auth and
  `offline_token=true&client_id=docker`, no scope. If the token server answers with a
  `refresh_token`, the CLI stores it as `identitytoken` in config.json (password dropped), and
  later pulls/pushes POST `grant_type=refresh_token&client_id=docker` to the realm, never GET;
  a realm that then answers the POST with 404 breaks every pull and push (no fallback). Without
  a refresh token the CLI stores user:password and pulls/pushes GET with Basic auth (no
  client_id). Anonymous: GET without auth. Push scope: `repository:R:push,pull`, plus
  `repository:SRC:pull` when it tries a cross-repository mount from SRC.
* `ctr --user u:p` POSTs `grant_type=password` (client_id=containerd-client) first and falls
  back to GET + Basic auth when the token server answers 400, 401, 404 or 405. Push scopes:
  `repository:R:pull` and `repository:R:pull,push` (plus `repository:SRC:pull` to mount).
  The CA from hosts.toml also applies to the token realm fetched for that host.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Tools each client needs on PATH. dockerd spawns `containerd` itself.
DOCKER_TOOLS = ("dockerd", "docker", "containerd")
CONTAINERD_TOOLS = ("containerd", "ctr")

# Unix socket paths must fit in sun_path (108 bytes); pytest's tmp_path can be longer than that,
# so daemons get their own short dir under /tmp by default.
_MAX_SOCKET_PATH = 100
_TAIL = 4000  # characters of output/log quoted in errors
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def docker_cli() -> str | None:
    """Path of the docker CLI to use.

    Prefer Debian's docker.io CLI (same 20.10 release as the daemon). These machines also carry a
    docker 28 CLI in /usr/local/bin, first on PATH, which works too (it negotiates API 1.41);
    E2E_DOCKER_CLI picks one explicitly.
    """
    for candidate in (os.environ.get("E2E_DOCKER_CLI"), "/usr/bin/docker"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("docker")


def missing_tools(*tools: str) -> list[str]:
    """The given executables that are not on PATH."""
    return [t for t in tools if (docker_cli() if t == "docker" else shutil.which(t)) is None]


def require_tools(*tools: str) -> None:
    """Skip the calling test loudly if a tool is missing; fail it instead under CI.

    CI machines must have the tools (the project's CI script installs them), so a missing tool
    there is a broken setup, not a reason to pass quietly.
    """
    import pytest  # only tests call this; keep the module importable without pytest

    missing = missing_tools(*tools)
    if not missing:
        return
    msg = f"missing tools {missing}: apt-get install docker.io containerd docker-registry"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):  # as conftest.in_ci
        pytest.fail(msg)
    print(f"\nSKIPPING: {msg}")
    pytest.skip(msg)


class CommandError(RuntimeError):
    """A client command failed or timed out; carries its output."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        note: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = note or f"exited {returncode}"
        super().__init__(
            f"{shlex.join(self.argv)}: {status}\n"
            f"--- stderr ---\n{stderr[-_TAIL:]}\n--- stdout ---\n{stdout[-_TAIL:]}"
        )


class DaemonError(RuntimeError):
    """A daemon did not start or stop as expected."""


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; raise CommandError (with stderr) on failure or timeout."""
    try:
        proc = subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(
            argv, None, _text(e.stdout), _text(e.stderr), f"timed out after {timeout}s"
        ) from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _clean_env(drop_prefixes: Sequence[str]) -> dict[str, str]:
    """os.environ without variables that would point a client at another daemon or config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_prefixes))}


def _mounts_under(path: Path) -> list[str]:
    """Mount points below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(prefix):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


class _Daemon:
    """Start/stop plumbing shared by Dockerd and Containerd."""

    name = "daemon"
    socket_name = "daemon.sock"

    def __init__(self, workdir: str | Path | None, start_timeout: float, keep: bool) -> None:
        self._own_dir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"e2e-{self.name}-", dir="/tmp")
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / self.socket_name
        if len(str(self.sock)) > _MAX_SOCKET_PATH:
            raise DaemonError(f"socket path too long for AF_UNIX: {self.sock}")
        self.log_path = self.dir / f"{self.name}.log"
        self.start_timeout = start_timeout
        self.keep = keep  # keep the dir after stop(), for post-mortems
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    # subclasses fill these in
    def _prepare(self) -> None: ...

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _leftover_pids(self) -> list[int]:
        return []

    def log_text(self, tail: int = _TAIL) -> str:
        """The last `tail` characters of the daemon's log."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        if self.proc is not None:
            raise DaemonError(f"{self.name} already started")
        self._prepare()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            # Own session: the daemon is not hit by the test runner's Ctrl-C before stop() runs,
            # and stop() can signal its whole process group.
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = t0 + self.start_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                msg = f"{self.name} exited {rc} while starting:\n{self.log_text()}"
                self.stop()
                raise DaemonError(msg)
            if self._sock_accepts() and self._ready():
                break
            if time.monotonic() > deadline:
                msg = f"{self.name} not ready after {self.start_timeout}s:\n{self.log_text()}"
                self.stop()
                raise DaemonError(msg)
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0

    def _sock_accepts(self) -> bool:
        if not self.sock.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; unmount leftovers; remove the temp dir."""
        proc, self.proc = self.proc, None
        if proc is not None:
            leftovers = self._leftover_pids()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            # Children in their own session (dockerd's containerd) normally exit with their
            # parent; make sure, but only for pids we identified as ours before the stop.
            for pid in leftovers:
                _kill_if_ours(pid, str(self.dir))
        for mount_point in _mounts_under(self.dir):
            run(["umount", "-l", mount_point], check=False, timeout=30)
        if self._own_dir and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies without calling
    stop() (kill -9, pytest-timeout's os._exit), so no daemon outlives the test run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_if_ours(pid: int, marker: str) -> None:
    """SIGKILL pid if it is still alive and its command line mentions our temp dir."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return  # gone
        if marker not in cmdline:
            return  # pid reused by something else
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _unix_http_get(sock: Path, path: str, timeout: float = 2.0) -> int | None:
    """Status of GET `path` on an HTTP server listening on a unix socket, None if unreachable."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(sock))

    conn = Conn("localhost", timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


_RUN_DOCKER = Path("/run/docker")


class Dockerd(_Daemon):
    """A private dockerd (20.10) plus a `docker` CLI bound to it with its own DOCKER_CONFIG.

    No bridge, no iptables, no ip_forward sysctl, vfs storage: nothing on the host changes, and
    no kernel feature beyond plain directories is needed (no overlayfs, no cgroup setup: we never
    run containers, only load/push/pull images). dockerd spawns its own containerd under
    exec-root; stop() ends both.

    `daemon_config` goes into a private daemon.json (e.g. {"debug": True} or
    {"registry-mirrors": [...]}); `/etc/docker/daemon.json` is never read.
    """

    name = "dockerd"
    socket_name = "docker.sock"

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        daemon_config: Mapping[str, object] | None = None,
        cli: str | None = None,
        start_timeout: float = 60.0,
        keep: bool = False,
    ) -> None:
        super().__init__(workdir, start_timeout, keep)
        self.cli = cli or docker_cli() or "docker"
        self.daemon_config = dict(daemon_config or {})
        self.data_root = self.dir / "data"
        self.exec_root = self.dir / "exec"
        self.pidfile = self.dir / "docker.pid"
        self.config_file = self.dir / "daemon.json"
        self.docker_config = self.dir / "client"  # DOCKER_CONFIG: per-daemon login credentials
        self.host = f"unix://{self.sock}"

    def _prepare(self) -> None:
        self._made_run_docker = not _RUN_DOCKER.exists()
        for d in (self.data_root, self.exec_root, self.docker_config):
            d.mkdir(parents=True, exist_ok=True)
        config = {
            # Undocumented key (no flag in 20.10): else dockerd writes its libtrust key to
            # /etc/docker/key.json.
            "deprecated-key-path": str(self.dir / "key.json"),
            # A failed layer download fails the pull at once instead of being retried, so a
            # flaky proxy shows. (Push retries, 5 attempts over ~50 s for errors other than
            # denied/unauthorized, are hard-coded in 20.10.)
            "max-download-attempts": 1,
            **self.daemon_config,
        }
        self.config_file.write_text(json.dumps(config))
        config_json = self.docker_config / "config.json"
        if not config_json.exists():
            config_json.write_text("{}")

    def _argv(self) -> list[str]:
        return [
            "dockerd",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",  # else dockerd sets net.ipv4.ip_forward=1 on the host
            "--ip-masq=false",
            "--bridge=none",
            "--storage-driver=vfs",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--host={self.host}",
            f"--pidfile={self.pidfile}",
            f"--config-file={self.config_file}",
        ]

    def _ready(self) -> bool:
        return _unix_http_get(self.sock, "/_ping") == 200

    def stop(self, timeout: float = 20.0) -> None:
        super().stop(timeout)
        # dockerd creates /run/docker/plugins whatever its exec-root (hard-coded plugin
        # discovery dir). Remove it if it was us and it is empty; rmdir refuses otherwise.
        if getattr(self, "_made_run_docker", False):
            for d in (_RUN_DOCKER / "plugins", _RUN_DOCKER):
                try:
                    d.rmdir()
                except OSError:
                    break

    def _leftover_pids(self) -> list[int]:
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        try:
            return [int(pidfile.read_text().strip())]
        except (OSError, ValueError):
            return []

    @property
    def env(self) -> dict[str, str]:
        """Environment for the docker CLI (or any docker API client) aimed at this daemon."""
        env = _clean_env(["DOCKER_"])
        env.update(
            DOCKER_HOST=self.host,
            DOCKER_CONFIG=str(self.docker_config),
            DOCKER_CLI_HINTS="false",  # docker 28 CLI prints ads otherwise
        )
        return env

    def docker(
        self, *args: str, timeout: float = 120.0, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker ARGS` against this daemon; raise CommandError with stderr on failure."""
        if self.proc is None:
            raise DaemonError("dockerd is not running")
        return run([self.cli, *args], env=self.env, timeout=timeout, input=input, check=check)

    def login(self, registry: str, username: str, password: str, *, timeout: float = 60.0) -> str:
        """`docker login` (password via stdin); returns the CLI's stdout."""
        args = ["login", "--username", username, "--password-stdin", registry]
        return self.docker(*args, input=password, timeout=timeout).stdout

    def logout(self, registry: str, *, timeout: float = 30.0) -> None:
        self.docker("logout", registry, timeout=timeout)

    def stored_auth(self, registry: str) -> dict[str, str]:
        """The config.json entry `docker login` left for `registry` ({} if none).

        Contains "identitytoken" when the token server gave a refresh token at login, else
        "auth" (base64 user:password).
        """
        config = json.loads((self.docker_config / "config.json").read_text() or "{}")
        return config.get("auths", {}).get(registry, {})

    def load_image(self, archive: str | Path, *, timeout: float = 120.0) -> list[str]:
        """`docker load` a docker-archive tarball; returns the loaded references."""
        out = self.docker("load", "--input", str(archive), timeout=timeout).stdout
        refs = []
        for line in out.splitlines():
            for prefix in ("Loaded image: ", "Loaded image ID: "):
                if line.startswith(prefix):
                    refs.append(line[len(prefix) :].strip())
        return refs

    def load_oci_layout(
        self, layout: str | Path, tag: str, ref: str, *, timeout: float = 120.0
    ) -> str:
        """Load the single-platform image tagged `tag` in an OCI layout dir (as built by
        tests/e2e/images.py) as `ref`; returns the image ID.

        dockerd 20.10 cannot read OCI layouts, so this repackages it as a docker-archive.
        Note docker push compresses layers anew: the pushed digests are not the layout's.
        """
        archive = (
            self.dir / f"oci-{hashlib.sha256(f'{layout}:{tag}'.encode()).hexdigest()[:12]}.tar"
        )
        image_id = oci_layout_to_docker_archive(layout, tag, [ref], archive)
        try:
            self.load_image(archive, timeout=timeout)
        finally:
            archive.unlink(missing_ok=True)
        return image_id

    def push(self, ref: str, *, timeout: float = 300.0) -> str:
        """`docker push`; returns the pushed manifest digest."""
        out = self.docker("push", ref, timeout=timeout).stdout
        return _digest_in(out, f"docker push {ref}")

    def pull(self, ref: str, *, timeout: float = 300.0) -> str:
        """`docker pull`; returns the pulled manifest digest."""
        out = self.docker("pull", ref, timeout=timeout).stdout
        return _digest_in(out, f"docker pull {ref}")

    def tag(self, src: str, dst: str) -> None:
        self.docker("tag", src, dst)

    def remove_images(self, *refs: str) -> None:
        """`docker rmi --force`; missing images are not an error."""
        if refs:
            self.docker("rmi", "--force", *refs, check=False)

    def image_ids(self) -> list[str]:
        return self.docker("images", "--quiet", "--no-trunc").stdout.split()


def _digest_in(output: str, what: str) -> str:
    for word in output.split():
        if word.startswith("sha256:") and len(word) == 71:
            return word
    raise CommandError([what], 0, output, "", "printed no digest")


_HOSTS_DIR_SUBCOMMANDS = {"pull", "push", "fetch"}


class Containerd(_Daemon):
    """A private containerd (CRI disabled) and `ctr` bound to it.

    Registry settings come from hosts.toml files in `hosts_dir` (containerd's
    `/etc/containerd/certs.d` layout, but private): see `configure_host`. `ctr` subcommands that
    talk to registries (images pull/push/fetch) get `--hosts-dir` added automatically.

    The "native" snapshotter (plain copies) is the default so unpacking needs no overlayfs,
    which fails when /tmp is itself on overlayfs (e.g. CI inside a container).
    """

    name = "containerd"
    socket_name = "containerd.sock"

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        namespace: str = "e2e",
        snapshotter: str = "native",
        start_timeout: float = 30.0,
        keep: bool = False,
    ) -> None:
        super().__init__(workdir, start_timeout, keep)
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.hosts_dir = self.dir / "hosts.d"
        self.config_file = self.dir / "config.toml"

    def _prepare(self) -> None:
        for d in (self.root, self.state, self.hosts_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Every path and socket private; CRI off (it wants CNI and would fight a system
        # containerd); snapshotters that cannot work here are disabled to keep the log readable.
        self.config_file.write_text(
            f"""version = 2
root = {json.dumps(str(self.root))}
state = {json.dumps(str(self.state))}
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {json.dumps(str(self.sock))}

[ttrpc]
  address = {json.dumps(str(self.sock) + ".ttrpc")}

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(str(self.dir / "opt"))}
"""
        )

    def _argv(self) -> list[str]:
        return ["containerd", "--config", str(self.config_file)]

    def _ready(self) -> bool:
        return self.ctr("version", timeout=10, check=False).returncode == 0

    def configure_host(
        self,
        host: str,
        *,
        ca: str | Path | None = None,
        plain_http: bool = False,
        skip_verify: bool = False,
    ) -> Path:
        """Write hosts.toml for registry `host` ("127.0.0.1:5000"). Returns the file's path.

        `plain_http` talks http to it. `ca` is the CA bundle of the HTTP client ctr uses for
        this host, and that client also fetches tokens from the realm the host names (another
        host:port): behind a plain-http proxy, pass `ca` too when the realm is https.
        Without a hosts.toml ctr uses https with the system CA store (so a test CA fails).
        """
        scheme = "http" if plain_http else "https"
        # Top-level keys configure `server` itself. A [host."..."] section for the same URL
        # would be a second endpoint, tried first, and ctr retries each request on the next
        # endpoint after errors (doubling token requests, muddling what tests observe). But
        # containerd 1.6 rejects a file without a `host` table ("invalid `host` tree"), hence
        # the empty one at the end.
        lines = [
            f'server = "{scheme}://{host}"',
            'capabilities = ["pull", "resolve", "push"]',
        ]
        if ca is not None:
            lines.append(f"ca = {json.dumps(str(Path(ca).resolve()))}")
        if skip_verify:
            lines.append("skip_verify = true")
        lines.append("[host]")
        path = self.hosts_dir / host / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def env(self) -> dict[str, str]:
        env = _clean_env(["CONTAINERD_"])
        env["CONTAINERD_SNAPSHOTTER"] = self.snapshotter
        return env

    def ctr(
        self, *args: str, timeout: float = 120.0, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr ARGS` against this containerd, in its namespace.

        For `images pull|push|fetch` (and `content fetch`), `--hosts-dir` is inserted after the
        subcommand so the hosts.toml files from `configure_host` apply.
        """
        argv = list(args)
        if len(argv) >= 2 and argv[0] in ("images", "image", "i", "content"):
            if argv[1] in _HOSTS_DIR_SUBCOMMANDS:
                argv[2:2] = ["--hosts-dir", str(self.hosts_dir)]
        return run(
            ["ctr", "--address", str(self.sock), "--namespace", self.namespace, *argv],
            env=self.env,
            timeout=timeout,
            input=input,
            check=check,
        )

    def import_image(self, archive: str | Path, *, timeout: float = 120.0) -> list[str]:
        """`ctr images import` a docker-archive or OCI tarball; returns the images now present."""
        self.ctr("images", "import", str(archive), timeout=timeout)
        return self.images()

    def import_oci_layout(
        self, layout: str | Path, repo: str, *, timeout: float = 120.0
    ) -> list[str]:
        """Import every tag of an OCI layout dir (tests/e2e/images.py) as `repo:TAG`, all
        platforms (so an index can be pushed whole). Returns the images now present.

        Unlike docker, ctr pushes these blobs as they are: pushed digests equal the layout's.
        """
        archive = self.dir / "import.tar"
        with tarfile.open(archive, "w") as tar:
            for child in sorted(Path(layout).iterdir()):
                tar.add(child, arcname=child.name)
        try:
            self.ctr(
                "images",
                "import",
                "--all-platforms",
                "--base-name",
                repo,
                str(archive),
                timeout=timeout,
            )
        finally:
            archive.unlink(missing_ok=True)
        return self.images()

    def pull(
        self, ref: str, *, user: str | None = None, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull [--user user:pass] REF` (anonymous without `user`)."""
        auth = ["--user", user] if user else []
        return self.ctr("images", "pull", *auth, ref, timeout=timeout)

    def push(
        self,
        ref: str,
        *,
        local: str | None = None,
        user: str | None = None,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images push [--user user:pass] REF [LOCAL]`: push local image LOCAL (default
        REF) to REF."""
        auth = ["--user", user] if user else []
        return self.ctr("images", "push", *auth, ref, *([local] if local else []), timeout=timeout)

    def tag(self, src: str, dst: str) -> None:
        self.ctr("images", "tag", "--force", src, dst)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "--quiet").stdout.split()

    def image_digest(self, ref: str) -> str:
        """Digest of the manifest (or index) `ref` points to in the local store."""
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise KeyError(ref)

    def remove_images(self, *refs: str) -> None:
        if refs:
            self.ctr("images", "rm", *refs, check=False)


def write_image_archive(
    path: str | Path,
    refs: Sequence[str],
    *,
    layers: Sequence[Mapping[str, bytes]] | None = None,
    random_layer_bytes: int = 0,
    seed: str = "",
) -> str:
    """Write a tiny image as a docker-archive tarball (`docker save` format) to `path`.

    Both `docker load` (20.10 reads nothing else) and `ctr images import` take it. Layers are
    gzipped, so ctr pushes application/vnd.docker.image.rootfs.diff.tar.gzip like docker does.
    `layers` holds file name -> content per layer (default: one layer with hello.txt naming
    `seed`); `random_layer_bytes` > 0 adds a layer with that many incompressible bytes (seeded,
    so reproducible) for tests that need big blobs. Returns the image ID (config digest).
    """
    layers = list(layers or [{"hello.txt": f"hello {seed}\n".encode()}])
    if random_layer_bytes:
        data = random.Random(f"{seed}/{random_layer_bytes}").randbytes(random_layer_bytes)
        layers.append({"random.bin": data})

    members: dict[str, bytes] = {}
    diff_ids, layer_paths = [], []
    for files in layers:
        layer_tar = _tar(files)
        diff_ids.append(_sha256(layer_tar))
        blob = gzip.compress(layer_tar, mtime=0)
        layer_path = f"{_sha256(blob)[7:]}/layer.tar"  # the name docker load expects
        members[layer_path] = blob
        layer_paths.append(layer_path)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello"], "Labels": {"e2e.seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "tests/e2e/clients.py"} for _ in layers],
        },
        sort_keys=True,
    ).encode()
    image_id = _sha256(config)
    members[f"{image_id[7:]}.json"] = config
    manifest = [{"Config": f"{image_id[7:]}.json", "RepoTags": list(refs), "Layers": layer_paths}]
    members["manifest.json"] = json.dumps(manifest).encode()
    Path(path).write_bytes(_tar(members))
    return image_id


def oci_layout_to_docker_archive(
    layout: str | Path, tag: str, refs: Sequence[str], path: str | Path
) -> str:
    """Repackage the single-platform image tagged `tag` in an OCI layout dir as a
    docker-archive tarball at `path` (tagged `refs`). Returns the image ID (config digest)."""
    layout = Path(layout)

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / digest.replace(":", "/", 1)).read_bytes()

    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            break
    else:
        raise KeyError(f"tag {tag!r} not in {layout}/index.json")
    manifest = json.loads(blob(desc["digest"]))
    if "layers" not in manifest:
        raise ValueError(f"{tag!r} is an index, not a single-platform image")
    config_digest = manifest["config"]["digest"]
    members = {f"{config_digest[7:]}.json": blob(config_digest)}
    layer_paths = []
    for layer in manifest["layers"]:
        # docker load decompresses gzip layers itself
        layer_paths.append(f"{layer['digest'][7:]}/layer.tar")
        members[layer_paths[-1]] = blob(layer["digest"])
    entry = {"Config": f"{config_digest[7:]}.json", "RepoTags": list(refs), "Layers": layer_paths}
    members["manifest.json"] = json.dumps([entry]).encode()
    Path(path).write_bytes(_tar(members))
    return config_digest


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(files: Mapping[str, bytes]) -> bytes:
    """A reproducible tar of regular files (fixed mtime/owner/mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
