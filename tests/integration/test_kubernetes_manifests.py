"""deploy/kubernetes rendered by the real `kubectl kustomize` (base and every example, which
between them use every component) and validated strictly: Kubernetes' own kinds against 1.31's
schemas (kubernetes-validate), custom resources against the schemas their projects publish
(tests/crd_schemas). Then what the manifests must say: probes, requests and limits, a
PodDisruptionBudget per backend, autoscaling on queue depth, who may reach whom."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
RENDERINGS = [KUBERNETES, *sorted((KUBERNETES / "examples").iterdir())]
COMPONENTS = sorted(p.name for p in (KUBERNETES / "components").iterdir())
SCHEMAS = Path(__file__).resolve().parents[1] / "crd_schemas"
VERSION = "1.31.0"
BACKENDS = ("sluice-preprocess", "sluice-inference", "sluice-cache")
SERVICES = (*BACKENDS, "sluice-edge", "sluice-envoy", "sluice-redis")


@cache
def _render(path: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # never a quiet skip: these manifests are the product too
        pytest.fail("kubectl is needed to render deploy/kubernetes (`kubectl kustomize`); install it and rerun")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _name(path: Path) -> str:
    return path.relative_to(KUBERNETES).as_posix() if path != KUBERNETES else "base"


def _of(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _crd_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    group, _, version = doc["apiVersion"].rpartition("/")
    path = SCHEMAS / f"{doc['kind'].lower()}-{group}-{version}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields the schema does not declare (the API server would drop them): the strict half that
    jsonschema, reading openAPIV3Schema, does not do."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += _unknown_fields(item, schema["properties"][key], f"{where}.{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [
            f
            for key, item in value.items()
            for f in _unknown_fields(item, schema["additionalProperties"], f"{where}.{key}")
        ]
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in _unknown_fields(item, schema["items"], f"{where}[{i}]")]
    return []


def _validate(doc: dict[str, Any]) -> None:
    crd = _crd_schema(doc)
    if crd is None:
        kubernetes_validate.validate(doc, VERSION, strict=True)
        return
    jsonschema.validate({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}, crd)
    unknown = _unknown_fields(doc, crd)
    assert not unknown, f"{doc['kind']} {doc['metadata']['name']}: fields its schema lacks: {unknown}"


def test_every_component_is_rendered_by_an_example() -> None:
    used = set()
    for example in RENDERINGS[1:]:
        used |= {
            Path(c).name for c in yaml.safe_load((example / "kustomization.yaml").read_text()).get("components", [])
        }
    assert used == set(COMPONENTS)


@pytest.mark.parametrize("path", RENDERINGS, ids=_name)
def test_every_object_is_valid_for_kubernetes_1_31(path: Path) -> None:
    docs = _render(path)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"}
    for doc in docs:
        _validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "sluice", f"{doc['kind']} {doc['metadata']['name']}"


def test_validation_refuses_what_the_cluster_would_refuse() -> None:
    """The checks above can fail: an unknown field, a wrong type, a custom resource off its schema."""
    docs = _render(KUBERNETES / "examples" / "gpu")
    deployment = copy.deepcopy(_of(docs, "Deployment")["sluice-inference"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    deployment = copy.deepcopy(_of(docs, "Deployment")["sluice-inference"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    scaled = copy.deepcopy(_of(docs, "ScaledObject")["sluice-inference"])
    scaled["spec"]["maxReplicas"] = 8  # the field is maxReplicaCount
    with pytest.raises(AssertionError, match="maxReplicas"):
        _validate(scaled)
    certificate = copy.deepcopy(_of(docs, "Certificate")["sluice-inference"])
    certificate["spec"]["privateKey"]["algorithm"] = "DSA"
    with pytest.raises(jsonschema.ValidationError):
        _validate(certificate)


@pytest.mark.parametrize("path", RENDERINGS, ids=_name)
def test_every_workload_is_probed_bounded_and_locked_down(path: Path) -> None:
    deployments = _of(_render(path), "Deployment")
    assert set(deployments) == set(SERVICES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container), where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            assert "memory" in container["resources"]["limits"], where
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
        if name in BACKENDS:
            container = pod["containers"][0]
            # Probes through `sluice health` over mTLS; the liveness probe waits out a stall.
            assert container["readinessProbe"]["exec"]["command"][:3] == [
                "sluice",
                "health",
                name.removeprefix("sluice-"),
            ]
            live = container["livenessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] > 30, name  # beyond the stall timeout
            # The drain fits in the grace period: preStop pause + SLUICE_DRAIN_GRACE_S.
            assert pod["terminationGracePeriodSeconds"] > 5 + 30, name
            assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


@pytest.mark.parametrize("path", RENDERINGS, ids=_name)
def test_every_backend_has_a_disruption_budget_and_a_headless_service(path: Path) -> None:
    docs = _render(path)
    budgets = [
        b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for b in _of(docs, "PodDisruptionBudget").values()
    ]
    services = _of(docs, "Service")
    for name in BACKENDS:
        assert name in budgets
        assert services[name]["spec"]["clusterIP"] == "None"  # resolves to every ready pod


def test_inference_pods_keep_their_freed_memory_as_sluice_up_does() -> None:
    """The malloc settings `sluice up` gives the inference process, in the cluster's pods too (the
    wait policy is the host's to choose: a pod has its cores to itself)."""
    from services.up import INFERENCE_ENVIRONMENT

    deployment = _of(_render(KUBERNETES), "Deployment")["sluice-inference"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "inference"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    malloc = {name: value for name, value in INFERENCE_ENVIRONMENT.items() if name.startswith("MALLOC_")}
    assert malloc and {name: env.get(name) for name in malloc} == malloc


def test_autoscaling_is_on_queue_depth_not_cpu() -> None:
    hpa = _of(_render(KUBERNETES / "examples" / "prometheus-adapter"), "HorizontalPodAutoscaler")["sluice-inference"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sluice-inference"
    assert [(m["type"], m["pods"]["metric"]["name"]) for m in hpa["spec"]["metrics"]] == [
        ("Pods", "sluice_inference_queue_depth")
    ]
    scaled = _of(_render(KUBERNETES / "examples" / "gpu"), "ScaledObject")["sluice-inference"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "sluice-inference"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "sluice_inference_queue_depth" in trigger["metadata"]["query"]


def test_only_the_edge_reaches_the_backends_and_only_envoy_the_edge() -> None:
    policies = _of(_render(KUBERNETES), "NetworkPolicy")
    assert policies["sluice-default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    backends = policies["sluice-backends-from-edge"]["spec"]
    assert backends["podSelector"]["matchExpressions"][0]["values"] == list(BACKENDS)
    assert [f["podSelector"]["matchLabels"] for f in backends["ingress"][0]["from"]] == [
        {"app.kubernetes.io/name": "sluice-edge"}
    ]
    edge = policies["sluice-edge-from-envoy"]["spec"]["ingress"][0]["from"]
    assert [f["podSelector"]["matchLabels"] for f in edge] == [{"app.kubernetes.io/name": "sluice-envoy"}]


def test_identities_and_dns_names_match_what_the_mesh_checks() -> None:
    """cert-manager issues each service the spiffe identity its peers check and the names the edge
    verifies when it reaches pods by IP (SLUICE_*_ADDR in the ConfigMap)."""
    docs = _render(KUBERNETES / "examples" / "demo")
    certificates = _of(docs, "Certificate")
    config = _of(docs, "ConfigMap")["sluice-config"]["data"]
    for name in (*BACKENDS, "sluice-edge", "sluice-envoy"):
        spec = certificates[name]["spec"]
        assert spec["uris"] == [f"spiffe://sluice/{name.removeprefix('sluice-')}"]
        assert spec["secretName"] == f"{name}-tls"
        assert {"server auth", "client auth"} <= set(spec["usages"])
    for service in ("preprocess", "inference", "cache"):
        host = config[f"SLUICE_{service.upper()}_ADDR"].rpartition(":")[0]
        assert host in certificates[f"sluice-{service}"]["spec"]["dnsNames"]
    assert config["SLUICE_DISCOVERY"] == "dns"
    mounted = {
        v["secret"]["secretName"]
        for d in _of(docs, "Deployment").values()
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "secret" in v and v["name"] == "certs"
    }
    assert mounted == {c["spec"]["secretName"] for c in certificates.values() if not c["spec"].get("isCA")}
