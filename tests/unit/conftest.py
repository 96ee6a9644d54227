"""The addon in mitmproxy's test context, configured with the test module's ``RULES``."""

import pytest
from mitmproxy.test import taddons

import registry_rewrite


@pytest.fixture
def rules_file(request, tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(request.module.RULES)
    return path


@pytest.fixture
def addon():
    return registry_rewrite.RegistryRewrite()


@pytest.fixture
def tctx(addon, rules_file):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, registry_rules=str(rules_file))
        yield tctx
