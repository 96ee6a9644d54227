"""mitmproxy script for bench/http2.py: HTTP/2 on one side of the proxy only.

Supported APIs only: the `server_connect` hook sets the ALPN offers of the upstream
connection (`Server.alpn_offers`, which mitmproxy's TlsConfig leaves alone when an addon
has set it), and the client side is decided by the `http2` option. This needs
`--set connection_strategy=lazy`: with the default `eager`, mitmproxy completes the
upstream handshake first and then hands the client whatever protocol the upstream chose,
so both sides always end up alike. (Not `tls_clienthello`: in lazy mode the HTTP layer
connects upstream with a new Server object, so offers set on the context's are lost.)

`--set h2bench_alpn=MODE`:
- `upstream-h1`: the client may speak HTTP/2 (`http2=true`), the upstream is offered
  HTTP/1.1 only;
- `upstream-h2`: the client speaks HTTP/1.1 (run with `--set http2=false`), the upstream
  is offered h2 first.
"""

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import server_hooks

MODES = ("", "upstream-h1", "upstream-h2")


def load(loader):
    loader.add_option("h2bench_alpn", str, "", "bench/http2.py only: " + ", ".join(MODES[1:]))


def configure(updated):
    if "h2bench_alpn" in updated and ctx.options.h2bench_alpn not in MODES:
        raise exceptions.OptionsError(f"h2bench_alpn: unknown {ctx.options.h2bench_alpn!r}")


def server_connect(data: server_hooks.ServerConnectionHookData) -> None:
    server = data.server
    if ctx.options.h2bench_alpn == "upstream-h1":
        server.alpn_offers = (b"http/1.1",)
    elif ctx.options.h2bench_alpn == "upstream-h2":
        server.alpn_offers = (b"h2", b"http/1.1")
