"""A scripted inference service for tests: real gRPC over the mesh's mTLS with grpc.health.v1,
announcing a model and streaming whatever a test scripts (behaviour the default model, whose
text is gibberish, cannot show), optionally behind a real edge of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from meshproc import Edge, Mesh, start_edge

from services.mesh.config import Settings
from services.mesh.rpc.tls import server_credentials
from services.mesh.stubs import common_pb2, inference_pb2, inference_pb2_grpc

Script = Callable[[inference_pb2.GenerateRequest, grpc.ServicerContext], list[str]]


class ScriptedModel(inference_pb2_grpc.InferenceServicer):
    """Announces `info`; Generate records the prompt's token ids and streams the texts `script`
    returns for the request, one chunk each, then a finishing chunk with usage."""

    def __init__(self, info: inference_pb2.ModelInfo, script: Script) -> None:
        self.info, self.script = info, script
        self.prompts: list[list[int]] = []

    def ListModels(self, request, context):
        return inference_pb2.ListModelsReply(models=[self.info])

    def Generate(self, request, context):
        self.prompts.append(list(request.token_ids))
        texts = self.script(request, context)
        for index, text in enumerate(texts):
            yield inference_pb2.GenerateChunk(token_ids=[index], text=text)
        yield inference_pb2.GenerateChunk(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=len(request.token_ids), completion_tokens=len(texts)),
        )


@contextmanager
def scripted_inference(servicer: inference_pb2_grpc.InferenceServicer, certs_dir: Path) -> Iterator[str]:
    """Serve `servicer` as the `inference` identity on a free port; yields host:port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(Settings(certs_dir=certs_dir), "inference"))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@contextmanager
def scripted_edge(mesh: Mesh, workdir: Path, servicer: ScriptedModel, *flags: str) -> Iterator[Edge]:
    """A real edge (no keys) in front of the mesh's preprocess and cache and of `servicer`."""
    with scripted_inference(servicer, mesh.certs_dir) as address:
        edge = start_edge(mesh, workdir, "--no-auth", *flags, inference=address)
        try:
            yield edge
        finally:
            edge.stop()
