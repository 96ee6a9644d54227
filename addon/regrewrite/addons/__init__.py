"""Small mitmproxy addons composed around the core (registry_rewrite.RegistryRewrite) in
the ``addons`` list of addon/registry_rewrite.py, the way mitmproxy composes its own
defaults. They read what the core records in ``flow.metadata`` (registry_endpoint,
registry_decision, ...) and never re-derive the name mapping.

Unlike the modules one level up, these import mitmproxy.
"""

from __future__ import annotations

from mitmproxy import ctx

CORE = "registryrewrite"  # the core addon's name in mitmproxy's addon manager


def core():
    """The core addon (RegistryRewrite), or None when it is not loaded."""
    master = getattr(ctx, "master", None)
    return master.addons.get(CORE) if master is not None else None
