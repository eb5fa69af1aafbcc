"""The one seam between the gateway and remote HTTP providers: a shared, pooled client.

Remote targets only call `HttpClient.post` and read the `UpstreamResponse` it yields, so the library
behind it can change without touching routing. Implementations are picked by name (LLM_HTTP_CLIENT);
docs/BENCHMARKS.md has the relay overhead measured for each.
"""

from __future__ import annotations

import contextlib
import functools
from typing import AsyncContextManager, AsyncIterator, Callable, Mapping, Protocol

import aiohttp
import httpx

from gateway import http1

POOL_CONNECTIONS = 512  # open connections across all providers
POOL_KEEPALIVE = 64  # idle connections kept for reuse


class UpstreamUnavailable(Exception):
    """The provider could not be reached, or stopped answering (refused, reset, timed out)."""

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def lines(self) -> AsyncIterator[str]: ...


class HttpClient(Protocol):
    def post(
        self, url: str, body: bytes, headers: dict[str, str], connect_timeout: float, read_timeout: float
    ) -> AsyncContextManager[UpstreamResponse]:
        """POST a JSON body (encoded); the response body is read lazily inside the context, closed when it exits."""
        ...

    async def close(self) -> None: ...


class _HttpxResponse:
    def __init__(self, response: httpx.Response):
        self._response = response
        self.status = response.status_code
        self.headers = response.headers

    async def read(self) -> bytes:
        return await self._response.aread()

    def lines(self) -> AsyncIterator[str]:
        return self._response.aiter_lines()


class HttpxClient:
    def __init__(self) -> None:
        limits = httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE)
        self._client = httpx.AsyncClient(limits=limits)

    @contextlib.asynccontextmanager
    async def post(self, url, body, headers, connect_timeout, read_timeout) -> AsyncIterator[_HttpxResponse]:
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        try:
            async with self._client.stream("POST", url, content=body, headers=headers, timeout=timeout) as response:
                yield _HttpxResponse(response)
        except httpx.TimeoutException as error:
            raise UpstreamUnavailable(f"{url} timed out ({type(error).__name__})", timed_out=True) from error
        except httpx.TransportError as error:
            raise UpstreamUnavailable(f"{url} could not be reached ({type(error).__name__})") from error

    async def close(self) -> None:
        await self._client.aclose()


class _AiohttpResponse:
    def __init__(self, response):
        self._response = response
        self.status = response.status
        self.headers = response.headers

    async def read(self) -> bytes:
        return await self._response.read()

    async def lines(self) -> AsyncIterator[str]:
        async for line in self._response.content:
            yield line.decode().rstrip("\r\n")


class AiohttpClient:
    """aiohttp's client: less CPU per request than httpx (docs/BENCHMARKS.md), same behaviour."""

    def __init__(self) -> None:
        connector = aiohttp.TCPConnector(limit=POOL_CONNECTIONS, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector)

    def post(self, url, body, headers, connect_timeout, read_timeout) -> _Exchange:
        timeout = _client_timeout(connect_timeout, read_timeout)
        request = self._session.post(url, data=body, headers=headers, timeout=timeout)
        return _Exchange(url, request, _AiohttpResponse, (aiohttp.ClientError, TimeoutError))

    async def close(self) -> None:
        await self._session.close()


class Http1Client:
    """`gateway.http1`: the least CPU and time per relayed request of the three (docs/BENCHMARKS.md)."""

    def __init__(self) -> None:
        self._pool = http1.Pool(POOL_CONNECTIONS)

    def post(self, url, body, headers, connect_timeout, read_timeout) -> _Exchange:
        request = self._pool.post(url, body, headers, connect_timeout, read_timeout)
        return _Exchange(url, request, _as_is, (OSError, TimeoutError))

    async def close(self) -> None:
        await self._pool.close()


class _Exchange:
    """A client's POST context with its failures as UpstreamUnavailable, on the way in or while the body is
    read. (A class: a generator-based context manager cost four times as much.)"""

    def __init__(self, url: str, request, wrap: Callable, failures: tuple[type[BaseException], ...]):
        self._url, self._request, self._wrap, self._failures = url, request, wrap, failures

    async def __aenter__(self) -> UpstreamResponse:
        try:
            return self._wrap(await self._request.__aenter__())
        except self._failures as error:
            raise self._unavailable(error) from error

    async def __aexit__(self, kind, error, traceback) -> None:
        await self._request.__aexit__(kind, error, traceback)
        if isinstance(error, self._failures):
            raise self._unavailable(error) from error

    def _unavailable(self, error: BaseException) -> UpstreamUnavailable:
        if isinstance(error, TimeoutError):  # aiohttp's ServerTimeoutError is one too
            return UpstreamUnavailable(f"{self._url} timed out ({type(error).__name__})", timed_out=True)
        return UpstreamUnavailable(f"{self._url} could not be reached ({type(error).__name__})")


def _as_is(response: UpstreamResponse) -> UpstreamResponse:
    return response


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """One (immutable) timeout object per target's settings, not one per request."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


HTTP_CLIENTS: dict[str, Callable[[], HttpClient]] = {
    "http1": Http1Client,
    "aiohttp": AiohttpClient,
    "httpx": HttpxClient,
}


def create_http_client(name: str) -> HttpClient:
    try:
        return HTTP_CLIENTS[name]()
    except KeyError:
        raise ValueError(f"unknown HTTP client {name!r}; choose one of: {', '.join(sorted(HTTP_CLIENTS))}") from None
