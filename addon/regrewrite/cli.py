"""The ``registry-rewrite`` command: mitmdump with the addon loaded.

    registry-rewrite --mode reverse:https://UPSTREAM --set registry_rules=rules.yaml

Every argument goes to mitmdump unchanged; ``--version`` prints this tool's version
(and mitmproxy's). mitmproxy is imported only when the command runs, so the package
itself stays free of it.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

DISTRIBUTION = "registry-rewrite"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def set_value(args: list[str], option: str) -> str | None:
    """The value the arguments give `option` (``--set option=...``, the last one), or
    None when they do not set it. A bare ``--set option`` gives "", as ``option=`` does
    (mitmdump sets a boolean to true for either)."""
    found = None
    for i, arg in enumerate(args):
        if arg == "--set" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--set="):  # argparse's --opt=value form
            value = arg.partition("=")[2]
        else:
            continue
        name, _, given = value.partition("=")
        if name == option:
            found = given  # ("" without "=")
    return found


def rules_path(args: list[str]) -> str:
    """The rules file the arguments name, or the default."""
    return set_value(args, "registry_rules") or "rules.yaml"


def defaults(args: list[str]) -> list[str]:
    """This tool's defaults that differ from mitmdump's, for options the arguments leave
    alone (mitmdump refuses a second value for an option).

    HTTP/2 off: mitmproxy relays a blob over HTTP/2 at half its HTTP/1.1 speed (h2 builds
    a repr of every frame it receives; bench/results/http2.md: 115 vs 244 MB/s with the
    addon). skopeo, containerd and docker offer no HTTP/2 anyway; a client that does
    (curl) gets HTTP/1.1, which every registry client speaks."""
    given = set_value(args, "http2") is not None or {"--http2", "--no-http2"} & set(args)
    return [] if given else ["--set", "http2=false"]


def without_script(args: list[str], script: str) -> list[str]:
    """``args`` less any ``-s``/``--scripts`` (in any form) naming ``script``, which the
    command loads itself (mitmdump stops on a duplicate script)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in ("-s", "--scripts") and i + 1 < len(args) and _same_file(args[i + 1], script):
            skip = True
            continue
        # argparse's one-argument forms: --scripts=PATH, -sPATH
        if arg.startswith("--scripts="):
            given = arg.partition("=")[2]
        elif arg.startswith("-s") and not arg.startswith("--"):
            given = arg[2:]
        else:
            given = None
        if given and _same_file(given, script):
            continue
        out.append(arg)
    return out


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--version" in args:
        from mitmproxy.version import VERSION

        print(f"{DISTRIBUTION} {version()} (mitmproxy {VERSION})")
        return
    from regrewrite.rules import RulesError, load_rules

    try:
        # Checked before mitmdump starts: it loads scripts while it brings its servers up,
        # so a bad file would otherwise print "listening at ..." before the error.
        load_rules(rules_path(args))
    except RulesError as e:
        print(f"registry-rewrite: {e}", file=sys.stderr)
        sys.exit(1)
    from importlib.util import find_spec

    from mitmproxy.tools.main import mitmdump

    # The addon as a script, as from a checkout: mitmdump then loads every addon of its
    # `addons` list, and their options parse like any other --set. (find_spec: importing
    # the module here would build a second, unused set of addons.)
    script = find_spec("registry_rewrite").origin
    mitmdump(["-s", script, *defaults(args), *without_script(args, script)])


if __name__ == "__main__":
    main()
