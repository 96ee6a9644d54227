"""mitmproxy script for bench/http2.py: UNSUPPORTED patches of mitmproxy's and h2's internals.

For measurement only, never for deployment: they replace internals that mitmproxy 12.3 and
h2 4.4 do not offer as options or hooks, and may break with any release.

`--set h2bench_unsupported=LIST`, a comma-separated list of:
- `frames`: mitmproxy advertises SETTINGS_MAX_FRAME_SIZE 2**24-1 (the largest HTTP/2
  allows) instead of 2**17, on both its connections. Its windows are left alone: mitmproxy
  already advertises the largest (2**31-1) initial stream window and raises its connection
  window to it at once.
- `repr`: hyperframe's DataFrame gets a cheap repr. h2 4.4.1's `_receive_frame` evaluates
  `repr(frame)` for a trace log call on every received frame (even when nothing logs), and
  DataFrame's repr serialises and hex-encodes the whole payload.
"""

import logging

import hyperframe.frame as hf
from mitmproxy import ctx, exceptions
from mitmproxy.proxy.layers.http import _http_h2

PATCHES = ("frames", "repr")
MAX_FRAME_SIZE = 2**24 - 1

_orig_init = _http_h2.BufferedH2Connection.__init__


def _init_large_frames(self, config):
    _orig_init(self, config)
    self.local_settings.max_frame_size = MAX_FRAME_SIZE
    self.max_inbound_frame_size = MAX_FRAME_SIZE
    # As mitmproxy does: acknowledge at once so that the first SETTINGS frame carries it.
    self.local_settings.acknowledge()


def _data_repr(self) -> str:
    return f"<{len(self.data)} bytes>"


def load(loader):
    loader.add_option("h2bench_unsupported", str, "", "bench/http2.py only: " + ", ".join(PATCHES))


def configure(updated):
    if "h2bench_unsupported" not in updated:
        return
    wanted = {p for p in ctx.options.h2bench_unsupported.split(",") if p}
    if unknown := wanted - set(PATCHES):
        raise exceptions.OptionsError(f"h2bench_unsupported: unknown {sorted(unknown)!r}")
    if "frames" in wanted:
        _http_h2.BufferedH2Connection.__init__ = _init_large_frames
    if "repr" in wanted:
        hf.DataFrame._body_repr = _data_repr
    logging.warning(f"h2bench: UNSUPPORTED patches active: {sorted(wanted)}")
