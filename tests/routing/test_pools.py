"""Engine pools against three real upstream servers (tests/upstream.py), which the tests kill and start again on the
same port: passive ejection with no client error, return after recovery, prefix affinity under its load bound, and
active health checks.

One gateway, with no local model: each target is a pool of one endpoint on each upstream server, named
`<target><n>-ok`, so an answer ("from killable1-ok upstream") tells which endpoint served it. The health checks GET
the upstreams' /control/health, which answers 200 while the server runs.
"""

from __future__ import annotations

import collections
import concurrent.futures

import httpx
import openai
import pytest
import yaml

from tests.conftest import HTTP_TIMEOUT, free_port, start_server, wait_for
from tests.routing.test_routing import counter, sample
from tests.upstream import Upstream

ADMIN_KEY = "sk-pools-admin"
SERVERS = 3
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
EJECT_SECONDS = 1.5


def endpoint_name(target: str, index: int) -> str:
    return f"{target}{index}-ok"


def pools_config(upstreams: list[Upstream]) -> dict:
    def pool(name: str, balance: str, **policy) -> dict:
        return {
            "type": "openai", "model": "upstream-model", "balance": balance,
            "endpoints": [server.base_url(endpoint_name(name, i)) for i, server in enumerate(upstreams)],
            "pool": {"health_path": "/control/health", **policy},
        }  # fmt: skip

    targets = {
        # Passive ejection only: no health checks, ejected after 2 failures in a row, back at once.
        "killable": pool("killable", "round_robin", health_interval=0, eject_after=2, eject_seconds=EJECT_SECONDS,
                         slow_return_seconds=0),  # fmt: skip
        "affine": pool("affine", "affinity", health_interval=0),
        # Active checks only: failures of requests never eject.
        "checked": pool("checked", "least_outstanding", health_interval=0.3, health_timeout=1, eject_after=1000),
    }
    return {
        "targets": targets,
        "models": {name: {"targets": [name]} for name in targets},
        "api_keys": [{"key": ADMIN_KEY, "name": "ops", "admin": True}],  # an admin key alone: /v1 stays open
    }


@pytest.fixture(scope="module")
def upstreams() -> list[Upstream]:
    """The three servers; a test that kills one puts a new one in its place."""
    servers = [Upstream(free_port()).start() for _ in range(SERVERS)]
    yield servers
    for server in servers:
        server.stop()


def kill(upstreams: list[Upstream], index: int) -> None:
    upstreams[index].stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{upstreams[index].port}/control/health", timeout=HTTP_TIMEOUT)


def revive(upstreams: list[Upstream], index: int) -> None:
    """A new server on the killed one's port."""
    upstreams[index] = Upstream(upstreams[index].port).start()
    answer = httpx.get(f"http://127.0.0.1:{upstreams[index].port}/control/health", timeout=HTTP_TIMEOUT)
    assert answer.status_code == 200


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstreams):
    folder = tmp_path_factory.mktemp("pools")
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump(pools_config(upstreams)))
    server = start_server(folder, {"LLM_CONFIG": str(config)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return gateway.client()


def served_by(text: str, target: str) -> int:
    """Which endpoint of `target` wrote an answer."""
    (index,) = [i for i in range(SERVERS) if endpoint_name(target, i) in text]
    return index


def answer(client: openai.OpenAI, target: str, messages: list[dict], stream: bool = False) -> str:
    """A chat answer's text through the SDK (any error raises)."""
    if not stream:
        reply = client.chat.completions.create(model=target, messages=messages, max_tokens=8)
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(model=target, messages=messages, max_tokens=8, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def endpoint_states(gateway, target: str, admin: bool = False) -> list[dict]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if admin else {}
    return gateway.get("/health", headers=headers).json()["targets"][target]["endpoints"]


def hello(number: int) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"Hello, this is request {number}."}]


def test_a_killed_endpoint_is_ejected_without_a_client_error_and_returns_after_recovery(gateway, client, upstreams):
    before = {served_by(answer(client, "killable", hello(n), stream=n % 2 == 1), "killable") for n in range(6)}
    assert before == {0, 1, 2}  # round robin
    kill(upstreams, 1)
    try:
        # Refused connections: each such request goes on to another endpoint at once, the client sees none of it.
        during = [served_by(answer(client, "killable", hello(n), stream=n % 2 == 1), "killable") for n in range(12)]
        assert set(during) == {0, 2}
        states = endpoint_states(gateway, "killable", admin=True)
        assert states[1]["url"] == upstreams[1].base_url(endpoint_name("killable", 1))
        assert counter(gateway, "llm_endpoint_ejections", target="killable", endpoint="1") >= 1
        assert counter(gateway, "llm_endpoint_failures", target="killable", endpoint="1") >= 2
        assert counter(gateway, "llm_endpoint_failures", target="killable", endpoint="0") == 0
        assert counter(gateway, "llm_retries", target="killable") == 0  # no backoff: the pool moved on at once
    finally:
        revive(upstreams, 1)

    def endpoint_1_serves() -> bool:  # every request meanwhile is answered too
        return served_by(answer(client, "killable", hello(0)), "killable") == 1

    wait_for(endpoint_1_serves, EJECT_SECONDS + 20, "the endpoint did not return", interval=0.2)
    assert [state["state"] for state in endpoint_states(gateway, "killable")] == ["up"] * 3
    assert sample(gateway, "llm_endpoint_ejected", target="killable", endpoint="1") == 0


def test_affinity_keeps_each_conversation_on_one_endpoint_and_spreads_conversations(client):
    homes = collections.defaultdict(set)
    for conversation in range(24):
        messages = hello(conversation)
        for turn in range(3):
            text = answer(client, "affine", messages, stream=turn == 1)
            homes[conversation].add(served_by(text, "affine"))
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And then {turn}?"}]
    assert all(len(served) == 1 for served in homes.values()), homes
    assert set.union(*homes.values()) == {0, 1, 2}


def test_one_hot_conversation_spreads_within_the_load_bound(gateway, upstreams):
    """Twelve requests of one conversation held at once (the endpoints stall; each request ends at its 5 s
    deadline): its endpoint takes its bound, ceil(1.25 x 12 / 3) = 5, and the others the rest."""
    names = [endpoint_name("affine", i) for i in range(SERVERS)]
    hits = [upstreams[i].hits[name] for i, name in enumerate(names)]
    for server, name in zip(upstreams, names):
        server.modes[name] = "stall"
    try:
        body = {"model": "affine", "messages": hello(99), "max_tokens": 8}

        def post(_) -> int:
            return gateway.post("/v1/chat/completions", json=body, headers={"x-request-timeout": "5"}).status_code

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            assert list(pool.map(post, range(12))) == [504] * 12
    finally:
        for server, name in zip(upstreams, names):
            server.modes.pop(name)
    held = [upstreams[i].hits[name] - hits[i] for i, name in enumerate(names)]
    assert sorted(held) == [2, 5, 5], held


def test_the_health_check_marks_a_dead_endpoint_down_without_client_traffic(gateway, upstreams):
    # (Its checks saw the first test's kill too: that endpoint may still be returning.)
    assert "down" not in [state["state"] for state in endpoint_states(gateway, "checked")]
    assert "url" not in endpoint_states(gateway, "checked")[0]  # URLs for admin keys only
    kill(upstreams, 2)
    try:
        wait_for(lambda: endpoint_states(gateway, "checked")[2]["state"] == "down", 15, "not marked down")
        assert sample(gateway, "llm_endpoint_ejected", target="checked", endpoint="2") == 1
        assert counter(gateway, "llm_endpoint_requests", target="checked", endpoint="2") == 0
    finally:
        revive(upstreams, 2)
    wait_for(lambda: endpoint_states(gateway, "checked")[2]["state"] != "down", 15, "not back up")
    assert endpoint_states(gateway, "checked")[2]["state"] == "returning"  # slow return: 30 s by default
