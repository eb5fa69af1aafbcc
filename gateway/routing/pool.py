"""Engine pools: a remote target served by several servers of one model (`endpoints`), each request sent to one.

How an endpoint is picked (`balance`):
- `affinity`: requests of one conversation go to one endpoint, whose prompt cache holds its earlier turns.
  Rendezvous hashing (highest weighted score) on a digest of the conversation's opening (`prefix_digest`), with
  bounded loads: an endpoint already holding its bound, `load_factor` times its weighted share of the requests in
  flight (this one counted), is passed over for the conversation's next endpoint in the same order. So no hot
  prefix pins one endpoint, and each conversation keeps a stable second choice. A request without a prompt
  (embeddings, rerank) is balanced by least outstanding requests.
- `least_outstanding`: the fewest requests in flight for its weight; ties go to a random one.
- `round_robin`: smooth weighted round robin (nginx's).

Which endpoints may be picked: passive ejection (`eject_after` consecutive failed requests eject one for
`eject_seconds`; one failure right after its return ejects it again, as a target's cooldown does), and active
health checks (a GET of `health_path` every `health_interval` seconds: a failed one marks the endpoint down, a
passing one brings it back). An endpoint back from either takes a growing share of the requests, from
`MIN_SHARE` of its weight to all of it over `slow_return_seconds`. The checks use httpx rather than the upstream
seam: they are GETs, not relays, and read no body.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic_core import to_json

from gateway.routing.config import PoolPolicy
from gateway.telemetry.metrics import EndpointCounts

log = logging.getLogger(__name__)
MIN_SHARE = 0.1  # of its weight, an endpoint just back takes at first
Balance = Literal["affinity", "least_outstanding", "round_robin"]
# Per provider endpoint, the fields that open a conversation: what every later turn of it repeats.
PROMPT_FIELDS = {
    "chat/completions": ("messages",),
    "completions": ("prompt",),
    "messages": ("system", "messages"),
    "responses": ("instructions", "input"),
    "rerank": ("query",),
}


@dataclass(eq=False)
class Endpoint:
    index: int  # its place in the target's list: what /metrics calls it (URLs stay out of what every client reads)
    url: str  # the base URL requests go under
    weight: float
    health_url: str = ""
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    ejections: int = 0
    consecutive: int = 0  # failures since its last success
    ejected_until: float = 0.0
    down: bool = False  # its last health check failed
    back_since: float = -math.inf  # when it last came back: its share grows from there
    current: float = 0.0  # smooth weighted round robin's running score
    salt: bytes = field(init=False)  # rendezvous hashing's: from the URL, so replicas and restarts agree

    def __post_init__(self) -> None:
        self.salt = self.url.encode()

    def available(self, now: float) -> bool:
        return not self.down and now >= self.ejected_until

    def state(self, now: float, slow_return: float) -> str:
        if self.down:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        return "returning" if now - self.back_since < slow_return else "up"


class Pool:
    def __init__(self, target: str, endpoints: list[Endpoint], balance: Balance, policy: PoolPolicy,
                 headers: dict[str, str]):  # fmt: skip
        self.target, self.endpoints, self.balance, self.policy = target, endpoints, balance, policy
        self.headers = headers  # what a health check sends: the target's own (its key, for `models`)
        for endpoint in endpoints:
            endpoint.health_url = health_url(endpoint.url, policy.health_path)

    def affinity_key(self, endpoint: str, payload: dict[str, Any]) -> bytes | None:
        """The digest affinity places a request by; None when balanced by load alone."""
        if self.balance != "affinity":
            return None
        return prefix_digest(payload, PROMPT_FIELDS.get(endpoint, ()), self.policy.prefix_bytes)

    def pick(self, key: bytes | None, tried: list[Endpoint]) -> Endpoint | None:
        """The endpoint for a request (`key`: its affinity digest), out of those available and not yet `tried`."""
        now = monotonic()
        candidates = [(e, self._weight(e, now)) for e in self.endpoints if e not in tried and e.available(now)]
        if not candidates:
            return None
        if key is not None:
            return bounded_rendezvous(key, candidates, self.policy.load_factor)
        if self.balance == "round_robin":
            return smooth_round_robin(candidates)
        return least_outstanding(candidates)

    def _weight(self, endpoint: Endpoint, now: float) -> float:
        """Its weight, of which an endpoint just back takes a share growing from MIN_SHARE to all over the ramp."""
        ramp = self.policy.slow_return_seconds
        since = now - endpoint.back_since
        return endpoint.weight if since >= ramp else endpoint.weight * max(MIN_SHARE, since / ramp)

    def start(self, endpoint: Endpoint) -> None:
        endpoint.outstanding += 1
        endpoint.requests += 1

    def finish(self, endpoint: Endpoint, failed: bool) -> None:
        """A request to `endpoint` ended; `failed`: by the endpoint's fault (unreachable, a 5xx or 429, cut)."""
        endpoint.outstanding -= 1
        if not failed:
            endpoint.consecutive = 0
            return
        endpoint.failures += 1
        endpoint.consecutive += 1
        now = monotonic()
        if endpoint.consecutive >= self.policy.eject_after and now >= endpoint.ejected_until:  # not ejected yet
            endpoint.ejected_until = endpoint.back_since = now + self.policy.eject_seconds
            endpoint.ejections += 1
            log.warning("target %s: endpoint %d (%s) ejected for %gs after %d failures in a row", self.target,
                        endpoint.index, endpoint.url, self.policy.eject_seconds, endpoint.consecutive)  # fmt: skip

    def checked(self, endpoint: Endpoint, passed: bool, why: str = "") -> None:
        """The result of an active health check: a failed one marks the endpoint down, a passing one brings it back."""
        if passed != endpoint.down:
            return  # no change
        endpoint.down = not passed
        if passed:
            endpoint.back_since = monotonic()
            log.warning("target %s: endpoint %d (%s) passes its health check again", self.target, endpoint.index,
                        endpoint.url)  # fmt: skip
        else:
            log.warning("target %s: endpoint %d (%s) failed its health check (%s): down", self.target, endpoint.index,
                        endpoint.url, why)  # fmt: skip

    async def run_checks(self) -> None:
        """Check every endpoint each `health_interval` seconds, until cancelled."""
        timeout = httpx.Timeout(self.policy.health_timeout)
        async with httpx.AsyncClient(headers=self.headers, timeout=timeout) as client:
            while True:
                await asyncio.gather(*(self._check(client, endpoint) for endpoint in self.endpoints))
                await asyncio.sleep(self.policy.health_interval)

    async def _check(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        try:
            async with client.stream("GET", endpoint.health_url) as response:  # the status alone: no body is read
                self.checked(endpoint, response.is_success, f"status {response.status_code}")
        except httpx.HTTPError as error:
            self.checked(endpoint, False, type(error).__name__)

    def health(self) -> list[dict]:
        now = monotonic()
        return [{
            "endpoint": e.index, "url": e.url, "weight": e.weight,
            "state": e.state(now, self.policy.slow_return_seconds), "outstanding": e.outstanding,
            "consecutive_failures": e.consecutive, "ejected_remaining_s": round(max(0.0, e.ejected_until - now), 1),
        } for e in self.endpoints]  # fmt: skip

    def counts(self) -> list[EndpointCounts]:
        now = monotonic()
        return [
            EndpointCounts(self.target, str(e.index), e.requests, e.failures, e.ejections, e.outstanding,
                           not e.available(now))
            for e in self.endpoints
        ]  # fmt: skip


def health_url(url: str, path: str) -> str:
    """Where an endpoint is checked: `path` from its server's root ("/health"), else under its URL ("models").
    Either way on the endpoint's own host."""
    if path.startswith("/"):
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{path}"
    return f"{url}/{path}"


def prefix_digest(payload: dict[str, Any], fields: tuple[str, ...], limit: int) -> bytes | None:
    """What every turn of one conversation shares: its instructions (system prompt) and its turns up to the first
    user turn, each read to `limit` bytes of its JSON. None when the request has none of `fields`."""
    digest = hashlib.blake2b(digest_size=16)
    found = False
    for name in fields:
        for part in _opening(payload.get(name)):
            digest.update(to_json(part)[:limit])
            found = True
    return digest.digest() if found else None


def _opening(value: Any) -> list:
    """A field's part that later turns repeat: a list of messages (or input items) up to its first user turn; any
    other value (a system prompt, a prompt) whole."""
    if not value:
        return []
    if not (isinstance(value, list) and isinstance(value[0], dict)):
        return [value]
    opening = []
    for item in value:
        opening.append(item)
        if item.get("role") == "user":
            break
    return opening


def least_outstanding(candidates: list[tuple[Endpoint, float]]) -> Endpoint:
    """The fewest requests in flight (this one counted) per unit of weight; a random one of those tied."""
    loads = [(endpoint.outstanding + 1) / weight for endpoint, weight in candidates]
    least = min(loads)
    return random.choice([endpoint for (endpoint, _), load in zip(candidates, loads) if load == least])


def smooth_round_robin(candidates: list[tuple[Endpoint, float]]) -> Endpoint:
    """Each pick adds every endpoint's weight to its score and takes the highest, whose score drops by the total:
    shares as the weights, spread out evenly (nginx's smooth weighted round robin)."""
    for endpoint, weight in candidates:
        endpoint.current += weight
    chosen = max(candidates, key=lambda candidate: candidate[0].current)[0]
    chosen.current -= sum(weight for _, weight in candidates)
    return chosen


def bounded_rendezvous(key: bytes, candidates: list[tuple[Endpoint, float]], load_factor: float) -> Endpoint:
    """The first endpoint in `key`'s weighted rendezvous order holding fewer requests than its bound:
    ceil(load_factor x its weight's share x the requests in flight, this one counted). One always is: the bounds
    add up to at least the requests in flight, more than are held."""
    in_flight = sum(endpoint.outstanding for endpoint, _ in candidates) + 1
    total = sum(weight for _, weight in candidates)
    ordered = sorted(candidates, key=lambda candidate: rendezvous_score(key, *candidate), reverse=True)
    return next(
        endpoint for endpoint, weight in ordered
        if endpoint.outstanding < math.ceil(load_factor * in_flight * weight / total)
    )  # fmt: skip


def rendezvous_score(key: bytes, endpoint: Endpoint, weight: float) -> float:
    """Weighted rendezvous hashing's score: weight / -ln(u), u uniform in (0, 1) from the key and the endpoint.
    The highest wins; each endpoint wins its weight's share of keys, and one leaving moves only its own keys."""
    hashed = int.from_bytes(hashlib.blake2b(key + endpoint.salt, digest_size=8).digest(), "big")
    uniform = ((hashed >> 11) | 1) / 2**53  # 53 bits, odd: strictly between 0 and 1
    return weight / -math.log(uniform)
