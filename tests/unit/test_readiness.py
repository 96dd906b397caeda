"""/health's verdict from the instances' health checks, without a network."""

from __future__ import annotations

from services.edge_http.core.readiness import Availability, Probe, Status, readiness

SERVICES = ("preprocess", "inference", "cache")


def _mesh(**down: bool) -> list[Probe]:
    """preprocess, cache, a chat model on two replicas and an embedding model; `down` names probes that fail."""
    probes = [
        Probe("preprocess", "p:1", True),
        Probe("cache", "c:1", True),
        Probe("inference", "i:1", True, "chat"),
        Probe("inference", "i:2", True, "chat"),
        Probe("inference", "e:1", True, "embed"),
    ]
    names = {"preprocess": "p:1", "cache": "c:1", "chat1": "i:1", "chat2": "i:2", "embed": "e:1"}
    failing = {names[name] for name, is_down in down.items() if is_down}
    return [Probe(p.service, p.address, p.address not in failing, p.model) for p in probes]


def test_everything_serving_is_ok() -> None:
    verdict = readiness(SERVICES, _mesh())
    assert (verdict.status, verdict.http_status) == (Status.OK, 200)
    assert verdict.models == {"chat": Availability(2, 2), "embed": Availability(1, 1)}
    assert verdict.services["inference"] == Availability(3, 3)


def test_a_lost_replica_or_the_cache_is_degraded_but_ready() -> None:
    for down in ({"chat1": True}, {"cache": True}):
        verdict = readiness(SERVICES, _mesh(**down))
        assert (verdict.status, verdict.http_status) == (Status.DEGRADED, 200), down


def test_the_chat_models_last_instance_down_is_unavailable_although_the_embedding_model_serves() -> None:
    verdict = readiness(SERVICES, _mesh(chat1=True, chat2=True))
    assert (verdict.status, verdict.http_status) == (Status.UNAVAILABLE, 503)
    assert verdict.models["chat"] == Availability(0, 2)
    assert verdict.services["inference"] == Availability(1, 3)  # the embedding instance is not a chat replica


def test_the_embedding_models_last_instance_down_is_unavailable_too() -> None:
    assert readiness(SERVICES, _mesh(embed=True)).status is Status.UNAVAILABLE


def test_preprocess_down_or_missing_is_unavailable() -> None:
    assert readiness(SERVICES, _mesh(preprocess=True)).status is Status.UNAVAILABLE
    without = [p for p in _mesh() if p.service != "preprocess"]
    verdict = readiness(SERVICES, without)
    assert verdict.status is Status.UNAVAILABLE and verdict.services["preprocess"] == Availability(0, 0)


def test_no_model_described_yet_is_unavailable() -> None:
    probes = [Probe("preprocess", "p:1", True), Probe("inference", "i:1", False), Probe("cache", "c:1", True)]
    assert readiness(SERVICES, probes).status is Status.UNAVAILABLE
