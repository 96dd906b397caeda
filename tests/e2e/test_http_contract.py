"""The edge's HTTP surface byte for byte: error shapes and statuses, and Dify's strict SSE contract."""

from __future__ import annotations

import json

import httpx
import pytest
from meshproc import Mesh

MODEL = "sluice-tiny"
PING = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "ping"}]}


@pytest.fixture(scope="module")
def http(served: Mesh) -> httpx.Client:
    """Against the built-in engine, then a vLLM worker: Dify's contract holds whichever generates."""
    with httpx.Client(base_url=served.base_url.removesuffix("/v1"), timeout=60) as client:
        yield client


BAD_REQUESTS = [
    ("not json", b"{'model':", 400, "invalid_json", None),
    ("body is a list", b"[1, 2]", 400, "invalid_body", None),
    ("missing messages", json.dumps({"model": MODEL}).encode(), 400, "invalid_value", "messages"),
    ("messages is a string", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "invalid_value", "messages"),
    ("empty messages", json.dumps({"model": MODEL, "messages": []}).encode(), 400, "invalid_value", "messages"),
    (
        "temperature is a string",
        json.dumps({**PING, "temperature": "hot"}).encode(),
        400,
        "invalid_value",
        "temperature",
    ),
    ("max_tokens negative", json.dumps({**PING, "max_tokens": -1}).encode(), 400, "invalid_value", "max_tokens"),
    (
        "unknown role",
        json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
        "invalid_value",
        "messages[0].role",
    ),
    ("unknown model", json.dumps({**PING, "model": "no-such-model"}).encode(), 404, "model_not_found", "model"),
    (
        "max_tokens beyond the context",
        json.dumps({**PING, "max_tokens": 4096}).encode(),
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "prompt longer than the context",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}).encode(),
        400,
        "context_length_exceeded",
        "messages",
    ),
    (
        "image for a text-only model",
        json.dumps(
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
                    }
                ],
            }
        ).encode(),
        400,
        "invalid_value",
        "messages[0].content",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"), [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_malformed_requests_get_openai_errors(
    http: httpx.Client, body: bytes, status: int, code: str, param: str | None
) -> None:
    reply = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_model_not_found_message_names_the_model(http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json={**PING, "model": "deepseek-chat"})
    assert "deepseek-chat" in reply.json()["error"]["message"]


def test_unknown_route_is_an_openai_404(http: httpx.Client) -> None:
    reply = http.post("/v1/nope", json={})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("auth", [None, "", "Bearer None", "Bearer sk-anything"])
def test_dify_credential_check(http: httpx.Client, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    reply = http.post("/v1/chat/completions", json=PING, headers=headers)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(body["usage"])


def test_base_url_with_trailing_slash_works(http: httpx.Client) -> None:
    assert http.post("/v1//chat/completions", json=PING).status_code == 200
    assert http.post("/v1//completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_extra_fields_dify_sends_are_accepted(http: httpx.Client) -> None:
    body = {
        **PING,
        "user": "dify-user-1",
        "stop": ["\n\n", "Observation"],
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "functions": [{"name": "f", "parameters": {}}],
        "chat_template_kwargs": {"enable_thinking": False},
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "alice"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
    }
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


def test_stream_wire_format_is_what_dify_parses(http: httpx.Client) -> None:
    body = {**PING, "max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read()
    assert b"\r" not in raw
    events = _events(raw)
    assert events[-1] == b"data: [DONE]"
    payloads = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        payloads.append(json.loads(event[len(b"data: ") :]))
    assert all("choices" in p for p in payloads)
    *choice_chunks, usage_chunk = payloads
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    reasons = [p["choices"][0]["finish_reason"] for p in choice_chunks]
    assert reasons[-1] == "length" and reasons[:-1] == [None] * (len(reasons) - 1)


def test_stream_without_stream_options_has_no_usage_chunk(http: httpx.Client) -> None:
    body = {**PING, "max_tokens": 3, "stream": True}
    raw = http.post("/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}).content
    payloads = [json.loads(e[len(b"data: ") :]) for e in _events(raw)[:-1]]
    assert all(p["choices"] for p in payloads)
    assert all("usage" not in p for p in payloads)


def test_errors_before_the_stream_starts_are_http_errors(http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json={**PING, "model": "other", "stream": True})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


def test_health_reports_every_service_and_model_serving(http: httpx.Client) -> None:
    reply = http.get("/health")
    assert reply.status_code == 200
    one = {"serving": 1, "instances": 1}
    assert reply.json() == {
        "status": "ok",
        "services": {"preprocess": one, "inference": one, "cache": one},
        "models": {"sluice-tiny": one},
    }


def test_responses_carry_a_request_id(http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json=PING)
    assert reply.json()["id"] == "chatcmpl-" + reply.headers["x-request-id"]
