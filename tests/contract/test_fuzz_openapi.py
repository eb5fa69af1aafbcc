"""Fuzzing the OpenAPI surface with schemathesis: every request it makes, valid or not, gets an answer below 500
from a real gateway (llama.cpp, the real model), and the gateway stays up.

Every operation of the gateway's /openapi.json is fuzzed, with requests that fit the schema and requests that do
not. Generated requests are bounded in what they make the model do (a few tokens each), so the run stays within
minutes on two cores; the bound changes how long a request runs, never which fields the gateway must check.
(schemathesis's pytest loader, `schemathesis.pytest.from_fixture`, does not run under pytest 9, hence the loop.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import MODEL, start_server

EXAMPLES = 25  # per operation and generation mode
MAX_TOKENS = 4  # the most tokens a generated request may ask for
MIN_TIMEOUT = 60  # the shortest `timeout` (seconds) a generated request may give itself
# The routes that generate, and the fields that bound how much.
GENERATING = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"), "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",), "/v1/messages": ("max_tokens",),
}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("fuzz"), {"LLM_REQUEST_TIMEOUT": "60"})
    yield server
    server.stop()


def aim_and_bound(case, mode: GenerationMode) -> None:
    """A valid body names the served model (a random name stops at 404), asks for a few tokens at most and gives
    itself a minute at least (a request that asks to be cut after 5e-324 s gets the 504 it asks for); its other
    fields stay as generated."""
    if not isinstance(case.body, dict):
        return
    if mode is GenerationMode.POSITIVE and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    if type(case.body.get("timeout")) in (int, float) and 0 < case.body["timeout"] < MIN_TIMEOUT:
        case.body["timeout"] = MIN_TIMEOUT
    limits = GENERATING.get(case.operation.path, ())
    if limits and all(case.body.get(field) is None for field in limits):  # unbounded: to the end of the context
        case.body[limits[0]] = MAX_TOKENS
    for field in limits:
        if type(case.body.get(field)) is int:
            case.body[field] = min(case.body[field], MAX_TOKENS)


def fuzz(operation, mode: GenerationMode, server) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.explicit, Phase.generate])  # fmt: skip
    def one_request(case) -> None:
        aim_and_bound(case, mode)
        response = case.call(timeout=120)
        reproduce = case.as_curl_command()
        assert server.process.poll() is None, f"the gateway died on: {reproduce}\n{server.log()[-3000:]}"
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]}\n    {reproduce}"

    one_request()


def test_no_generated_request_gets_a_server_error(fuzzed):
    schema = schemathesis.openapi.from_url(fuzzed.base_url + "/openapi.json")
    schema.config.output.sanitization.update(enabled=False)  # it would mask `max_tokens` in a reproduction
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [operation.label for operation in operations]
    failures = []
    for operation in operations:
        for mode in GenerationMode:
            try:
                fuzz(operation, mode, fuzzed)
            except AssertionError as failure:
                failures.append(f"{operation.label} ({mode.value}): {failure}")
            except Unsatisfiable:  # nothing in the operation can be made invalid (no body; no parameter or a string)
                assert mode is GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures)
