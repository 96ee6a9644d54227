"""``registry_unload_idle_addons``: in mitmdump, unload mitmproxy's own addons that the
options leave with nothing to do.

mitmproxy calls every loaded addon for every event, whether it has a hook for the event
or not: a request on a new connection is about a dozen events, and mitmdump loads some
forty addons. Most of them have nothing to do in a registry proxy unless one of their
options is set (``map_remote``, ``proxyauth``, ``-w``/``save_stream_file``, ...), and
some only offer commands nobody can type into mitmdump. Unloading those once mitmdump
is running (``AddonManager.remove``) took 1–1.5 ms off the CPU a cache hit's request
costs the proxy (13.9 → 12.4 ms over TLS, 7.7 → 7.0 ms plain), to what bare mitmdump
costs (bench/results/connections.md).

Only in mitmdump (and the ``registry-rewrite`` command): in mitmweb and mitmproxy's
console the options can change while running, and an addon unloaded then would ignore
them. Here an option of an unloaded addon that changes after the start is refused
(``OptionsError``, the old value stays) rather than silently doing nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref

from mitmproxy import ctx, exceptions

logger = logging.getLogger(__name__)

ANY = object()  # an option whose value does not matter while the others hold

# mitmproxy's addons (module, class) with every option each declares: the value at which
# it does nothing (tests/unit/test_idle_addons.py checks this against the installed
# mitmproxy, so a new option, hook or command there shows up as a failing test, not a
# silently ignored setting). Left out: those that act with default options (block, tlsconfig,
# disable_h2c, update_alt_svc, onboarding, strip_dns_https_records, ...), those
# that carry the proxy (core, proxyserver, next_layer, script, dns_resolver, termlog,
# keepserving, errorcheck) and clientplayback (its done hook is async, which
# AddonManager.remove cannot call).
IDLE_WHEN: dict[tuple[str, str], dict[str, object]] = {
    # Commands only: no hooks that act on traffic.
    ("browser", "Browser"): {},
    ("command_history", "CommandHistory"): {"command_history": ANY},  # console input
    ("comment", "Comment"): {},
    ("cut", "Cut"): {},
    ("export", "Export"): {"export_preserve_original_ip": ANY},
    # Idle while their options are unset.
    ("blocklist", "BlockList"): {"block_list": []},
    ("anticache", "AntiCache"): {"anticache": False},
    ("anticomp", "AntiComp"): {"anticomp": False},
    ("proxyauth", "ProxyAuth"): {"proxyauth": None},
    ("mapremote", "MapRemote"): {"map_remote": []},
    ("maplocal", "MapLocal"): {"map_local": []},
    ("modifybody", "ModifyBody"): {"modify_body": []},
    ("modifyheaders", "ModifyHeaders"): {"modify_headers": []},
    ("stickyauth", "StickyAuth"): {"stickyauth": None},
    ("stickycookie", "StickyCookie"): {"stickycookie": None},
    ("upstream_auth", "UpstreamAuth"): {"upstream_auth": None},
    ("save", "Save"): {"save_stream_file": None, "save_stream_filter": ANY},
    ("savehar", "SaveHar"): {"hardump": ""},
    ("readfile", "ReadFileStdin"): {"rfile": None, "readfile_filter": ANY},
    ("dumper", "Dumper"): {  # flow_detail=0: the access log's JSON lines only
        "flow_detail": 0,
        "dumper_filter": ANY,
        "dumper_default_contentview": ANY,
    },
    ("serverplayback", "ServerPlayback"): {
        "server_replay": [],
        **dict.fromkeys(
            (
                "server_replay_extra",
                "server_replay_ignore_content",
                "server_replay_ignore_host",
                "server_replay_ignore_params",
                "server_replay_ignore_payload_params",
                "server_replay_ignore_port",
                "server_replay_kill_extra",
                "server_replay_nopop",
                "server_replay_refresh",
                "server_replay_reuse",
                "server_replay_use_headers",
            ),
            ANY,
        ),
    },
}


# Commands of the unloaded addons that act through the addon's hooks: once it is unloaded
# they would do nothing (replay.server*: responses no request reaches) or leave something
# behind (browser.start: the browser its done hook would have stopped), so they fail
# instead. The others (cut, export, save.file, replay.server.count that KeepServing asks,
# ...) work without hooks and stay.
NEEDS_HOOKS = frozenset(
    ("replay.server", "replay.server.add", "replay.server.file", "browser.start")
)


# master -> option -> (the addon unloaded, the option's idle value), for every UnloadIdle
# of that master: this module is imported, not run as the script, so a reload keeps it.
_UNLOADED: weakref.WeakKeyDictionary[object, dict[str, tuple[str, object]]] = (
    weakref.WeakKeyDictionary()
)


def idle_key(addon) -> tuple[str, str] | None:
    """The IDLE_WHEN key of one of mitmproxy's own addons, else None (a user's class of
    the same name is never touched)."""
    cls = type(addon)
    package, _, module = cls.__module__.rpartition(".")
    if package != "mitmproxy.addons":
        return None
    key = (module, cls.__name__)
    return key if key in IDLE_WHEN else None


def is_idle(conditions: dict[str, object], value_of) -> bool:
    """Whether every option in `conditions` has its idle value (`value_of(name)`)."""
    return all(idle is ANY or value_of(name) == idle for name, idle in conditions.items())


class UnloadIdle:
    def __init__(self) -> None:
        # option -> (the unloaded addon, the option's idle value)
        self.unloaded: dict[str, tuple[str, object]] = {}

    def load(self, loader):
        loader.add_option(
            "registry_unload_idle_addons",
            bool,
            True,
            "In mitmdump, unload mitmproxy's own addons that the options leave idle "
            "(map_remote, proxyauth, save_stream_file, ... unset; flow_detail=0): "
            "mitmproxy calls every addon for every event. Their options are refused "
            "from then on; set them at the start.",
        )

    def running(self):
        if not ctx.options.registry_unload_idle_addons or not _is_mitmdump(ctx.master):
            return
        # What an earlier instance unloaded, before this script was reloaded (absent is
        # not enough: a user's script may have removed an addon itself).
        self.unloaded = _UNLOADED.setdefault(ctx.master, {})
        # Once the whole running event has gone along the chain: the addons after this
        # script's (and later scripts) may still set options in their running hooks, at
        # the start, and an addon removed now would see that event after its done hook.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.unload()
        else:
            loop.call_soon(self.unload)

    def unload(self) -> None:
        manager = ctx.master.addons
        if manager.get(_name(self)) is not self or not ctx.options.registry_unload_idle_addons:
            return  # (this script was unloaded or reloaded since, or the option turned off)
        loaded = {idle_key(addon): addon for addon in manager.chain}
        gone = []
        for key, conditions in IDLE_WHEN.items():
            addon = loaded.get(key)
            if addon is not None:
                try:
                    if not is_idle(conditions, lambda o: getattr(ctx.options, o)):
                        continue
                    # (remove() replaces the chain list: an event being delivered still
                    # reaches the addons of the list it started with.)
                    manager.remove(addon)
                except Exception as e:  # noqa: BLE001 - never stop the proxy's start
                    # (mitmdump exits when an error is logged while it starts.) remove()
                    # takes the addon out before its done hook runs, which may have failed.
                    logger.warning(f"registry: could not unload mitmproxy's {key[1]}: {e!r}")
                    if any(a is addon for a in manager.chain):
                        continue
                gone.append(key[1])
                _refuse_commands(ctx.master.commands, addon, key[1])
                for option, idle in conditions.items():
                    self.unloaded[option] = (key[1], idle)
        if gone:
            logger.info(
                f"registry: unloaded {len(gone)} of mitmproxy's addons these options leave "
                f"idle ({', '.join(gone)}); --set registry_unload_idle_addons=false keeps "
                "them"
            )

    def configure(self, updated):
        if not self.unloaded:
            return
        for option in sorted(updated):
            if option == "registry_unload_idle_addons":
                if not ctx.options.registry_unload_idle_addons:
                    raise exceptions.OptionsError(
                        f"{option}: takes effect at the start only (addons were unloaded)"
                    )
                continue
            addon, idle = self.unloaded.get(option, (None, ANY))
            # (Checked against the value: after a refusal mitmproxy puts the old value
            # back and configures again, which must pass.)
            if idle is not ANY and getattr(ctx.options, option) != idle:
                raise exceptions.OptionsError(
                    f"{option}: takes effect at the start only (mitmproxy's {addon} addon "
                    "was unloaded while the options left it idle; restart with it set, or "
                    "with registry_unload_idle_addons=false)"
                )


def _refuse_commands(commands, addon, name: str) -> None:
    """Make the commands of the unloaded `addon` that need its hooks fail clearly."""
    for path in NEEDS_HOOKS:
        cmd = commands.commands.get(path)
        if cmd is None or getattr(cmd.func, "__self__", None) is not addon:
            continue

        @functools.wraps(cmd.func)  # (the same signature for mitmproxy's parser)
        def refuse(*args, _path=path, **kwargs):
            raise exceptions.CommandError(
                f"{_path}: mitmproxy's {name} addon was unloaded while the options left it "
                "idle; restart with --set registry_unload_idle_addons=false"
            )

        cmd.func = refuse


def _name(addon) -> str:
    """The name mitmproxy's addon manager knows `addon` by."""
    return getattr(addon, "name", type(addon).__name__.lower())


def _is_mitmdump(master) -> bool:
    from mitmproxy.tools.dump import DumpMaster

    return isinstance(master, DumpMaster)
