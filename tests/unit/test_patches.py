"""addons/patches.py: the per-flow body caps and the budget of all flows, driven with the
events mitmproxy's HTTP layer feeds its body states (a stand-in for the layer itself)."""

import json
import weakref
from types import SimpleNamespace

import pytest
from mitmproxy.proxy.layers import http as layers_http
from mitmproxy.test import tflow

from regrewrite.addons import patches


class Stream:
    """What the patched states use of mitmproxy's HttpStream."""

    def __init__(self, cap: int, request: bool = True):
        self.flow = tflow.tflow()
        self.flow.metadata[patches.REQUEST_CAP if request else patches.RESPONSE_CAP] = cap
        self.request_body_buf = bytearray()
        self.response_body_buf = bytearray()
        self.stream_id = 1
        self.context = SimpleNamespace(client="client", server="server")
        self.state_errored = "errored"
        self.client_state = self.server_state = "consuming"
        self.passed = []


def original(self, event):
    self.passed.append(event)
    yield from ()


state_request = patches._capped(original, True)
state_response = patches._capped(original, False)


def feed(stream, state, *chunks, request=True):
    data = layers_http.RequestData if request else layers_http.ResponseData
    out = []
    for chunk in chunks:
        out += list(state(stream, data(1, chunk)))
    return out


def sent_error(commands):
    (send,) = [c for c in commands if isinstance(c, layers_http.SendHttp)][:1]
    return send.event.code, json.loads(send.event.message)["errors"][0]


@pytest.mark.parametrize("side", ["request", "response"])
def test_under_the_cap_the_patch_buffers_and_nothing_streams(side):
    # mitmproxy's own body states apply stream_large_bodies as the buffer grows and start
    # streaming: a 5 MiB _catalog went to the client unfiltered and a token form to the
    # upstream's /auth (e2e). Under a cap the patched state buffers the data itself.
    request = side == "request"
    s = Stream(cap=10, request=request)
    state = state_request if request else state_response
    assert feed(s, state, b"abcd", b"efgh", request=request) == []
    buf = s.request_body_buf if request else s.response_body_buf
    assert buf == b"abcdefgh" and s.passed == []  # never the original's


def test_over_the_flows_cap_the_client_gets_413_and_the_buffer_is_dropped():
    s = Stream(cap=10)
    commands = feed(s, state_request, b"abcdef", b"ghijkl")
    code, error = sent_error(commands)
    assert code == layers_http.ErrorCode.REQUEST_TOO_LARGE and error["code"] == "SIZE_INVALID"
    assert s.request_body_buf == b"" and s.client_state == "errored" and not s.flow.live


def test_over_the_budget_of_all_flows_the_next_flow_gets_502(monkeypatch):
    monkeypatch.setattr(patches, "BUFFER_BUDGET", 100)
    monkeypatch.setattr(patches, "_buffering", weakref.WeakSet())  # other tests' streams
    first, second = Stream(cap=80, request=False), Stream(cap=80, request=False)
    assert feed(first, state_response, b"x" * 70, request=False) == []
    assert patches.buffered() == 70
    commands = feed(second, state_response, b"y" * 40, request=False)
    code, error = sent_error(commands)
    assert code == layers_http.ErrorCode.GENERIC_SERVER_ERROR
    assert error["code"] == "UNAVAILABLE" and "retry" in error["message"]
    assert second.server_state == "errored"  # the upstream is let go, not read further
    # Once the first flow's body is handed on, its bytes no longer count.
    first.response_body_buf.clear()
    third = Stream(cap=80, request=False)
    assert feed(third, state_response, b"z" * 60, request=False) == []


def test_bodies_waiting_for_their_rewrite_count_against_the_budget(monkeypatch):
    # Bodies read in full and queued for the two rewrite workers are still in memory:
    # arrivals after them must not pile up without bound.
    monkeypatch.setattr(patches, "BUFFER_BUDGET", 100)
    monkeypatch.setattr(patches, "_buffering", weakref.WeakSet())
    with patches.holding(70):
        assert patches.buffered() == 70
        code, _ = sent_error(
            feed(Stream(cap=80, request=False), state_response, b"y" * 40, request=False)
        )
        assert code == layers_http.ErrorCode.GENERIC_SERVER_ERROR
    assert patches.buffered() == 0  # given back once the rewrite is done
    assert feed(Stream(cap=80, request=False), state_response, b"z" * 40, request=False) == []
    with pytest.raises(ValueError), patches.holding(50):
        raise ValueError("a rewrite that failed")
    assert patches.buffered() == 40  # (the stream above, still buffering)


@pytest.mark.parametrize("event", [layers_http.RequestEndOfMessage(1)])
def test_other_events_go_to_mitmproxys_own_state(event):
    s = Stream(cap=10)
    assert list(state_request(s, event)) == []
    assert s.passed == [event]
