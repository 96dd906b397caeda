from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from pydantic import BaseModel, ValidationError

from services.edge_http.core.accounting import shared_settlement
from services.edge_http.core.failures import EdgeError, Failure, from_rpc_error
from services.edge_http.core.plans import sampling_params
from services.edge_http.core.runs import choice_of
from services.edge_http.http_api.embeddings import embed_inputs
from services.edge_http.http_api.errors import openai_error
from services.edge_http.http_api.sse import sse_stream
from services.edge_http.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from services.inference.server import sampling_config
from services.mesh.rpc.faults import CODE_METADATA_KEY
from services.mesh.stubs import preprocess_pb2


class Chunk(BaseModel):
    choices: list[int]


async def _failing() -> AsyncIterator[BaseModel]:
    yield Chunk(choices=[1])
    raise EdgeError(Failure.UNAVAILABLE, "inference: gone")


def test_failure_mid_stream_is_one_error_event_then_done() -> None:
    async def collect() -> list[bytes]:
        return [part async for part in sse_stream(_failing())]

    events = asyncio.run(collect())
    assert events[0] == b'data: {"choices":[1]}\n\n'
    error = json.loads(events[1].removeprefix(b"data: "))
    assert "choices" not in error
    assert error["error"]["message"] == "inference: gone"
    assert events[2] == b"data: [DONE]\n\n"


def test_openai_defaults_map_to_sampling_params() -> None:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    params = sampling_params(body)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, 0, 0)
    assert (params.min_p, params.repetition_penalty) == (0.0, 1.0)
    assert not params.HasField("seed")


def test_vllm_sampling_extensions_reach_the_engine_config() -> None:
    body = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], min_p=0.1, repetition_penalty=1.3, top_k=40
    )
    config = sampling_config(sampling_params(body))
    assert (config.min_p, config.repetition_penalty, config.top_k) == (pytest.approx(0.1), pytest.approx(1.3), 40)
    assert config.penalized


def test_max_completion_tokens_is_an_alias_and_stop_string_becomes_a_list() -> None:
    body = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=7, stop="END", seed=0
    )
    params = sampling_params(body)
    assert params.max_tokens == 7 and list(params.stop) == ["END"] and params.seed == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 2**31),
        ("max_completion_tokens", 2**31),
        ("top_k", 2**31),
        ("seed", 2**63),
        ("logit_bias", {str(2**31): 1.0}),
    ],
)
def test_integers_beyond_the_wire_fields_are_refused_by_the_schema(field: str, value: object) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ValidationError, match=field):
        ChatCompletionRequest.model_validate(body | {field: value})
    just_inside = {field: {str(2**31 - 1): 1.0}} if field == "logit_bias" else {field: value - 1}
    sampling_params(ChatCompletionRequest.model_validate(body | just_inside))  # fits the protobuf fields


@pytest.mark.parametrize("tokens", [[2**31], [-1], [[1, 2], [9070731803021]]])
def test_embedding_token_ids_must_fit_the_wire(tokens: list) -> None:
    with pytest.raises(ValidationError, match="input"):
        EmbeddingRequest(model="m", input=tokens)
    embed_inputs(EmbeddingRequest(model="m", input=[[2**31 - 1, 0]]))


def test_unknown_fields_are_ignored() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x", "extra": 1}], "chat_template_kwargs": {}}
    )
    assert body.model == "m"


def test_completion_prompts_in_every_form_openai_allows() -> None:
    def prompts(prompt: object, **extra: object) -> list:
        return CompletionRequest(model="m", prompt=prompt, **extra).prompts

    assert prompts("one") == ["one"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([0, 0, 7]) == [[0, 0, 7]]  # token ids: one prompt
    assert prompts([[1, 2], [3]]) == [[1, 2], [3]]
    for bad in ([], [[]], [-1], [["a"]], ["a", 1]):
        with pytest.raises(ValidationError):
            prompts(bad)
    with pytest.raises(ValidationError, match="prompts times n"):
        prompts(["p"] * 9, n=8)
    assert CompletionRequest(model="m", prompt="a", echo=True, logprobs=2).wanted_prompt_logprobs == 2
    assert CompletionRequest(model="m", prompt="a", logprobs=2).wanted_prompt_logprobs is None


def _rpc_error(status: grpc.StatusCode, details: str, answered: bool) -> grpc.aio.AioRpcError:
    """A failed call as the edge sees it: answered by a service (its error code in the trailing
    metadata) or failed in the transport (no such metadata)."""
    trailing = grpc.aio.Metadata((CODE_METADATA_KEY, "some_code")) if answered else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(status, grpc.aio.Metadata(), trailing, details=details)


@pytest.mark.parametrize(
    ("status", "answered", "http"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, True, 400),
        (grpc.StatusCode.OUT_OF_RANGE, True, 400),
        (grpc.StatusCode.NOT_FOUND, True, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True, 429),
        (grpc.StatusCode.INTERNAL, True, 500),  # the service crashed on this request
        (grpc.StatusCode.UNAVAILABLE, False, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, 504),
        (grpc.StatusCode.INTERNAL, False, 503),  # a broken connection
        (grpc.StatusCode.UNKNOWN, False, 503),
    ],
)
def test_grpc_status_maps_to_http_status(status: grpc.StatusCode, answered: bool, http: int) -> None:
    mapped = openai_error(from_rpc_error(_rpc_error(status, "why", answered), "inference"))
    assert mapped.status == http
    if http in (429, 503):
        assert mapped.headers["Retry-After"]


@pytest.mark.parametrize(
    "details",
    ["Stream removed (Socket closed)", "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:4100"],
)
@pytest.mark.parametrize("status", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL])
def test_transport_text_never_reaches_the_client(status: grpc.StatusCode, details: str) -> None:
    mapped = openai_error(from_rpc_error(_rpc_error(status, details, answered=False), "inference"))
    assert mapped.message == "inference is unavailable; retry shortly"
    assert details not in mapped.body().model_dump_json()


def test_a_service_answer_keeps_its_message_and_code() -> None:
    failed = _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role: bad", True)
    mapped = openai_error(from_rpc_error(failed, "preprocess"))
    assert (mapped.status, mapped.message, mapped.code) == (400, "messages[0].role: bad", "some_code")


def test_choices_sample_with_successive_seeds_wrapping_within_int64_and_cache_apart() -> None:
    prepared = preprocess_pb2.PreprocessReply(token_ids=[1, 2], cache_key="k")
    prepared.sampling.seed = 2**63 - 1
    assert choice_of(prepared, 0) is prepared
    second = choice_of(prepared, 1)
    assert (second.sampling.seed, second.cache_key, list(second.token_ids)) == (-(2**63), "k#1", [1, 2])
    assert prepared.sampling.seed == 2**63 - 1 and prepared.cache_key == "k"  # the original is untouched
    unseeded = choice_of(preprocess_pb2.PreprocessReply(), 2)
    assert not unseeded.sampling.HasField("seed") and unseeded.cache_key == ""


@pytest.mark.parametrize(
    ("prompts", "used", "settled_with"),
    [
        ([10, 10, 10], [15, 12, 20], 27),  # n=3 of one 10-token prompt: 5 + 2 + 10 generated
        ([10, 10, 10], [15, None, 20], None),
        ([10, 10, 4, 4], [15, 12, 6, 9], 14 + 14),  # two prompts (10 and 4 tokens), n=2 each
    ],
)
def test_choices_settle_once_with_each_prompt_counted_once(
    prompts: list[int], used: list, settled_with: int | None
) -> None:
    calls: list[int | None] = []

    async def settle(tokens: int | None) -> None:
        calls.append(tokens)

    async def report() -> None:
        parts = shared_settlement(settle, prompts, prompt_tokens=sum(set(prompts)))
        for part, tokens in reversed(list(zip(parts, used, strict=True))):  # in any order
            assert not calls  # nothing is settled before every choice has reported
            await part(tokens)

    asyncio.run(report())
    assert calls == [settled_with]
