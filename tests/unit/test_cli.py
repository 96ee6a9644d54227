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


def test_arguments_pass_through_with_the_addon_first(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules: []\n")
    args = ["--mode", "reverse:https://up.test", "--set", f"registry_rules={rules}", "-q"]
    cli.main(args)
    (argv,) = seen
    assert argv[0] == "-s" and argv[2:] == ["--set", "http2=false", *args]
    script = Path(argv[1])
    assert script.name == "registry_rewrite.py" and script.is_file()
    assert "addons = [" in script.read_text()


@pytest.mark.parametrize("argv", [["--version"], ["--set", "x=1", "--version"]])
def test_version_never_starts_a_proxy(monkeypatch, capsys, argv):
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", lambda a: pytest.fail("started"))
    cli.main(argv)
    assert "registry-rewrite" in capsys.readouterr().out


def test_a_bad_rules_file_stops_before_mitmdump_starts(tmp_path, capsys, monkeypatch):
    import regrewrite.cli as cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - client: 'a/{x}'\n    upstream: 7\n")
    started = []
    monkeypatch.setattr("mitmproxy.tools.main.mitmdump", lambda args: started.append(args))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--mode", "reverse:https://127.0.0.1:9", "--set", f"registry_rules={bad}"])
    assert exit_.value.code == 1 and not started
    err = capsys.readouterr().err
    assert err.startswith("registry-rewrite: ") and "bad.yaml:3" in err
    assert cli.rules_path(["--set", "registry_rules=x.yaml"]) == "x.yaml"
    assert cli.rules_path([]) == "rules.yaml"


@pytest.mark.parametrize(
    "args",
    [
        ["--set=registry_rules=x.yaml"],  # argparse's --opt=value form
        ["--set", "registry_rules=other.yaml", "--set=registry_rules=x.yaml"],  # last wins
        ["--set=registry_rules=other.yaml", "--set", "registry_rules=x.yaml"],
    ],
)
def test_rules_path_in_every_argument_form(args):
    # --set=registry_rules=x.yaml was not seen: the default rules.yaml was checked,
    # and a good file refused (or a bad one let through) before mitmdump started.
    assert cli.rules_path(args) == "x.yaml"


def test_the_addon_given_again_with_s_is_loaded_once(monkeypatch, tmp_path):
    # mitmdump stops with "Duplicate script" when the addon is named twice.
    seen = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules: []\n")
    script = str(Path(cli.__file__).parent.parent / "registry_rewrite.py")
    cli.main(["-s", script, f"--set=registry_rules={rules}", "--scripts", script, "-q"])
    (argv,) = seen
    assert argv[2:] == ["--set", "http2=false", f"--set=registry_rules={rules}", "-q"]


@pytest.mark.parametrize(
    "given", [["--set", "http2=true"], ["--set=http2=true"], ["--http2"], ["--no-http2"]]
)
def test_http2_is_off_unless_the_arguments_say(monkeypatch, tmp_path, given):
    seen = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules: []\n")
    args = ["--set", f"registry_rules={rules}", *given]
    cli.main(args)
    (argv,) = seen
    assert argv[2:] == args  # the user's choice alone: mitmdump refuses two values
    assert cli.set_value(["--set", "a=1", "--set", "http2=x", "--set", "http2=y"], "http2") == "y"
    assert cli.set_value(["--set", "http2"], "http2") == ""  # (true, to mitmdump)


def _http2_mitmdump_gets(argv: list[str]) -> bool:
    """http2 as mitmdump's own parser and options make it of ``argv``."""
    from mitmproxy import options
    from mitmproxy.tools import cmdline

    opts = options.Options()
    parser = cmdline.mitmdump(opts)
    parsed = parser.parse_args([a for a in argv if a != argv[1]][1:])  # (no -s SCRIPT)
    opts.set(*parsed.setoptions, defer=True)
    mitmproxy.tools.main.process_options(parser, opts, parsed)
    return opts.http2


@pytest.mark.parametrize(
    ("given", "http2"),
    [
        ([], False),
        (["--set", "http2"], True),  # a boolean without a value is true to mitmdump
        (["--set=http2"], True),
        (["--set", "http2=true"], True),
        (["--http2"], True),
        (["--no-http2"], False),
        (["--set", "http2=false", "--http2"], True),
    ],
)
def test_http2_is_what_the_user_asked_for_once_mitmdump_parses_it(
    monkeypatch, tmp_path, given, http2
):
    # `--set http2` was not seen as setting http2: the command's --set http2=false came
    # first, and mitmdump kept that value (it ignores a bare name given after a value).
    seen = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules: []\n")
    cli.main(["--set", f"registry_rules={rules}", *given])
    (argv,) = seen
    assert _http2_mitmdump_gets(argv) is http2


@pytest.mark.parametrize("form", ["--scripts={}", "-s{}"])
def test_the_addon_given_in_a_one_argument_form_is_loaded_once(monkeypatch, tmp_path, form):
    # argparse reads --scripts=PATH and -sPATH as well as -s PATH: mitmdump was given
    # the addon twice and stopped.
    seen = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules: []\n")
    script = str(Path(cli.__file__).parent.parent / "registry_rewrite.py")
    other = tmp_path / "other.py"
    other.write_text("")
    cli.main([form.format(script), f"--set=registry_rules={rules}", form.format(other)])
    (argv,) = seen
    assert argv[2:] == ["--set", "http2=false", f"--set=registry_rules={rules}", form.format(other)]
