"""Input a client may send but the mesh cannot carry, on the real mesh: each is that request's
400 (or 413/431) naming what is wrong, never a 500, and never counted against an instance."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import openai
import pytest
from meshproc import Mesh

MODEL = "sluice-tiny"
FIVE_MB = 5 * 1024 * 1024
UPSTREAMS = ("preprocess", "inference", "cache")


def _chat(**extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _post(mesh: Mesh, path: str, body: dict) -> httpx.Response:
    """POST `body` as json.dumps writes it: a lone surrogate becomes the `\\ud800` escape JSON allows."""
    content = json.dumps(body)
    return httpx.post(mesh.base_url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)


SURROGATES = [
    ("/chat/completions", _chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content"),
    ("/chat/completions", _chat(stop=["ok", "a\udfffb"]), "stop[1]"),
    ("/chat/completions", _chat(messages=[{"role": "user", "name": "\ud800", "content": "a"}]), "messages[0].name"),
    ("/completions", {"model": MODEL, "prompt": "a\ud800b"}, "prompt"),
    ("/completions", {"model": MODEL, "prompt": "a", "stop": "\udc00"}, "stop"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATES)
def test_an_unpaired_surrogate_is_a_400_naming_the_field(mesh: Mesh, path: str, body: dict, field: str) -> None:
    reply = _post(mesh, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and "surrogate" in error["message"]


def test_a_valid_surrogate_pair_is_text_like_any_other(mesh: Mesh) -> None:
    reply = _post(mesh, "/chat/completions", _chat(messages=[{"role": "user", "content": "smile \U0001f600"}]))
    assert reply.status_code == 200, reply.text


def _tool(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


DEEP = [
    (_chat(tools=_tool(_nested(450))), "tools[0].function.parameters"),
    (
        _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(450)}}),
        "response_format",
    ),
    (_chat(metadata=_nested(100)), "metadata"),
    (_chat(logit_bias=_nested(70)), "logit_bias"),
]


def _ejections(mesh: Mesh) -> dict[str, float]:
    samples = mesh.scrape("edge")
    return {
        svc: samples.value("sluice_edge_upstream_ejections_total", service=svc) for svc in ("preprocess", "inference")
    }


def test_deep_nesting_is_a_400_and_ejects_no_instance(mesh: Mesh) -> None:
    before = _ejections(mesh)
    whole = b'{"model":"sluice-tiny","messages":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    for _ in range(4):  # more than the failures in a row that would eject an instance
        for body, field in DEEP:
            reply = _post(mesh, "/chat/completions", body)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"].startswith(field) and "deeper than 64 levels" in error["message"]
        reply = httpx.post(f"{mesh.base_url}/chat/completions", content=whole, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_body", reply.text
    assert _ejections(mesh) == before
    # A schema nested within the bound still works end to end.
    assert _post(mesh, "/chat/completions", _chat(tools=_tool(_nested(25)))).status_code == 200


def _five_mb_chat() -> bytes:
    return json.dumps(_chat(messages=[{"role": "user", "content": "x" * FIVE_MB}])).encode()


def test_an_oversized_body_is_a_413_every_client_can_read(mesh: Mesh) -> None:
    body = _five_mb_chat()
    url = f"{mesh.base_url}/chat/completions"
    # urllib writes the whole body before it reads a byte of the answer.
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413 and json.load(refused.value)["error"]["code"] == "request_too_large"

    reply = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size shows only as it arrives
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    reply = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

    client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as sdk:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * FIVE_MB}])
    assert sdk.value.status_code == 413 and sdk.value.body["code"] == "request_too_large"


def test_oversized_headers_are_a_431(mesh: Mesh) -> None:
    headers = {"Authorization": "Bearer " + "a" * (1 << 20)}
    reply = httpx.post(f"{mesh.base_url}/chat/completions", json=_chat(), headers=headers, timeout=30)
    assert reply.status_code == 431 and reply.json()["error"]["code"] == "request_header_fields_too_large"
    # The edge is unharmed.
    assert httpx.post(f"{mesh.base_url}/chat/completions", json=_chat(), timeout=30).status_code == 200
