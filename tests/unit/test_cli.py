"""The registry-rewrite command (regrewrite.cli): --version, and mitmdump with the addon."""

from pathlib import Path

import mitmproxy.tools.main
import pytest
from mitmproxy.version import VERSION

from regrewrite import cli


def test_version(capsys):
    cli.main(["--version"])
    out = capsys.readouterr().out.strip()
    assert out == f"registry-rewrite {cli.version()} (mitmproxy {VERSION})"
    assert cli.version() != "unknown"  # .ci/setup installs the project (editable)


def test_arguments_pass_through_with_the_addon_first(monkeypatch):
    seen = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    args = ["--mode", "reverse:https://up.test", "--set", "registry_rules=r.yaml", "-q"]
    cli.main(args)
    (argv,) = seen
    assert argv[0] == "-s" and argv[2:] == args
    script = Path(argv[1])
    assert script.name == "registry_rewrite.py" and script.is_file()
    assert "addons = [" in script.read_text()


@pytest.mark.parametrize("argv", [["--version"], ["--set", "x=1", "--version"]])
def test_version_never_starts_a_proxy(monkeypatch, capsys, argv):
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", lambda a: pytest.fail("started"))
    cli.main(argv)
    assert "registry-rewrite" in capsys.readouterr().out
