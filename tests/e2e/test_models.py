"""Several models behind one edge: the real all-MiniLM-L6-v2 embedding model beside the chat
model, routing by model and kind, aliases, and two versions of the chat model split by
weight, pinned by header, and one taken down mid-load."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from meshproc import Mesh, start_edge, start_mesh, wait_for

from services.inference.default_model import build_default_model

CHAT = "sluice-tiny"
EMBED = "all-minilm-l6-v2"


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def models_mesh(embedding_mesh: Mesh) -> Mesh:
    return embedding_mesh


def _client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)


def test_models_lists_every_served_model_and_alias(models_mesh: Mesh) -> None:
    ids = [m.id for m in _client(models_mesh).models.list()]
    assert ids == sorted([CHAT, EMBED, "deepseek-chat", "text-embedding-3-small"])


def test_embeddings_carry_real_semantics(models_mesh: Mesh) -> None:
    texts = [
        "How do I reset my password?",
        "What is the procedure to change my password?",
        "The cat slept on the warm windowsill all afternoon.",
    ]
    reply = _client(models_mesh).embeddings.create(model=EMBED, input=texts)
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    paraphrase, unrelated = _cosine(vectors[0], vectors[1]), _cosine(vectors[0], vectors[2])
    assert paraphrase > 0.6 > 0.3 > unrelated, (paraphrase, unrelated)
    assert reply.model == EMBED and reply.usage.prompt_tokens == reply.usage.total_tokens > 10


def test_one_input_base64_token_ids_and_aliases_agree(models_mesh: Mesh) -> None:
    client = _client(models_mesh)
    as_floats = client.embeddings.create(model=EMBED, input="Sluice serves models.").data[0].embedding
    as_base64 = {"model": "text-embedding-3-small", "input": "Sluice serves models.", "encoding_format": "base64"}
    raw = httpx.post(f"{models_mesh.base_url}/embeddings", timeout=30, json=as_base64).json()
    decoded = struct.unpack(f"<{len(as_floats)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert raw["model"] == EMBED  # the alias answers with the model it stands for
    assert decoded == pytest.approx(as_floats, abs=1e-6)
    tokens = client.embeddings.create(model=EMBED, input=[[101, 7592, 2088, 102]]).data[0].embedding
    words = client.embeddings.create(model=EMBED, input="hello world").data[0].embedding
    assert tokens == pytest.approx(words, abs=1e-5)  # [CLS] hello world [SEP]


def test_wrong_kind_and_unsupported_dimensions_are_400(models_mesh: Mesh) -> None:
    client = _client(models_mesh)
    with pytest.raises(openai.BadRequestError, match="use /v1/embeddings"):
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="use /v1/chat/completions"):
        client.embeddings.create(model=CHAT, input="hi")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=EMBED, input="hi", dimensions=128)
    assert len(client.embeddings.create(model=EMBED, input="hi", dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")


def test_chat_through_an_alias(models_mesh: Mesh) -> None:
    reply = _client(models_mesh).chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.model == CHAT and reply.usage.completion_tokens == 3


def test_concurrent_callers_share_embedding_passes(models_mesh: Mesh) -> None:
    def counters() -> tuple[float, float]:
        samples = models_mesh.scrape("inference-embed")
        passes = samples.value("sluice_inference_embedding_passes_total")
        inputs = samples.value("sluice_inference_embedded_inputs_total")
        return passes, inputs

    passes_before, inputs_before = counters()

    async def burst() -> None:
        async with openai.AsyncOpenAI(base_url=models_mesh.base_url, api_key="unused", max_retries=0) as client:
            await asyncio.gather(*(client.embeddings.create(model=EMBED, input=f"sentence {i}") for i in range(32)))

    asyncio.run(burst())
    passes, inputs = counters()
    assert inputs - inputs_before == 32
    assert passes - passes_before < 32  # callers that arrived together shared forward passes


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    # Version 2: the same architecture and tokenizer, other weights (another seed), same model id.
    v2 = build_default_model(tmp_path_factory.mktemp("v2") / CHAT, seed=1)
    served = ["--served-model-version", "1", "--extra-model", f"{v2}@2"]
    weights = ["--model-weights", f"{CHAT}@1=80,{CHAT}@2=20"]
    mesh = start_mesh(tmp_path_factory.mktemp("versions"), certs_dir, model_dir, *served, *weights)
    try:
        yield mesh
    finally:
        mesh.stop()


def _versions(mesh: Mesh, count: int, headers: dict[str, str] | None = None) -> Counter:
    seen: Counter = Counter()

    async def run() -> None:
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=mesh.base_url, timeout=60) as http:

            async def one(i: int) -> None:
                async with gate:
                    reply = await http.post(
                        "/chat/completions",
                        headers=headers or {},
                        json={"model": CHAT, "messages": [{"role": "user", "content": f"v {i}"}], "max_tokens": 1},
                    )
                    seen[reply.headers.get("x-sluice-model-version") if reply.status_code == 200 else "failed"] += 1

            await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(run())
    return seen


def test_versions_split_by_weight_and_the_pin_header_wins(two_versions: Mesh) -> None:
    split = _versions(two_versions, 200)
    # 80/20 over 200 draws: the binomial standard deviation is 5.7 requests; allow 4 of them.
    assert split["failed"] == 0 and split["1"] + split["2"] == 200
    assert abs(split["2"] - 40) <= 23, split
    for pinned in ("1", "2"):
        assert _versions(two_versions, 20, {"X-Sluice-Model-Version": pinned}) == Counter({pinned: 20})
    reply = httpx.post(
        f"{two_versions.base_url}/chat/completions",
        headers={"X-Sluice-Model-Version": "7"},
        json={"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        timeout=30,
    )
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_version_not_found"


def test_a_version_taken_down_gets_nothing_and_nothing_fails(two_versions: Mesh) -> None:
    os.kill(two_versions.services["inference-m2"]["pid"], signal.SIGTERM)
    up_log = two_versions.log_dir.parent / "up.log"
    # Requests keep flowing while it drains; none of them fails.
    during = _versions(two_versions, 40)
    assert during["failed"] == 0
    assert wait_for(lambda: "inference-m2 exited with code 0" in up_log.read_text(), timeout=30)
    after = _versions(two_versions, 40)
    assert after == Counter({"1": 40})


def test_rerank_orders_documents_by_meaning(models_mesh: Mesh) -> None:
    documents = [
        "Bananas are a good source of potassium.",
        "To reset your password, open Settings and choose Security.",
        {"text": "Our office is closed on public holidays."},
    ]
    body = {"model": EMBED, "query": "How can I change my password?", "documents": documents, "top_n": None}
    reply = httpx.post(f"{models_mesh.base_url}/rerank", json=body, timeout=30)
    assert reply.status_code == 200
    results = reply.json()["results"]
    assert results[0]["index"] == 1 and len(results) == 3
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert results[0]["document"] == {"text": documents[1]}
    assert reply.json()["usage"]["total_tokens"] > 10

    top_one = body | {"top_n": 1, "return_documents": False, "model": "text-embedding-3-small"}
    top = httpx.post(f"{models_mesh.base_url}/rerank", timeout=30, json=top_one).json()
    assert top["results"] == [{"index": 1, "relevance_score": pytest.approx(scores[0], abs=1e-6)}]


def test_rerank_refuses_what_it_cannot_do(models_mesh: Mesh) -> None:
    url = f"{models_mesh.base_url}/rerank"
    assert httpx.post(url, json={"model": EMBED, "query": "q", "documents": []}, timeout=30).status_code == 400
    assert httpx.post(url, json={"model": CHAT, "query": "q", "documents": ["d"]}, timeout=30).status_code == 400
    missing = httpx.post(url, json={"model": "nope", "query": "q", "documents": ["d"]}, timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_an_over_long_embedding_input_is_cut_to_the_models_limit(models_mesh: Mesh, tmp_path: Path) -> None:
    """What Dify's indexing sends: long chunks, no truncation field. Cut by default, as the request
    asks with truncate_prompt_tokens, refused where the deployment says so."""
    long = "the river reached the sluice gate " * 400
    url = f"{models_mesh.base_url}/embeddings"
    cut = httpx.post(url, json={"model": EMBED, "input": [long, "short"]}, timeout=60)
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 256 + 3  # the model's limit, and [CLS] short [SEP]
    asked = httpx.post(url, json={"model": EMBED, "input": long, "truncate_prompt_tokens": 10}, timeout=60)
    assert asked.json()["usage"]["prompt_tokens"] == 10
    same = httpx.post(url, json={"model": EMBED, "input": long, "truncate_prompt_tokens": -1}, timeout=60)
    assert same.json()["data"][0]["embedding"] == cut.json()["data"][0]["embedding"]
    inference = ",".join(info["address"] for name, info in models_mesh.services.items() if name.startswith("inference"))
    strict = start_edge(models_mesh, tmp_path, "--no-auth", "--no-embedding-truncate", inference=inference)
    try:
        refused = httpx.post(f"{strict.base_url}/embeddings", json={"model": EMBED, "input": ["ok", long]}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[1]"
        allowed = {"model": EMBED, "input": long, "truncate_prompt_tokens": -1}
        assert httpx.post(f"{strict.base_url}/embeddings", json=allowed, timeout=60).status_code == 200
    finally:
        strict.stop()
