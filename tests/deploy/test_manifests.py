"""deploy/: compose files against the Compose specification's JSON schema, Kubernetes manifests
against the API's schemas, the Dockerfile through hadolint, and the vLLM flags in all of them
against the profiles they claim to mirror."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ragllm.config import load_settings
from ragllm.engines.vllm.flags import vllm_serve_args
from tests.support.vllm_standin import flag_values

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOOLS = Path(sys.executable).parent  # check-jsonschema, kubernetes-validate, hadolint: test extras
COMPOSE_FILES = {
    "local": DEPLOY / "docker-compose.yml",
    "cloud": DEPLOY / "docker-compose.cloud.yml",
}
COMPARED_FLAGS = (
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--quantization",
    "--kv-cache-dtype",
    "--enable-chunked-prefill",
    "--tensor-parallel-size",
    "--gpu-memory-utilization",
    "--enable-prompt-tokens-details",
)


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS / tool), *args], capture_output=True, text=True, timeout=120)


def _with_defaults(value: str) -> str:
    """Compose's ``${VAR:-default}`` (and Kubernetes' ``$(VAR)`` via ``env``) as deployed by default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _profile_flags(profile: str, monkeypatch, model: str) -> dict[str, str | None]:
    """The profile's flags for the model the deploy file serves (quantization flags follow the model)."""
    for name in ("VLLM_MAX_NUM_SEQS", "TENSOR_PARALLEL_SIZE", "RAGLLM_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_MODEL_ID", model)
    flags = flag_values(vllm_serve_args(load_settings(profile=profile))[3:])
    return {flag: value for flag, value in flags.items() if flag in COMPARED_FLAGS}


@pytest.mark.parametrize("path", COMPOSE_FILES.values(), ids=COMPOSE_FILES.keys())
def test_compose_file_follows_the_compose_spec(path):
    result = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text(
        "services:\n  web:\n    image: nginx\n    restart: sometimes-maybe\n    portz: [80]\n"
    )
    result = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0 and "portz" in result.stdout + result.stderr


@pytest.mark.parametrize("profile", ["local", "cloud"])
def test_compose_vllm_flags_mirror_the_profile(profile, monkeypatch):
    services = yaml.safe_load(COMPOSE_FILES[profile].read_text())["services"]
    vllm_services = [s for name, s in services.items() if name.startswith("vllm")]
    assert vllm_services
    for service in vllm_services:
        command = [_with_defaults(str(arg)) for arg in service["command"]]
        flags = flag_values(command)
        model = next(arg for arg in command if "/" in arg and not arg.startswith("-"))
        assert {f: v for f, v in flags.items() if f in COMPARED_FLAGS} == _profile_flags(
            profile, monkeypatch, model
        )
        assert "--quantization" in flags  # the deploy files serve AWQ checkpoints


def test_local_compose_is_host_networked_and_cloud_is_bridged():
    local = yaml.safe_load(COMPOSE_FILES["local"].read_text())["services"]
    assert all(service["network_mode"] == "host" for service in local.values())
    assert (
        local["rag-llm-service"]["environment"]["RAGLLM_UPSTREAM__URLS"] == "http://127.0.0.1:8000"
    )
    cloud = yaml.safe_load(COMPOSE_FILES["cloud"].read_text())["services"]
    assert not any("network_mode" in service for service in cloud.values())
    assert cloud["rag-llm-service"]["ports"] == ["8081:8081"]
    for name, service in {**local, **cloud}.items():
        assert service["restart"] == "unless-stopped", name
        assert "healthcheck" in service or "build" in service, (
            name
        )  # the image has its own HEALTHCHECK
    upstreams = _with_defaults(cloud["rag-llm-service"]["environment"]["RAGLLM_UPSTREAM__URLS"])
    assert all(url.split("//")[1].split(":")[0] in cloud for url in upstreams.split(","))


def test_kubernetes_manifests_follow_the_api_schemas():
    manifests = sorted(str(path) for path in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) >= 4
    result = _run("kubernetes-validate", "--strict", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_check_rejects_a_broken_manifest(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: two\n"
    )
    assert _run("kubernetes-validate", "--strict", str(broken)).returncode != 0


def test_kubernetes_vllm_flags_and_autoscaler_agree_with_the_service(monkeypatch):
    documents = [
        doc
        for path in (DEPLOY / "k8s").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
    ]
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    container = by_kind[("StatefulSet", "vllm")]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value", "") for item in container["env"]}
    args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    flags = flag_values(args)
    expected = _profile_flags("cloud", monkeypatch, env["LLM_MODEL_ID"])
    assert {f: v for f, v in flags.items() if f in COMPARED_FLAGS} == expected
    # The service finds every vLLM replica through the headless Service, so the autoscaler may add any.
    from ragllm.engines.upstream.discovery import DiscoveredName

    (entry,) = by_kind[("ConfigMap", "rag-llm-service")]["data"]["RAGLLM_UPSTREAM__URLS"].split(",")
    name = DiscoveredName.parse(entry)
    service = by_kind[("Service", "vllm")]["spec"]
    assert service["clusterIP"] == "None" and name.host == "vllm"
    assert name.port == service["ports"][0]["port"]
    hpa = by_kind[("HorizontalPodAutoscaler", "vllm")]["spec"]
    assert hpa["maxReplicas"] > 4
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


def test_the_ingress_terminates_tls_and_routes_to_the_service():
    documents = [
        doc
        for path in (DEPLOY / "k8s").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
    ]
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    ingress = by_kind[("Ingress", "rag-llm-service")]
    (tls,) = ingress["spec"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert tls["secretName"] and rule["host"] in tls["hosts"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = by_kind[("Service", "rag-llm-service")]
    assert backend["name"] == "rag-llm-service"
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    assert (
        annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    )  # streams pass as they come
    assert (
        "Bearer" in annotations["nginx.ingress.kubernetes.io/configuration-snippet"]
    )  # auth at the edge


def test_dockerfile_passes_hadolint_and_runs_as_a_non_root_user():
    dockerfile = DEPLOY / "Dockerfile"
    result = _run("hadolint", str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text and "/health" in text
