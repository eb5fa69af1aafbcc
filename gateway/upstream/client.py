"""The one seam between the gateway and remote HTTP providers: a shared, pooled client.

Remote targets only call `HttpClient.post` and read the `UpstreamResponse` it yields, so the library
behind it can change without touching routing. Implementations are picked by name (LLM_HTTP_CLIENT);
docs/design/http1-client.md compares their CPU per request. All three behave alike:
- A response is bounded (`Limits`: a body read whole, a line of a stream); beyond, UpstreamUnavailable (502).
- They ask for `Accept-Encoding: identity`, decode gzip and deflate if sent anyway, and refuse any other
  Content-Encoding (502) rather than relay an undecoded body.
- A request that may have reached the provider is never sent again by the client (`UpstreamUnavailable.sent`
  tells the caller whether it may be).
- Proxies: HTTPS_PROXY, HTTP_PROXY and ALL_PROXY (or their lower-case forms), read when the client is made,
  apply to a URL unless NO_PROXY matches its host (urllib's rules, decided once per URL); http:// and https://
  proxies only (SOCKS is not supported). httpx follows them itself; aiohttp is handed the proxy per request;
  the own client (`gateway.http1`, which speaks no proxy protocol) sends a request that goes through a proxy
  by httpx (CONNECT for https), the others directly.
"""

from __future__ import annotations

import functools
import urllib.request
from dataclasses import dataclass
from typing import AsyncContextManager, AsyncIterator, Callable, Mapping, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx

from gateway.upstream import http1
from gateway.upstream.http1 import Limits, UnusableResponse, decoding, read_whole, split_lines

POOL_CONNECTIONS = 512  # open connections across all providers
POOL_KEEPALIVE = 64  # idle connections kept for reuse
IDENTITY = {"Accept-Encoding": "identity"}  # no compressed answers: nothing to inflate before relaying


class UpstreamUnavailable(Exception):
    """The provider could not be reached, stopped answering (refused, reset, timed out), or answered
    something unusable (too large, malformed)."""

    def __init__(self, message: str, *, timed_out: bool = False, sent: bool = True):
        super().__init__(message)
        self.timed_out = timed_out
        self.sent = sent  # the request may have reached the provider: not to be sent to it again


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


@dataclass(frozen=True)
class _Failures:
    """A library's failures, and which of them say what."""

    every: tuple[type[BaseException], ...]
    timeouts: tuple[type[BaseException], ...]
    unsent: tuple[type[BaseException], ...]  # no connection was made: the request never left


HTTP1_FAILURES = _Failures((OSError, TimeoutError), (TimeoutError,), (http1.ConnectFailed,))
AIOHTTP_FAILURES = _Failures(
    (aiohttp.ClientError, TimeoutError, UnusableResponse), (TimeoutError,),  # ServerTimeoutError is one
    (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError),
)  # fmt: skip
HTTPX_FAILURES = _Failures(
    (httpx.TransportError, UnusableResponse), (httpx.TimeoutException,),
    (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError, httpx.UnsupportedProtocol),
)  # fmt: skip


class _Bounded:
    """An httpx or aiohttp response read with `gateway.http1`'s bounds and encodings, so all clients agree."""

    def __init__(self, status: int, headers: Mapping[str, str], chunks: Callable[[], AsyncIterator[bytes]],
                 limits: Limits):  # fmt: skip
        if "content-encoding" in headers:  # httpx passes one it does not know through undecoded
            decoding(headers["content-encoding"])
        self.status, self.headers, self._chunks, self._limits = status, headers, chunks, limits

    async def read(self) -> bytes:
        return await read_whole(self._chunks(), self._limits.body_bytes, self.headers.get("content-length"))

    def lines(self) -> AsyncIterator[str]:
        return split_lines(self._chunks(), self._limits.line_bytes)


class HttpxClient:
    def __init__(self, limits: Limits = Limits(), proxy: str | None = None) -> None:
        """Through `proxy`, or the environment's proxies (httpx reads them) when it is None."""
        pool = httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE)
        self._client = httpx.AsyncClient(limits=pool, headers=IDENTITY, proxy=proxy)
        self._limits = limits

    def post(self, url, body, headers, connect_timeout, read_timeout) -> _Exchange:
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        request = self._client.stream("POST", url, content=body, headers=headers, timeout=timeout)
        return _Exchange(request, self._wrap, HTTPX_FAILURES)

    def _wrap(self, response: httpx.Response) -> _Bounded:
        return _Bounded(response.status_code, response.headers, response.aiter_bytes, self._limits)

    async def close(self) -> None:
        await self._client.aclose()


class AiohttpClient:
    """aiohttp's client: less CPU per request than httpx, same behaviour."""

    def __init__(self, limits: Limits = Limits()) -> None:
        connector = aiohttp.TCPConnector(limit=POOL_CONNECTIONS, keepalive_timeout=30)
        # Not trust_env: it reads ~/.netrc on every request; the proxy is handed to each request instead.
        self._session = aiohttp.ClientSession(connector=connector, headers=IDENTITY)
        self._limits = limits
        self._proxies = _EnvironmentProxies()

    def post(self, url, body, headers, connect_timeout, read_timeout) -> _Exchange:
        timeout = _client_timeout(connect_timeout, read_timeout)
        proxy = self._proxies.for_url(url) if self._proxies.named else None
        request = self._session.post(url, data=body, headers=headers, timeout=timeout, proxy=proxy)
        return _Exchange(request, self._wrap, AIOHTTP_FAILURES)

    def _wrap(self, response: aiohttp.ClientResponse) -> _Bounded:
        return _Bounded(response.status, response.headers, response.content.iter_any, self._limits)

    async def close(self) -> None:
        await self._session.close()


class Http1Client:
    """`gateway.http1`: the least CPU and time per relayed request of the three (docs/design/http1-client.md)."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self._pool = http1.Pool(POOL_CONNECTIONS, limits)
        self._limits = limits
        self._proxies = _EnvironmentProxies()
        self._through: dict[str, HttpxClient] = {}  # proxy URL -> the client that goes through it

    def post(self, url, body, headers, connect_timeout, read_timeout):
        if self._proxies.named and (proxy := self._proxies.for_url(url)):
            return self._proxied(proxy).post(url, body, headers, connect_timeout, read_timeout)
        request = self._pool.post(url, body, headers, connect_timeout, read_timeout)
        return _Exchange(request, _as_is, HTTP1_FAILURES)

    def _proxied(self, proxy: str) -> HttpxClient:
        client = self._through.get(proxy)
        if client is None:
            client = self._through[proxy] = HttpxClient(self._limits, proxy)
        return client

    async def close(self) -> None:
        await self._pool.close()
        for client in self._through.values():
            await client.close()


class _EnvironmentProxies:
    """The environment's proxies as read when made: which one, if any, a URL goes through."""

    def __init__(self) -> None:
        proxies = urllib.request.getproxies_environment()  # scheme -> proxy URL, and "no": NO_PROXY
        self._proxies = {
            scheme: url for scheme, url in proxies.items() if scheme == "no" or url.startswith(("http://", "https://"))
        }  # fmt: skip
        self._for: dict[str, str | None] = {}  # URL -> its proxy
        self.named = bool(self._proxies.keys() - {"no"})  # when none is, a request costs only this test

    def for_url(self, url: str) -> str | None:
        try:
            return self._for[url]
        except KeyError:
            parts = urlsplit(url)
            proxy = self._proxies.get(parts.scheme) or self._proxies.get("all")
            if proxy and urllib.request.proxy_bypass_environment(parts.netloc.rsplit("@", 1)[-1], self._proxies):
                proxy = None
            self._for[url] = proxy
            return proxy


class _Exchange:
    """A client's POST context with its failures as UpstreamUnavailable, on the way in or while the body is
    read. (A class: a generator-based context manager costs more per request.)"""

    def __init__(self, request, wrap: Callable, failures: _Failures):
        self._request, self._wrap, self._failures = request, wrap, failures

    async def __aenter__(self) -> UpstreamResponse:
        try:
            response = await self._request.__aenter__()
        except self._failures.every as error:
            raise self._unavailable(error) from error
        try:
            return self._wrap(response)
        except UnusableResponse as error:
            await self._request.__aexit__(type(error), error, error.__traceback__)
            raise self._unavailable(error) from error

    async def __aexit__(self, kind, error, traceback) -> None:
        await self._request.__aexit__(kind, error, traceback)
        if isinstance(error, self._failures.every):
            raise self._unavailable(error) from error

    def _unavailable(self, error: BaseException) -> UpstreamUnavailable:
        sent = not isinstance(error, self._failures.unsent)
        if isinstance(error, UnusableResponse):
            return UpstreamUnavailable(f"sent an unusable response: {error}")
        if isinstance(error, self._failures.timeouts):
            return UpstreamUnavailable(f"timed out ({type(error).__name__})", timed_out=True, sent=sent)
        return UpstreamUnavailable(f"could not be reached ({type(error).__name__})", sent=sent)


def _as_is(response: UpstreamResponse) -> UpstreamResponse:
    return response


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """One (immutable) timeout object per target's settings, not one per request."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


HTTP_CLIENTS: dict[str, Callable[..., HttpClient]] = {
    "http1": Http1Client,
    "aiohttp": AiohttpClient,
    "httpx": HttpxClient,
}


def create_http_client(name: str, limits: Limits = Limits()) -> HttpClient:
    try:
        return HTTP_CLIENTS[name](limits)
    except KeyError:
        raise ValueError(f"unknown HTTP client {name!r}; choose one of: {', '.join(sorted(HTTP_CLIENTS))}") from None
