"""The HTTP front (gateway/front/server.py): huge or endless request heads, slow bodies and connection floods are
cut off without stalling other clients, and a long streaming answer is never cut."""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
import time
from contextlib import closing

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.front.server import GatewayHttpProtocol, http_protocol
from gateway.settings import Settings
from tests.conftest import IDLE_WITHIN, MODEL, start_server, wait_for

TIMEOUT = 1.0  # header, body and keep-alive timeouts of the gateway under test
MAX_CONNECTIONS = 40
HEALTH_BOUND = 1.0  # seconds a concurrent GET /health may take while an attack is under way, on a loaded machine
CLOSE_MARGIN = 2.5  # seconds past a timeout within which the server must have closed, on a loaded machine
COUNT = [{"role": "user", "content": "Count to a thousand."}]


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("front"), {
        "LLM_HEADER_TIMEOUT": str(TIMEOUT), "LLM_BODY_TIMEOUT": str(TIMEOUT), "LLM_KEEPALIVE_TIMEOUT": str(TIMEOUT),
        "LLM_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    })  # fmt: skip
    yield server
    server.stop()


def address(server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def connect(server) -> socket.socket:
    sock = socket.create_connection(address(server), timeout=10)
    sock.settimeout(TIMEOUT + CLOSE_MARGIN + 5)  # a read that outlasts this means the server never closed
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection (a reset counts as closed)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def exchange(server, head: bytes) -> bytes:
    with closing(connect(server)) as sock:
        sock.sendall(head)
        return read_until_closed(sock)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def assert_openai_error(response: bytes, status: int, code: str) -> None:
    assert status_of(response) == status, response[:300]
    body = httpx.Response(status, content=response.split(b"\r\n\r\n", 1)[1]).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


class HealthWatch:
    """Polls GET /health on fresh connections while an attack runs; the slowest answer tells if the loop stalled."""

    def __init__(self, server):
        self.url = server.base_url + "/health"
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            assert httpx.get(self.url, timeout=10).status_code == 200
            self.latencies.append(time.monotonic() - started)
            time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        assert self.latencies, "/health never answered"
        assert max(self.latencies) < HEALTH_BOUND, f"/health took {max(self.latencies):.2f}s during the attack"


def head_with(*fields: bytes) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: gateway\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


MARKER = b"X-Attack-Marker"
HUGE_FIELDS = {
    "header": b"GET /health HTTP/1.1\r\nHost: gateway\r\n" + MARKER + b": ",
    # A chunked body's trailer fields are buffered by the parser like a head's.
    "trailer": b"POST /v1/embeddings HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + MARKER + b": ",
}  # fmt: skip


@pytest.mark.parametrize("where", HUGE_FIELDS)
def test_a_64_mb_field_is_refused_at_the_limit_without_stalling_others(front, where):
    outcome: dict[str, object] = {"seconds": float("inf"), "response": b""}

    def attack():
        started = time.monotonic()
        with closing(connect(front)) as sock:
            try:
                sock.sendall(HUGE_FIELDS[where] + b"a" * (64 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused (and closed) before the client finished sending
            outcome["response"] = read_until_closed(sock)
        outcome["seconds"] = time.monotonic() - started

    with HealthWatch(front):
        sender = threading.Thread(target=attack)
        sender.start()
        sender.join(timeout=60)
    assert outcome["seconds"] < 5, f"the server took {outcome['seconds']:.1f}s to refuse a 64 MB {where}"
    if outcome["response"]:  # a trailer is only cut off, and any answer can be lost to the reset of the close
        assert_openai_error(outcome["response"], 431, "request_header_fields_too_large")
    assert front.process.poll() is None
    assert MARKER.decode() not in front.log()


def test_header_bytes_up_to_the_limit_pass_and_beyond_get_431(front):
    within = exchange(front, head_with(b"X-Fill: " + b"a" * 60_000))
    assert status_of(within) == 200
    beyond = exchange(front, head_with(b"X-Fill: " + b"a" * 70_000))
    assert_openai_error(beyond, 431, "request_header_fields_too_large")


def test_too_many_header_fields_get_431(front):
    limit = Settings().max_headers
    at_limit = exchange(front, head_with(*(b"X-Field-%d: 1" % i for i in range(limit - 1))))  # Host is one
    assert status_of(at_limit) == 200
    over = exchange(front, head_with(*(b"X-Field-%d: 1" % i for i in range(limit))))
    assert_openai_error(over, 431, "request_header_fields_too_large")
    assert "X-Field-" not in front.log()


def test_half_sent_heads_are_closed_after_the_header_timeout(front):
    sockets = [connect(front) for _ in range(20)]
    started = time.monotonic()
    for sock in sockets:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Ty")
    with HealthWatch(front):
        answers = [read_until_closed(sock) for sock in sockets]
        waited = time.monotonic() - started
    for sock in sockets:
        sock.close()
    assert TIMEOUT * 0.9 < waited < TIMEOUT + CLOSE_MARGIN, f"closed after {waited:.1f}s"
    for answer in answers:
        assert_openai_error(answer, 408, "request_timeout")


def test_a_silent_connection_and_an_idle_kept_alive_one_are_closed(front):
    for first_request in (b"", head_with()):
        with closing(connect(front)) as sock:
            started = time.monotonic()
            sock.sendall(first_request)
            received = read_until_closed(sock)
            waited = time.monotonic() - started
        assert TIMEOUT * 0.9 < waited < TIMEOUT + CLOSE_MARGIN, f"closed after {waited:.1f}s"
        assert received.count(b"HTTP/1.1 200") == (1 if first_request else 0)


def test_a_stalled_body_is_cut_and_a_slow_steady_one_is_read(front):
    # A model that does not exist: the 404 naming it shows the whole body was read, without waiting on the engine.
    body = b'{"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
    with closing(connect(front)) as stalled:
        stalled.sendall(head + body[:10])
        started = time.monotonic()
        assert read_until_closed(stalled) == b""
        assert time.monotonic() - started < TIMEOUT + CLOSE_MARGIN
    with closing(connect(front)) as steady:
        steady.sendall(head)
        pieces = [body[i : i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
        for piece in pieces:  # in all longer than the body timeout, but never a pause as long
            time.sleep(TIMEOUT / 3)
            steady.sendall(piece)
        answer = read_until_closed(steady)
    assert_openai_error(answer, 404, "model_not_found")
    assert "Traceback" not in front.log()


def test_beyond_the_connection_limit_requests_get_503_and_service_recovers(front):
    idle = [connect(front) for _ in range(MAX_CONNECTIONS)]
    try:
        refused = httpx.get(front.base_url + "/health", timeout=10)
    finally:
        for sock in idle:
            sock.close()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert refused.headers["retry-after"] == "1"
    wait_for(
        lambda: front.get("/health").status_code == 200, IDLE_WITHIN, "still refusing after the idle connections closed"
    )


def test_a_long_streaming_answer_outlives_every_read_timeout(front):
    tokens = 64
    while True:  # longer answers until one outlasts the timeouts twice over, whatever this machine's speed
        started = time.monotonic()
        stream = front.client().chat.completions.create(
            model=MODEL, messages=COUNT, max_tokens=tokens, stream=True, extra_body={"ignore_eos": True}
        )
        finish_reasons = [choice.finish_reason for chunk in stream for choice in chunk.choices if choice.finish_reason]
        lasted = time.monotonic() - started
        assert finish_reasons == ["length"], f"a {tokens}-token answer ended after {lasted:.1f}s: {finish_reasons}"
        if lasted > 2 * TIMEOUT:
            return
        assert tokens < 2048, f"{tokens} tokens took {lasted:.1f}s: too short to show the timeouts leave it alone"
        tokens *= 2


def test_uvicorn_internals_the_front_relies_on_are_there():
    """gateway/front/server.py extends uvicorn's HttpToolsProtocol: fail loudly when a uvicorn release moves its
    parts."""

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    config = uvicorn.Config(app, http=http_protocol(Settings()), ws="none")
    config.load()
    assert issubclass(config.http_protocol_class, GatewayHttpProtocol)
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={},
                                          _loop=asyncio.new_event_loop())  # fmt: skip
    for attribute in ("app", "config", "cycle", "connections", "loop", "transport", "timeout_keep_alive"):
        assert hasattr(protocol, attribute), attribute
    for callback in ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_header",
                     "on_headers_complete", "on_body", "on_message_complete", "send_400_response"):  # fmt: skip
        assert callback in vars(HttpToolsProtocol), callback
    assert "send_400_response" in inspect.getsource(HttpToolsProtocol.data_received)
    assert {"response_complete", "waiting_for_100_continue"} <= set(vars(RequestResponseCycle(
        scope={}, transport=None, flow=None, logger=None, access_logger=None, access_log=False, default_headers=[],
        message_event=None, expect_100_continue=False, keep_alive=True, on_response=lambda: None,
    )))  # fmt: skip
    assert "read_paused" in vars(FlowControl(None))
