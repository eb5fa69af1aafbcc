"""Unit tests for the pure pieces: stop matching, batch order, error params, the registry, the CLI and settings."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from engines.base import SamplingParams
from engines.llamacpp.scheduler import Sequence, _batch_order
from engines.text import StopMatcher
from gateway.api.generation import choice_params
from gateway.api.protocol import ChatCompletionRequest, CompletionRequest
from gateway.app import engine_config
from gateway.cli import parse_args
from gateway.errors import APIError, _param_from_location
from gateway.models.registry import ModelNotAvailable, ModelRegistry
from gateway.routing.config import LocalTargetConfig
from gateway.settings import PROJECT_ROOT, Settings


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], str | None]:
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return out, stopped
    out.append(matcher.flush())
    return out, None


def test_stop_matcher_holds_back_a_possible_stop_prefix():
    emitted, stopped = feed_all(StopMatcher(["###"]), ["Hello #", "#", " world"])
    assert emitted == ["Hello ", "", "## world", ""]
    assert not stopped


def test_stop_matcher_cuts_across_pieces():
    emitted, stopped = feed_all(StopMatcher(["END", "STOP"]), ["abc E", "N", "D tail"])
    assert "".join(emitted) == "abc "
    assert stopped == "END"


def test_stop_matcher_picks_the_earliest_stop():
    text, stopped = StopMatcher(["b", "a"]).feed("xxabxx")
    assert (text, stopped) == ("xx", "a")


def test_batch_puts_decoding_sequences_in_slot_order_then_prompts_in_arrival_order():
    # llama.cpp keeps one micro-batch only while sequence ids rise by one: slot order is what makes
    # a decode step one pass over the weights instead of one per sequence.
    def sequence(slot: int, prompt: int, cached: int) -> Sequence:
        params = SamplingParams(max_tokens=4)
        return Sequence([1] * prompt, params, None, asyncio.Queue(), tag=0, slot=slot, n_cached=cached)

    arrivals = [sequence(3, 5, 4), sequence(7, 9, 0), sequence(0, 6, 5), sequence(2, 4, 0), sequence(1, 8, 7)]
    ordered = sorted(arrivals, key=_batch_order)
    assert [s.slot for s in ordered] == [0, 1, 3, 7, 2]


def test_stop_matcher_without_stops_passes_everything():
    assert StopMatcher([]).feed("anything ###") == ("anything ###", None)


@pytest.mark.parametrize(
    ("location", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "response_format", "type"), "response_format.type"),
        (("body", "stop", "str"), "stop"),
        (("body",), None),
    ],
)
def test_param_names_follow_openai(location, param):
    assert _param_from_location(location) == param


def test_choice_seeds_differ_but_repeat():
    params = choice_params(SamplingParams(max_tokens=5, seed=10), 3)
    assert [p.seed for p in params] == [10, 11, 12]
    assert [p.seed for p in choice_params(SamplingParams(max_tokens=5), 2)] == [None, None]


def test_chat_request_maps_to_sampling_params():
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], stop="##", logit_bias={"5": -100},
        max_completion_tokens=9, max_tokens=3, top_k=-1,
    )  # fmt: skip
    assert request.requested_max_tokens() == 9
    params = request.sampling_params(9, None, None)
    assert params.stop == ["##"] and params.logit_bias == {5: -100} and params.top_k == 0
    assert params.temperature == 1.0 and params.top_p == 1.0


def test_unknown_fields_name_their_param_and_remote_only_ones_parse():
    with pytest.raises(APIError) as raised:
        CompletionRequest(model="m", prompt="x", surprise="y")
    assert raised.value.param == "surprise" and raised.value.status_code == 400
    assert CompletionRequest(model="m", prompt="x", suffix="y").unsupported_locally() == "suffix"
    assert CompletionRequest(model="m", prompt="x", best_of=2, n=2).unsupported_locally() is None
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}], verbosity="low")
    assert chat.unsupported_locally() == "verbosity"
    chat.verbosity = None
    assert chat.unsupported_locally() == "messages[0].content[1]"


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2]]).prompts() == [[1], [2]]


def test_registry_resolves_names_and_paths(tmp_path):
    registry = ModelRegistry.load(PROJECT_ROOT / "configs" / "models.yaml")
    assert registry.default == "smollm2-135m-instruct"
    assert registry.entries["qwen2.5-7b-instruct"].memory_gb == {"fp16": 15.0, "int8": 8.5, "int4": 5.0}
    assert registry.entries["qwen2.5-7b-instruct-gguf"].memory_gb["q4_k_m"] == 4.1
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"x")
    resolved = registry.resolve("smollm2-135m-instruct", tmp_path)
    assert resolved.served_name == "smollm2-135m-instruct"
    own = tmp_path / "my-model.gguf"
    own.write_bytes(b"x")
    assert registry.resolve(str(own), Path("/nowhere")).served_name == "my-model"
    with pytest.raises(ModelNotAvailable, match="make models"):
        registry.resolve("smollm2-135m-instruct", tmp_path / "empty")
    with pytest.raises(ModelNotAvailable, match="Qwen/Qwen2.5-3B-Instruct"):
        registry.resolve("qwen2.5-3b-instruct", tmp_path)
    with pytest.raises(ModelNotAvailable, match="neither"):
        registry.resolve("no-such-model", tmp_path)


def test_a_registry_reranker_is_served_as_one_unless_its_target_says_otherwise(tmp_path):
    registry = ModelRegistry.load(PROJECT_ROOT / "configs" / "models.yaml")
    (tmp_path / "ms-marco-minilm-l6-v2").mkdir()
    resolved = registry.resolve("ms-marco-minilm-l6-v2", tmp_path)
    target = LocalTargetConfig(type="local", model="ms-marco-minilm-l6-v2")
    assert engine_config(Settings(), target, resolved).options["task"] == "rerank"
    target = LocalTargetConfig(type="local", model="ms-marco-minilm-l6-v2", options={"task": "embed"})
    assert engine_config(Settings(), target, resolved).options["task"] == "embed"
    own = tmp_path / "own.gguf"
    own.write_bytes(b"x")
    target = LocalTargetConfig(type="local", model=str(own))
    assert "task" not in engine_config(Settings(), target, registry.resolve(str(own), tmp_path)).options


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("LLM_PORT", "9000")
    monkeypatch.setenv("LLM_CTX", "1024")
    command, overrides = parse_args(["serve", "--port", "8123", "--model", "/m.gguf", "--gpu-layers", "-1"])
    settings = Settings(**overrides)
    assert command == "serve"
    assert (settings.port, settings.model, settings.ctx, settings.gpu_layers) == (8123, "/m.gguf", 1024, -1)
    assert parse_args([])[0] == "serve"


def test_llama_cpp_logs_reach_python_only_while_a_model_loads(caplog):
    """After loading, llama.cpp's lines are dropped in C (a Python callback would take the GIL on every
    CUDA decode step); while loading they are log records."""
    import llama_cpp

    from engines.llamacpp.native import native_logs_while_loading

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    path = str(PROJECT_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").encode()

    def load_vocab() -> int:
        caplog.clear()
        llama_cpp.llama_model_free(llama_cpp.llama_model_load_from_file(path, params))
        return len([r for r in caplog.records if r.name == "llama-cpp-python"])

    with caplog.at_level("DEBUG", logger="llama-cpp-python"):
        with native_logs_while_loading():
            assert load_vocab() > 0
    with caplog.at_level("WARNING", logger="llama-cpp-python"):
        with native_logs_while_loading():
            pass
        with caplog.at_level("DEBUG", logger="llama-cpp-python"):
            assert load_vocab() == 0


def test_the_sse_internals_the_stream_uses_are_still_there():
    """_EventStream runs sse-starlette's own pieces under plain tasks (gateway/core/streams.py): if a release
    renames or drops one, this fails here rather than as broken streams (pyproject.toml bounds the version)."""
    from sse_starlette import EventSourceResponse

    from gateway.core.streams import _EventStream

    assert "_send_with_timeout" in vars(EventSourceResponse)  # else the override below changes nothing
    assert "_send_with_timeout" in vars(_EventStream)
    for method in ("_stream_response", "_ping"):
        assert inspect.iscoroutinefunction(getattr(EventSourceResponse, method)), method
    response = EventSourceResponse(iter(()), ping=1)
    assert {"body_iterator", "raw_headers", "_send_lock"} <= set(vars(response)) and response.ping_interval == 1


def test_a_streaming_response_shares_nothing_mutable_with_its_template():
    """Streams are copies of one response per set of headers (sse_response): a lock, list or event shared
    with the template, one sse-starlette might add, would be shared by every stream."""
    from gateway.core.streams import _EventStream, _template

    async def events():
        yield b"data: 1\n\n"

    async def made() -> tuple[_EventStream, _EventStream]:
        return _EventStream.streaming(events(), {"x-llm-target": "t"}), _template((("x-llm-target", "t"),))

    stream, template = asyncio.run(made())
    immutable = (type(None), bool, int, float, str, bytes, tuple)
    shared = [name for name, value in vars(stream).items() if not isinstance(value, immutable)
              and value is getattr(template, name)]  # fmt: skip
    assert shared == []
    assert (b"x-llm-target", b"t") in stream.raw_headers and stream.ping_interval > 0


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_text_chunk_from_its_template_is_the_one_the_wire_model_renders(endpoint):
    """Text deltas are spliced into a chunk rendered once per choice: the result must be byte for byte what
    the pydantic models give, whatever the text, the model name or the choice index."""
    from gateway.api.chat import _ChatReply
    from gateway.api.completions import _CompletionReply

    reply_class = {"completions": _CompletionReply, "chat": _ChatReply}[endpoint]
    reply = reply_class("id-1", 1700000000, 'a "quoted" model\\name\u2028', prompt_tokens=3, choices=2)
    texts = ["a", ' "q" \\ \n\t\x00\x1f\x7f', "\u2028\u2029 é 😀 日本", "</script>", "{}", " " * 3]
    for index in (1, 0, 1):
        for text in texts:
            assert reply.text_chunk(index, text) == reply.render_text_chunk(index, text), (index, text)


def test_an_sse_stream_pings_while_it_waits_and_ends_when_its_client_leaves():
    from gateway.core.streams import _EventStream

    closed = []

    async def events(wait: float):
        try:
            await asyncio.sleep(wait)
            yield b"data: 1\n\n"
        finally:
            closed.append(wait)

    async def serve(wait: float, leave_after: float | None) -> list[bytes]:
        sent: list[bytes] = []

        async def receive():
            await asyncio.sleep(3600 if leave_after is None else leave_after)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message.get("body", b"<start>"))

        scope = {"type": "http", "method": "POST", "asgi": {"spec_version": "2.3"}}
        await asyncio.wait_for(_EventStream(events(wait), sep="\n", ping=0.05)(scope, receive, send), 5)
        return sent

    answered = asyncio.run(serve(0.3, None))
    assert answered[0] == b"<start>" and answered[-2:] == [b"data: 1\n\n", b""]
    assert any(body.startswith(b":") for body in answered[1:-2])  # pings while the event was awaited
    left = asyncio.run(serve(3600, 0.1))  # returns at once, not after the hour, and closes the events
    assert b"data: 1\n\n" not in left and closed == [0.3, 3600]


def test_alarm_cuts_a_wait_short_and_leaves_other_cancellations_alone():
    from gateway.routing.chain import Alarm

    async def events(*pauses: float):
        for pause in pauses:
            await asyncio.sleep(pause)
            yield pause

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        seen = []
        # A second: a quick wait passes whatever the machine's load, a wait for an hour is cut at that second.
        alarm = Alarm(loop.time() + 1.0)
        stream = events(0, 3600, 0)
        assert await alarm.wait(anext(stream)) == 0
        try:
            await alarm.wait(anext(stream))
        except TimeoutError:
            seen.append("timeout")
        assert asyncio.current_task().cancelling() == 0  # the alarm's own cancellation was taken back
        try:
            await alarm.wait(anext(events(0)))
        except TimeoutError:
            seen.append("timeout again")

        other = Alarm(loop.time() + 3600)
        waiter = asyncio.create_task(other.wait(anext(events(3600))))
        await asyncio.sleep(0)  # the waiter is inside `wait` now
        waiter.cancel()  # a disconnect, say, before the alarm rings
        await asyncio.wait([waiter])
        seen.append("cancelled" if waiter.cancelled() else "not cancelled")
        other.disarm()
        return seen

    assert asyncio.run(scenario()) == ["timeout", "timeout again", "cancelled"]


def test_sequences_submitted_in_consecutive_loop_iterations_reach_the_worker_together():
    from engines.worker_thread import WorkerThread

    async def scenario() -> list[int]:
        # Its thread is never started: nothing takes the inbox.
        worker = WorkerThread("test worker", capacity=8, gather_for=0.0)
        sizes = []
        worker._enqueue(asyncio.Queue())  # the first request of a burst
        sizes.append(worker._inbox.qsize())
        await asyncio.sleep(0)
        worker._enqueue(asyncio.Queue())  # a request whose task ran one iteration later
        sizes.append(worker._inbox.qsize())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        sizes.append(worker._inbox.qsize())
        return sizes

    assert asyncio.run(scenario()) == [0, 0, 2]


def test_an_idle_worker_waits_for_the_rest_of_a_burst_and_a_busy_one_does_not():
    from engines.worker_thread import WorkerThread

    async def scenario() -> list[int]:
        # Its thread is never started: nothing takes the inbox.
        worker = WorkerThread("test worker", capacity=8, gather_for=0.5)
        sizes = []
        worker._enqueue(asyncio.Queue())  # reaches an idle worker: waits for the others
        await asyncio.sleep(0.05)
        worker._enqueue(asyncio.Queue())  # 50 ms later, still inside the window
        await asyncio.sleep(0.05)
        sizes.append(worker._inbox.qsize())
        await asyncio.sleep(0.6)
        sizes.append(worker._inbox.qsize())  # both, once the window has closed
        while not worker._inbox.empty():
            worker._running.append(worker._inbox.get_nowait())  # admitted: the worker is busy now
        worker._admitted = worker._submitted
        worker._enqueue(asyncio.Queue())
        for _ in range(3):
            await asyncio.sleep(0)
        sizes.append(worker._inbox.qsize())  # handed over within two iterations, no window
        return sizes

    assert asyncio.run(scenario()) == [0, 2, 1]


def test_a_batch_reads_in_llama_cpp_as_its_runs_of_tokens_were_added():
    """The batch's arrays are numpy's behind a llama_batch of pointers: read through the struct, as llama.cpp
    reads it, every token has its run's sequence and consecutive positions, and only the asked outputs."""
    from engines.llamacpp.native import Batch

    batch = Batch(8)
    for _ in range(2):  # a cleared batch is filled again from the start
        batch.clear()
        assert batch.add([11, 12, 13], 40, 2, outputs=0) == 2
        assert batch.add([21, 22], 7, 5, outputs=1) == 4
        assert batch.add([31], 90, 0, outputs=1) == 5
    native = batch.native
    rows = [
        (native.token[i], native.pos[i], native.n_seq_id[i], native.seq_id[i][0], native.logits[i])
        for i in range(native.n_tokens)
    ]
    assert rows == [
        (11, 40, 1, 2, 0), (12, 41, 1, 2, 0), (13, 42, 1, 2, 0), (21, 7, 1, 5, 0), (22, 8, 1, 5, 1), (31, 90, 1, 0, 1),
    ]
    assert batch.size == 6 and not native.embd
