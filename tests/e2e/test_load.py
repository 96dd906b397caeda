"""The batching engine behind the real mesh: many concurrent clients, and backpressure as HTTP 429."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import openai
import pytest
from meshproc import Mesh, start_mesh, wait_for

MODEL = "sluice-tiny"


def test_32_concurrent_streaming_clients_all_complete_with_correct_usage(mesh: Mesh, tokenizer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, int, int]:
        messages = [{"role": "user", "content": f"client {i} says hello"}]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"Cache-Control": "no-cache"},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return text, usage.prompt_tokens, expected_prompt, usage.completion_tokens

    async def run() -> list[tuple[str, int, int, int]]:
        async with openai.AsyncOpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    for text, prompt_tokens, expected_prompt, completion_tokens in results:
        assert text
        assert prompt_tokens == expected_prompt
        assert completion_tokens == 24


@pytest.fixture(scope="module")
def tiny_mesh(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Mesh:
    """A mesh whose engine takes one sequence and queues one more."""
    running = start_mesh(
        tmp_path_factory.mktemp("tiny-mesh"), certs_dir, model_dir, "--max-running", "1", "--max-waiting", "1"
    )
    yield running
    running.stop()


def test_full_queue_is_a_429_with_retry_after(tiny_mesh: Mesh) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "ignore_eos": True}
    url = f"{tiny_mesh.base_url}/chat/completions"
    queued: list[httpx.Response] = []
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json={**body, "stream": True}) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: dropping the iterator would close the response
        next(lines)
        waiter = threading.Thread(target=lambda: queued.append(httpx.post(url, json={**body, "max_tokens": 3})))
        waiter.start()
        assert wait_for(lambda: tiny_mesh.metric("inference", "sluice_inference_queue_depth") == 1)
        refused = httpx.post(url, json=body, timeout=60)
    waiter.join(timeout=60)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert "queue" in error["message"]
    # Closing the running stream freed the slot: the queued request was then served.
    assert queued[0].status_code == 200
    assert queued[0].json()["usage"]["completion_tokens"] == 3
