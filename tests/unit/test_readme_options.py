"""Every option the addon declares is documented in README.md."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import addonmanager
from mitmproxy.test import taddons

import registry_rewrite

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_registry_option_is_in_the_readme():
    with taddons.context() as tctx:
        before = set(tctx.options.keys())
        loader = addonmanager.Loader(tctx.master)
        for addon in registry_rewrite.addons:
            if hasattr(addon, "load"):
                addon.load(loader)
        declared = set(tctx.options.keys()) - before
    assert declared
    text = README.read_text()
    assert sorted(o for o in declared if o not in text) == []
