"""Hardening of the upstream client: a real gateway relaying to a raw HTTP/1.1 server started here
(tests/upstream.py `RawUpstream`) that misbehaves as no framework would, and the three clients of the seam
(gateway/upstream/client.py) against loopback servers and a loopback proxy.

Each test reproduces the attack and asserts the safe outcome: every client gets its own answer, a request
reaches the provider once, a response past a limit is a 502 (never a 500, never the gateway's memory), a
proxy the environment names is used unless NO_PROXY says otherwise, and a compressed answer is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from gateway.upstream.client import HTTP_CLIENTS, Limits, UpstreamUnavailable
from gateway.upstream.http1 import SETTLE_S
from tests.conftest import start_server
from tests.upstream import RawRequest, RawUpstream, raw_completion

BIG = 200 * 1000 * 1000  # bytes of the body no provider should be able to make the gateway hold
HEALTH_WITHIN_S = 1.0  # the event loop answers /health within this while a bad answer is being read


def _marker(request: RawRequest) -> str:
    return request.json()["messages"][0]["content"]


async def _send(writer, *parts: bytes, pause: float = 0.0) -> None:
    """Each part in its own packet, `pause` seconds apart."""
    for part in parts:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(pause)


async def interim_then_answer(request: RawRequest, writer) -> bool:
    """100 Continue and 103 Early Hints, each on its own, before the answer."""
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    await _send(writer, b"HTTP/1.1 100 Continue\r\n\r\n", hints, raw_completion(f"answer to {_marker(request)}"),
                pause=0.05)  # fmt: skip
    return True


async def answer_and_more(request: RawRequest, writer) -> bool:
    """The answer and, in the same packet, a whole second response nobody asked for."""
    await _send(writer, raw_completion(f"answer to {_marker(request)}") + raw_completion("smuggled"))
    return True


async def endless_chunks(request: RawRequest, writer) -> bool:
    """A 200 whose chunked body would reach BIG bytes."""
    chunk = 1 << 20
    await _send(writer, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(BIG // chunk):
        await _send(writer, b"%x\r\n%s\r\n" % (chunk, b" " * chunk))
    return False


async def huge_length(request: RawRequest, writer) -> bool:
    """A 200 that announces BIG bytes, sends one MiB of them and waits."""
    await _send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (BIG, b" " * (1 << 20)))
    await asyncio.sleep(30)
    return False


async def endless_line(request: RawRequest, writer) -> bool:
    """An event stream whose first line never ends (or, for `lateline`, its second): 64 MiB of it, then it
    waits."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    await _send(writer, head)
    if request.name == "lateline":
        event = b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": ' \
                b'[{"index": 0, "delta": {"content": "first"}, "finish_reason": null}]}\n\n'  # fmt: skip
        await _send(writer, b"%x\r\n%s\r\n" % (len(event), event))
    await _send(writer, b'%x\r\ndata: {"x": "\r\n' % len(b'data: {"x": "'))
    for _ in range(256):
        await _send(writer, b"%x\r\n%s\r\n" % (1 << 18, b"x" * (1 << 18)))
    await asyncio.sleep(30)
    return False


async def drop_the_second(request: RawRequest, writer) -> bool:
    """Answers the first request of a connection; reads the second, then closes without a word."""
    if request.index == 0:
        await _send(writer, raw_completion(f"answer to {_marker(request)}"))
        return True
    return False


async def drop(request: RawRequest, writer) -> bool:
    return False  # read, never answered


async def gzipped(request: RawRequest, writer) -> bool:
    """The answer gzip-compressed (though the gateway asks for none)."""
    plain = raw_completion(f"answer to {_marker(request)}")
    head, body = plain.split(b"\r\n\r\n", 1)
    packed = gzip.compress(body)
    length = b"Content-Length: %d" % len(packed)
    head = head.replace(b"Content-Length: %d" % len(body), length + b"\r\nContent-Encoding: gzip")
    await _send(writer, head + b"\r\n\r\n" + packed)
    return True


async def brotli(request: RawRequest, writer) -> bool:
    """A body in an encoding the gateway cannot decode."""
    await _send(writer, b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\n\x8b\x02\x80\x00")
    return True


MODES = {
    "interim": interim_then_answer, "trailing": answer_and_more, "endless": endless_chunks, "huge": huge_length,
    "longline": endless_line, "lateline": endless_line, "dropsecond": drop_the_second, "drop": drop,
    "gzip": gzipped, "brotli": brotli,
}  # fmt: skip


@pytest.fixture(scope="module")
def raw():
    upstream = RawUpstream(MODES).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, raw):
    """A gateway whose every model is one target on the raw server (no local model: nothing to load),
    with the default retry policy (two tries a target)."""
    folder = tmp_path_factory.mktemp("hardening-upstream")
    targets = {name: {"type": "openai", "base_url": raw.base_url(name), "model": "m"} for name in MODES}
    config = {"targets": targets, "models": {name: {"targets": [name]} for name in MODES}}
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
    server = start_server(folder, {"LLM_CONFIG": str(folder / "gateway.yaml")})
    yield server
    server.stop()


def _chat(gateway, model: str, content: str = "hi", stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    return httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=60)


def _answer(gateway, model: str, content: str) -> str:
    response = _chat(gateway, model, content)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _assert_upstream_error(response: httpx.Response, status: int = 502) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_unavailable"
    assert "127.0.0.1" not in response.text  # where a provider is goes to the log, never to clients
    return error


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


@contextlib.contextmanager
def _health_watch(gateway):
    """Polls /health on a thread while the block runs; yields the list of its answer times (seconds)."""
    times: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                client.get(gateway.base_url + "/health")
                times.append(time.monotonic() - started)
                time.sleep(0.05)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join()


# ---- one client's answer never reaches another ------------------------------------------------------


def test_interim_responses_are_skipped_and_each_client_gets_its_own_answer(gateway, raw):
    """Interim 100 and 103 before each answer, on one reused connection: the old client took the 100 for
    the whole answer (an empty 200 for A) and handed A's completion to B."""
    for client in ("client A", "client B", "client C"):
        assert _answer(gateway, "interim", client) == f"answer to {client}"
        time.sleep(SETTLE_S * 2)  # until the idle connection may be reused
    assert raw.connections["interim"] == 1  # the answers came over one kept-alive connection


def test_bytes_after_a_response_close_the_connection(gateway, raw):
    """A second response sent after the first, unasked: never taken as the next request's answer."""
    assert _answer(gateway, "trailing", "client A") == "answer to client A"
    assert _answer(gateway, "trailing", "client B") == "answer to client B"
    assert raw.connections["trailing"] == 2  # the first connection was closed, not pooled


# ---- no replay -------------------------------------------------------------------------------------


def test_a_request_dropped_unanswered_on_a_reused_connection_is_not_sent_again(gateway, raw):
    assert _answer(gateway, "dropsecond", "first") == "answer to first"
    time.sleep(SETTLE_S * 2)  # until the idle connection may be reused
    _assert_upstream_error(_chat(gateway, "dropsecond", "the second"))
    assert raw.requests["dropsecond"] == 2  # the second reached it once: neither the client nor a retry resent it
    assert _answer(gateway, "dropsecond", "third") == "answer to third"  # on a new connection
    assert (raw.requests["dropsecond"], raw.connections["dropsecond"]) == (3, 2)
    assert "the second" not in gateway.log()


def test_a_request_dropped_unanswered_is_sent_once(gateway, raw):
    _assert_upstream_error(_chat(gateway, "drop", "once only"))
    assert raw.requests["drop"] == 1
    assert raw.base_url("drop") in gateway.log()  # the operator learns where the failing provider is


# ---- bounds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["endless", "huge"])
def test_a_huge_answer_is_a_502_not_the_gateways_memory(gateway, raw, model):
    """200 MB, chunked or announced by Content-Length: refused past LLM_UPSTREAM_MAX_BODY_BYTES (32 MiB) with
    the gateway's peak memory far below the body's size, and /health answering meanwhile."""
    pid = gateway.process.pid
    resident_before = _rss_kib(pid, "VmRSS")
    with _health_watch(gateway) as health_times:
        error = _assert_upstream_error(_chat(gateway, model))
    assert "the response body" in error["message"] and "exceeds" in error["message"]
    grown_mib = (_rss_kib(pid, "VmHWM") - resident_before) / 1024
    assert grown_mib < 100, f"peak memory grew {grown_mib:.0f} MiB for a {BIG // 10**6} MB answer"
    assert max(health_times, default=0) < HEALTH_WITHIN_S
    assert raw.requests[model] == 1


def test_an_endless_line_in_a_stream_is_a_502(gateway, raw):
    """A stream's line past LLM_UPSTREAM_MAX_LINE_BYTES (1 MiB) fails before it is held whole."""
    pid = gateway.process.pid
    resident_before = _rss_kib(pid, "VmRSS")
    with _health_watch(gateway) as health_times:
        error = _assert_upstream_error(_chat(gateway, "longline", stream=True))
    assert "a line of the response exceeds" in error["message"]
    assert (_rss_kib(pid, "VmHWM") - resident_before) / 1024 < 50
    assert max(health_times, default=0) < HEALTH_WITHIN_S


def test_an_endless_line_after_the_first_chunk_ends_the_stream_with_an_error_event(gateway):
    body = {"model": "lateline", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "first"
    error = json.loads(events[1])["error"]
    assert error["code"] == "upstream_unavailable" and "a line of the response exceeds" in error["message"]
    assert events[2:] == ["[DONE]"]


# ---- content encodings -----------------------------------------------------------------------------


def test_a_gzip_answer_is_decoded(gateway):
    assert _answer(gateway, "gzip", "client A") == "answer to client A"
    assert _answer(gateway, "gzip", "client B") == "answer to client B"


def test_an_answer_in_an_unknown_encoding_is_a_502(gateway):
    error = _assert_upstream_error(_chat(gateway, "brotli"))
    assert "Content-Encoding" in error["message"]


# ---- every client of the seam alike -----------------------------------------------------------------

CLIENTS = sorted(HTTP_CLIENTS)
SMALL = Limits(body_bytes=64 * 1024, line_bytes=16 * 1024)


@contextlib.asynccontextmanager
async def _origin(handler, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    try:
        yield f"{'https' if tls else 'http'}://{host}:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    finally:
        server.close()


def _answering(*answers: bytes):
    """A connection handler that answers each request with the next of `answers`; it records the heads."""
    heads: list[bytes] = []

    async def handler(reader, writer):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for answer in answers:
                request = await RawRequest.read(reader, 0)
                if request is None:
                    break
                heads.append(request.head)
                await _send(writer, answer)
        writer.close()

    handler.heads = heads
    return handler


async def _post(client, url: str, stream: bool = False):
    async with client.post(url, b'{"model": "m"}', {"Content-Type": "application/json"}, 2.0, 5.0) as response:
        return response.status, [line async for line in response.lines()] if stream else await response.read()


def _http(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(h + b"\r\n" for h in headers),
                                                                  body)  # fmt: skip


@pytest.mark.parametrize("name", CLIENTS)
def test_every_client_asks_for_identity_and_decodes_gzip(name):
    async def main():
        handler = _answering(_http(gzip.compress(b'{"ok": true}'), b"Content-Encoding: gzip"),
                             _http(b"junk", b"Content-Encoding: zstd"))  # fmt: skip
        async with _origin(handler) as url:
            client = HTTP_CLIENTS[name](SMALL)
            try:
                assert await _post(client, url) == (200, b'{"ok": true}')
                await asyncio.sleep(SETTLE_S * 2)  # the next request on the same connection
                with pytest.raises(UpstreamUnavailable):  # an encoding none of them decodes: a 502, not garbage
                    await _post(client, url)
            finally:
                await client.close()
        assert all(b"\r\naccept-encoding: identity\r\n" in head.lower() for head in handler.heads)

    asyncio.run(main())


@pytest.mark.parametrize("name", CLIENTS)
@pytest.mark.parametrize(
    ("answer", "stream"),
    [
        (_http(b"x" * (SMALL.body_bytes + 1)), False),  # announced by its length
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"4000\r\n%s\r\n" % (b"x" * 0x4000) * 5, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n%s\r\n" % (b"x" * 0x1000) * 5, True),
    ],
    ids=["body-by-length", "body-by-chunks", "line"],
)
def test_every_client_bounds_the_response(name, answer, stream):
    async def main():
        async with _origin(_answering(answer)) as url:
            client = HTTP_CLIENTS[name](SMALL)
            try:
                with pytest.raises(UpstreamUnavailable, match="exceeds") as raised:
                    await _post(client, url, stream)
            finally:
                await client.close()
        assert raised.value.sent and not raised.value.timed_out  # it may have been processed: not to resend

    asyncio.run(main())


# ---- proxies ---------------------------------------------------------------------------------------


class _Proxy:
    """A forward proxy (absolute-form requests) and CONNECT tunnel on loopback; `seen` holds request lines."""

    def __init__(self):
        self.seen: list[str] = []

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
        self.seen.append(f"{method} {target}")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target)
            upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
            upstream_writer.write(head.replace(target.encode(), url.path.encode(), 1))  # in origin form
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader, writer) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


# aiohttp reads its CA certificates once, when imported: the test's CA cannot reach it, so https is left out.
PROXIED = [(name, scheme) for name in CLIENTS for scheme in ("http", "https") if (name, scheme) != ("aiohttp", "https")]


@pytest.mark.parametrize(("name", "scheme"), PROXIED)
@pytest.mark.parametrize("no_proxy", [None, "example.com", "localhost,127.0.0.1"])
def test_the_environments_proxy_is_used_unless_no_proxy_matches(name, scheme, no_proxy, tls_server_context,
                                                                 monkeypatch):  # fmt: skip
    proxy = _Proxy()

    async def main():
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        if no_proxy:
            monkeypatch.setenv("NO_PROXY", no_proxy)
        tls = tls_server_context if scheme == "https" else None
        async with _origin(_answering(_http(b'{"ok": true}')), tls, host="localhost") as url:
            client = HTTP_CLIENTS[name](SMALL)  # the environment is read as the client is made
            try:
                assert await _post(client, url) == (200, b'{"ok": true}')
            finally:
                await client.close()
                server.close()
        return url

    url = asyncio.run(main())
    if no_proxy and "localhost" in no_proxy:
        assert proxy.seen == []
    elif scheme == "https":
        assert proxy.seen == [f"CONNECT localhost:{urlsplit(url).port}"]
    else:
        assert proxy.seen == [f"POST {url}"]
