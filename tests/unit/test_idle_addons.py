"""registry_unload_idle_addons (addon/regrewrite/addons/idle.py): which of mitmproxy's
addons are unloaded in mitmdump, checked against the installed mitmproxy."""

from __future__ import annotations

import asyncio
import importlib
import inspect

import pytest
from mitmproxy import addonmanager, addons, ctx, exceptions, hooks, options
from mitmproxy.addons import dumper, keepserving, readfile
from mitmproxy.test import taddons
from mitmproxy.tools.dump import DumpMaster

from regrewrite.addons import idle
from regrewrite.addons.idle import ANY, IDLE_WHEN, UnloadIdle


def declared(addon) -> dict[str, object]:
    """The options `addon` declares in its load hook, with their defaults."""
    with taddons.context() as tctx:
        before = set(tctx.options.keys())
        if hasattr(addon, "load"):
            addon.load(addonmanager.Loader(tctx.master))
        return {name: tctx.options.default(name) for name in set(tctx.options.keys()) - before}


@pytest.mark.parametrize("key", sorted(IDLE_WHEN), ids=lambda k: k[1])
def test_the_table_names_every_option_of_the_installed_addon(key):
    """A mitmproxy upgrade that adds an option to one of these addons fails here: its
    idle value must be written down before the addon may be unloaded."""
    module, name = key
    cls = getattr(importlib.import_module(f"mitmproxy.addons.{module}"), name)
    options_of = declared(cls())
    assert set(options_of) == set(IDLE_WHEN[key])
    for option, idle_value in IDLE_WHEN[key].items():
        if idle_value is not ANY and option != "flow_detail":  # (0, not the default 1)
            assert options_of[option] == idle_value, option
    # AddonManager.remove calls done synchronously.
    assert not inspect.iscoroutinefunction(getattr(cls, "done", None))


def mitmdump_master(**opts) -> tuple[DumpMaster, UnloadIdle]:
    master = DumpMaster(options.Options(), with_termlog=False, with_dumper=True)
    unload = UnloadIdle()
    master.addons.add(unload)
    master.options.update(**opts)
    return master, unload


def loaded_names(master) -> set[str]:
    return {type(a).__name__ for a in master.addons.chain}


async def test_mitmdump_unloads_the_idle_ones_and_keeps_those_in_use():
    master, unload = mitmdump_master(
        flow_detail=0, map_remote=["|example.com|example.org"], save_stream_file=None
    )
    before = loaded_names(master)
    every_idle = {name for _, name in IDLE_WHEN}
    assert every_idle - {"MapRemote"} <= before  # (all of them were loaded)
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    after = loaded_names(master)
    assert after & every_idle == {"MapRemote"}  # set at the start: kept
    # The proxy itself and the addons that act with default options stay.
    for kept in ("Core", "Proxyserver", "ScriptLoader", "NextLayer", "TlsConfig", "Block"):
        assert kept in after
    assert "UnloadIdle" in after


async def test_flow_detail_keeps_the_dumper():
    master, unload = mitmdump_master()  # flow_detail 1 (mitmdump's default)
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    assert "Dumper" in loaded_names(master)
    assert "Cut" not in loaded_names(master)


async def test_switched_off_nothing_is_unloaded():
    master, unload = mitmdump_master(registry_unload_idle_addons=False)
    before = loaded_names(master)
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    assert loaded_names(master) == before
    master.options.update(map_remote=["|a|b"])  # nothing unloaded: nothing refused


def test_other_masters_keep_everything():
    """mitmweb and the console change options while running: never unloaded there."""
    with taddons.context() as tctx:
        unload = UnloadIdle()
        defaults = [a for a in addons.default_addons() if type(a).__name__ != "Core"]
        tctx.master.addons.add(unload, *defaults, dumper.Dumper())
        before = loaded_names(tctx.master)
        tctx.master.addons.invoke_addon_sync(unload, hooks.RunningHook())
        assert loaded_names(tctx.master) == before


async def test_an_option_of_an_unloaded_addon_is_refused_later_and_keeps_its_value():
    master, unload = mitmdump_master(flow_detail=0)
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    with pytest.raises(exceptions.OptionsError, match="map_remote: takes effect at the start"):
        master.options.update(map_remote=["|a|b"])
    assert master.options.map_remote == []
    with pytest.raises(exceptions.OptionsError, match="flow_detail"):
        master.options.update(flow_detail=2)
    assert master.options.flow_detail == 0
    with pytest.raises(exceptions.OptionsError, match="registry_unload_idle_addons"):
        master.options.update(registry_unload_idle_addons=False)
    assert master.options.registry_unload_idle_addons is True
    # Options whose value does not matter while the addon would be idle pass, as do
    # options of addons that were kept.
    master.options.update(dumper_filter="~q", block_global=False)


async def test_a_reloaded_script_still_refuses_the_options_of_addons_unloaded_before():
    master, unload = mitmdump_master()
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    master.addons.remove(unload)
    again = UnloadIdle()  # the script's module executed anew
    master.addons.add(again)
    master.addons.invoke_addon_sync(again, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    with pytest.raises(exceptions.OptionsError, match="proxyauth"):
        master.options.update(proxyauth="any")


def test_only_mitmproxys_own_classes_are_candidates():
    class MapRemote:  # a user's addon of the same name
        pass

    assert idle.idle_key(MapRemote()) is None
    for addon in [
        *addons.default_addons(),
        dumper.Dumper(),
        readfile.ReadFileStdin(),
        keepserving.KeepServing(),
    ]:
        key = idle.idle_key(addon)
        assert (key is not None) == (
            (type(addon).__module__.rpartition(".")[2], type(addon).__name__) in IDLE_WHEN
        )


async def test_a_failure_while_unloading_never_stops_the_start(monkeypatch, caplog):
    """An addon whose done hook fails on removal: mitmdump stops when an error is logged
    during start-up, so the failure is a warning; the addon is gone, so its options are
    refused; the rest are still unloaded."""
    from mitmproxy.addons import save

    def fail(self):
        raise RuntimeError("done failed")

    monkeypatch.setattr(save.Save, "done", fail)
    master, unload = mitmdump_master(flow_detail=0)
    with caplog.at_level("DEBUG"):
        master.addons.invoke_addon_sync(unload, hooks.RunningHook())
        await asyncio.sleep(0)  # (it unloads once the running event is through)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert "Save" not in loaded_names(master)
    assert "SaveHar" not in loaded_names(master)  # (after Save in the table)
    with pytest.raises(exceptions.OptionsError, match="save_stream_file"):
        master.options.update(save_stream_file="/tmp/never")
    assert master.options.save_stream_file is None


# What each unloaded addon does besides load and configure, as read in mitmproxy 12.3.1's
# source when IDLE_WHEN was written: its hooks (each does nothing at the table's idle
# values) and its commands (still callable once it is unloaded). A mitmproxy upgrade that
# adds a hook or a command to one of them fails here until that one is read too.
REVIEWED: dict[str, tuple[set[str], set[str]]] = {
    "AntiCache": ({"request"}, set()),
    "AntiComp": ({"request"}, set()),
    "BlockList": ({"request"}, set()),
    "Browser": ({"done"}, {"browser.start"}),
    "CommandHistory": (
        {"running", "done"},
        {
            "commands.history.add",
            "commands.history.clear",
            "commands.history.filter",
            "commands.history.get",
            "commands.history.next",
            "commands.history.prev",
        },
    ),
    "Comment": (set(), {"flow.comment"}),
    "Cut": (set(), {"cut", "cut.clip", "cut.save"}),
    "Dumper": (
        {
            "dns_error",
            "dns_response",
            "error",
            "http_connect_error",
            "response",
            "tcp_error",
            "tcp_message",
            "udp_error",
            "udp_message",
            "websocket_end",
            "websocket_message",
        },
        set(),
    ),
    "Export": (set(), {"export", "export.clip", "export.file", "export.formats"}),
    "MapLocal": ({"request"}, set()),
    "MapRemote": ({"request"}, set()),
    "ModifyBody": ({"request", "response"}, set()),
    "ModifyHeaders": ({"requestheaders", "responseheaders"}, set()),
    "ProxyAuth": ({"http_connect", "requestheaders", "socks5_auth"}, set()),
    "ReadFileStdin": ({"running"}, {"readfile.reading"}),
    "Save": (
        {
            "dns_error",
            "dns_request",
            "dns_response",
            "done",
            "error",
            "request",
            "response",
            "tcp_end",
            "tcp_error",
            "tcp_start",
            "udp_end",
            "udp_error",
            "udp_start",
            "websocket_end",
        },
        {"save.file"},
    ),
    "SaveHar": ({"done", "error", "response", "websocket_end"}, {"save.har"}),
    "ServerPlayback": (
        {"request"},
        {
            "replay.server",
            "replay.server.add",
            "replay.server.count",
            "replay.server.file",
            "replay.server.stop",
        },
    ),
    "StickyAuth": ({"request"}, set()),
    "StickyCookie": ({"request", "response"}, set()),
    "UpstreamAuth": ({"http_connect_upstream", "requestheaders"}, set()),
}


def hooks_and_commands(cls) -> tuple[set[str], set[str]]:
    """The hooks `cls` implements (load and configure aside) and the commands it offers."""
    found = {h for h in hooks.all_hooks if callable(getattr(cls, h, None))}
    commands = set()
    for attr in dir(cls):
        name = getattr(getattr(cls, attr, None), "command_name", None)
        if not attr.startswith("__") and isinstance(name, str):
            commands.add(name)
    return found - {"load", "configure"}, commands


@pytest.mark.parametrize("key", sorted(IDLE_WHEN), ids=lambda k: k[1])
def test_every_hook_and_command_of_the_installed_addon_was_reviewed(key):
    """The table's comment promises that a new hook shows up as a failing test, not only a
    new option: a hook that acts at the idle values would be lost silently."""
    module, name = key
    cls = getattr(importlib.import_module(f"mitmproxy.addons.{module}"), name)
    assert set(REVIEWED) == {n for _, n in IDLE_WHEN}
    assert hooks_and_commands(cls) == REVIEWED[name]


def test_the_review_check_sees_a_new_hook(monkeypatch):
    from mitmproxy.addons import save

    monkeypatch.setattr(save.Save, "running", lambda self: None, raising=False)
    assert hooks_and_commands(save.Save) != REVIEWED["Save"]


async def test_commands_that_need_an_unloaded_addons_hooks_fail_clearly(tmp_path):
    """replay.server* would load responses into an addon no request reaches any more, and
    browser.start would start a browser nobody stops (Browser's done already ran): a
    script calling them gets an error instead. The other commands work without hooks."""
    from mitmproxy import command, io
    from mitmproxy.test import tflow

    path = tmp_path / "flows"
    with path.open("wb") as f:
        io.FlowWriter(f).add(tflow.tflow(resp=True))
    master, unload = mitmdump_master()
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    for name, args in [
        ("replay.server.file", [str(path)]),
        ("replay.server", [[tflow.tflow(resp=True)]]),
        ("replay.server.add", [[tflow.tflow(resp=True)]]),
        ("browser.start", []),
    ]:
        with pytest.raises(exceptions.CommandError, match="unloaded"):
            master.commands.call(name, *args)
    assert master.commands.call("replay.server.count") == 0  # (KeepServing asks)
    assert master.commands.call("readfile.reading") is False
    assert "curl" in master.commands.call("export.formats")
    assert isinstance(master.commands.commands["replay.server"], command.Command)
    assert (
        master.commands.commands["replay.server"].signature_help().startswith("replay.server flows")
    )


async def test_kept_addons_keep_their_commands(tmp_path):
    from mitmproxy import io
    from mitmproxy.test import tflow

    path = tmp_path / "flows"
    with path.open("wb") as f:
        io.FlowWriter(f).add(tflow.tflow(resp=True))
    master, unload = mitmdump_master(server_replay=[str(path)])
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)  # (it unloads once the running event is through)
    assert "ServerPlayback" in loaded_names(master)
    master.commands.call("replay.server", [tflow.tflow(resp=True), tflow.tflow(resp=True)])
    assert master.commands.call("replay.server.count") == 2


async def test_options_set_by_a_later_running_hook_are_honoured():
    """mitmproxy calls `running` along its chain: addons after this script's (and later
    scripts, e.g. ``-s other.py``) may still set options at the start. Unloading in this
    running hook refused them there, and the OptionsError out of a running hook stopped
    mitmdump with a traceback."""

    class LaterScript:
        def running(self):
            ctx.options.map_remote = ["|example.com|example.org"]

    master, unload = mitmdump_master(flow_detail=0)
    later = LaterScript()
    master.addons.add(later)
    await master.addons.trigger_event(hooks.RunningHook())  # unload's, then later's
    await asyncio.sleep(0)
    after = loaded_names(master)
    assert "MapRemote" in after
    assert "Dumper" not in after
    assert master.options.map_remote == ["|example.com|example.org"]


async def test_nothing_is_unloaded_by_a_script_gone_or_switched_off_before_its_turn():
    master, unload = mitmdump_master()
    before = loaded_names(master)
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    master.options.update(registry_unload_idle_addons=False)  # (a later running hook)
    await asyncio.sleep(0)
    assert loaded_names(master) == before

    master, unload = mitmdump_master()
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    master.addons.remove(unload)  # (the script reloaded: the new instance unloads)
    await asyncio.sleep(0)
    assert loaded_names(master) == before - {"UnloadIdle"}


async def test_an_addon_a_user_removed_is_not_taken_for_one_this_unloaded():
    """A script that removes mitmproxy's Dumper itself (to print flows its own way, reading
    flow_detail) did not have it unloaded here: its options stay free, and no message
    blames this addon. Only what an UnloadIdle really unloaded is refused, reloads too."""
    master, unload = mitmdump_master()
    master.addons.remove(master.addons.get("dumper"))  # (flow_detail stays 1)
    master.addons.invoke_addon_sync(unload, hooks.RunningHook())
    await asyncio.sleep(0)
    master.options.update(flow_detail=2)
    master.addons.remove(unload)
    again = UnloadIdle()  # reloaded
    master.addons.add(again)
    master.addons.invoke_addon_sync(again, hooks.RunningHook())
    await asyncio.sleep(0)
    master.options.update(flow_detail=3)
    with pytest.raises(exceptions.OptionsError, match="map_remote"):
        master.options.update(map_remote=["|a|b"])
