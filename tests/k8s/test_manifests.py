"""The Kubernetes tree (k8s/: base, components, overlays dev and gpu) as ``kubectl kustomize`` renders it.

Schema validation is ``kubernetes-validate`` (the API server's OpenAPI schemas, strict: an
unknown field fails) for the oldest and newest Kubernetes versions we claim; the custom
resources (KEDA's ScaledObject, the Prometheus Operator's ServiceMonitor and PrometheusRule),
which it has no schema for, get their required fields checked by hand. The rest checks what
a schema cannot: every ConfigMap, Secret, volume, claim, Service and port a manifest names
exists in the same rendering (or is one of the Secrets the operator creates, listed in the
README); each command is one our CLIs parse, with settings files that load; the gateway's
drain fits in its pod's grace period; the alerts name metrics the gateway exposes.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.keyfile import load_keys
from gateway.settings import load as load_gateway
from tests.k8s.exposition import METRIC, exposition
from tests.k8s.kustomize import K8S, containers, of_kind, pod_specs, render

OVERLAYS = ("dev", "gpu")
VERSIONS = ("1.29.0", "1.34.0")
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("spec.scaleTargetRef.name", "spec.triggers"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("spec.selector.matchLabels", "spec.endpoints"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("spec.groups",),
}
EXTERNAL_SECRETS = {"gpu": {"bon-store", "bon-api-keys"}, "dev": set()}
"""Secrets the operator creates before applying (README, "Deploy on Kubernetes"); dev generates its own."""


def workload(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    return dict(pod_specs(docs))[name]


def container(docs: tuple[dict[str, Any], ...], name: str, container_name: str) -> dict[str, Any]:
    (found,) = [c for c in workload(docs, name)["containers"] if c["name"] == container_name]
    assert isinstance(found, dict)
    return found


def configmap_file(docs: tuple[dict[str, Any], ...], prefix: str, key: str, tmp: Path) -> Path:
    """A generated ConfigMap's file (its name has kustomize's hash suffix), written to ``tmp``."""
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix + "-")]
    path = tmp / key
    path.write_text(found["data"][key])
    return path


def field(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_the_whole_loop(overlay: str) -> None:
    docs = render(overlay)
    deployments = set(of_kind(docs, "Deployment"))
    assert {"bon-gateway", "bon-vllm"} <= deployments
    assert "bon-reward" in deployments  # components/remote-scorer
    assert set(of_kind(docs, "CronJob")) == {"bon-trainer"}
    assert "bon-registry-init" in of_kind(docs, "Job")
    assert set(of_kind(docs, "PersistentVolumeClaim")) == {"bon-registry", "bon-models"}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    if overlay == "dev":
        assert "bon-postgres" in of_kind(docs, "StatefulSet")
        assert "bon-models-build" in of_kind(docs, "Job")
    else:
        assert {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in docs}
        assert not of_kind(docs, "StatefulSet")  # PostgreSQL is external


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str, version: str) -> None:
    for doc in render(overlay):
        required = CUSTOM.get((doc["apiVersion"], doc["kind"]))
        if required is not None:
            for path in required:
                assert field(doc, path), f"{doc['kind']}/{doc['metadata']['name']}: {path} is empty"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(of_kind(render("dev"), "CronJob")["bon-trainer"])
    broken["spec"]["concurrencyPolicyy"] = broken["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves_in_the_rendering(overlay: str) -> None:
    docs = render(overlay)
    configmaps, secrets = set(of_kind(docs, "ConfigMap")), set(of_kind(docs, "Secret")) | EXTERNAL_SECRETS[overlay]
    claims = set(of_kind(docs, "PersistentVolumeClaim"))
    for name, pod in pod_specs(docs):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        templates = {t["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet" for t in d["spec"]["volumeClaimTemplates"]}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{name}: ConfigMap {v['configMap']['name']}"
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{name}: Secret {v['secret']['secretName']}"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: claim {v['persistentVolumeClaim']}"
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, f"{name}/{c['name']}: volume {mount['name']}"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["name"] in secrets, f"{name}: Secret {ref['secretKeyRef']['name']}"
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["name"] in configmaps, f"{name}: ConfigMap {ref['configMapKeyRef']}"
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, f"{name}: ConfigMap {source['configMapRef']['name']}"
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{name}/{c['name']}: {probe} port {port}"

    pods = {name: (workload_doc, spec) for workload_doc in docs for name, spec in pod_specs((workload_doc,))}
    for service in of_kind(docs, "Service").values():
        selector = service["spec"]["selector"]
        backing = [
            (n, spec) for n, (d, spec) in pods.items() if d["kind"] in ("Deployment", "StatefulSet")
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert backing, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            named = {p["name"] for _, spec in backing for c in spec["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in named, f"Service {service['metadata']['name']}: targetPort {port['targetPort']}"
    services = of_kind(docs, "Service")
    for monitor in of_kind(docs, "ServiceMonitor").values():
        matched = [
            s for s in services.values() if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert matched, f"ServiceMonitor {monitor['metadata']['name']} matches no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matched)
    deployments = of_kind(docs, "Deployment")
    for scaler in [*of_kind(docs, "ScaledObject").values(), *of_kind(docs, "HorizontalPodAutoscaler").values()]:
        assert scaler["spec"]["scaleTargetRef"]["name"] in deployments
    for budget in of_kind(docs, "PodDisruptionBudget").values():
        labels = budget["spec"]["selector"]["matchLabels"]
        assert any(labels.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_runs_its_cli_on_a_config_that_loads_and_reaches_the_services(overlay: str, tmp_path: Path) -> None:
    from gateway.__main__ import _parser

    docs = render(overlay)
    gateway = container(docs, "bon-gateway", "gateway")
    assert gateway["command"][:3] == ["python", "-m", "gateway"]
    args = _parser().parse_args(gateway["command"][3:])
    config = configmap_file(docs, "bon-gateway-config", Path(args.config).name, tmp_path)
    env = {e["name"]: e.get("value", "secret") for e in gateway["env"]}
    overrides = {k: v for k, v in env.items() if k.startswith("GATEWAY_") and v != "secret"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in overrides.items():
            patch.setenv(key, value)
        settings = load_gateway(config)
    assert {"GATEWAY_STORE__URL", "GATEWAY_STORE__ID_SECRET"} <= env.keys()  # PostgreSQL and one id secret for all
    services = {f"http://{name}:{p['port']}" for name, s in of_kind(docs, "Service").items() for p in s["spec"]["ports"]}
    assert {b.url for b in settings.backends} <= services
    if settings.scorer.kind == "remote":
        assert settings.scorer.remote_url in services
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    assert settings.api_keys_file is not None
    assert str(settings.api_keys_file.parent) in mounts
    assert str(settings.registry_dir()) in mounts
    assert str(settings.scorer.model_dir.parent) in mounts
    assert settings.swap.lora_loading == "resolver"  # vLLM replicas behind one Service load versions themselves
    assert settings.quota_replicas == of_kind(docs, "Deployment")["bon-gateway"]["spec"]["replicas"]
    pod = workload(docs, "bon-gateway")
    (pre_stop,) = [int(a) for a in gateway["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert pre_stop + settings.shutdown_grace_s + 5 <= pod["terminationGracePeriodSeconds"]  # the drain fits


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_serves_the_registry_the_gateway_and_trainer_write(overlay: str, tmp_path: Path) -> None:
    from trainer.__main__ import _parser as trainer_parser
    from trainer.settings import load

    docs = render(overlay)
    vllm = container(docs, "bon-vllm", "vllm")
    args = vllm["args"]
    assert "--enable-lora" in args
    assert "--max-num-queued-reqs=256" in args
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    trainer = container(docs, "bon-trainer", "trainer")
    run = trainer_parser().parse_args(trainer_argv(trainer["command"]))
    assert run.command == "run"
    settings = load(configmap_file(docs, "bon-trainer-config", Path(run.config).name, tmp_path)).trainer
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == str(settings.registry_dir / "policy" / "versions")
    assert f"--model={settings.base_policy}" in args  # a version's base_model_name_or_path must be vLLM's --model
    # no CPU limit: torch's threads are set, within the CPUs the pod requests, or torch starts one per core of the node
    assert settings.threads is not None
    assert settings.threads <= float(trainer["resources"]["requests"]["cpu"])
    init = container(docs, "bon-registry-init", "init")
    assert trainer_parser().parse_args(init["command"][3:]).action == "init"
    cron = of_kind(docs, "CronJob")["bon-trainer"]["spec"]
    assert (cron["concurrencyPolicy"], cron["jobTemplate"]["spec"]["backoffLimit"]) == ("Forbid", 0)


def test_dev_builds_the_toy_models_and_holds_its_own_database(tmp_path: Path) -> None:
    from toyworld.__main__ import _parser as toyworld_parser

    docs = render("dev")
    build = container(docs, "bon-models-build", "bootstrap")
    assert build["command"][:3] == ["python", "-m", "toyworld"]
    parsed = toyworld_parser().parse_args(build["command"][3:])
    assert (parsed.command, parsed.preset, str(parsed.out)) == ("bootstrap", "default", "/models")
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("bon-store")]
    url = base64.b64decode(secret["data"]["url"]).decode()
    host = re.search(r"@([^:/]+):(\d+)/", url)
    assert host is not None
    postgres = of_kind(docs, "Service")[host.group(1)]
    assert int(host.group(2)) in {p["port"] for p in postgres["spec"]["ports"]}
    (keys,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("bon-api-keys")]
    path = tmp_path / "api_keys.yaml"
    path.write_bytes(base64.b64decode(keys["data"]["api_keys.yaml"]))
    assert [k.id for k in load_keys(path)] == ["dev"]


def test_the_gpu_overlay_sizes_vllm_from_one_tensor_parallel_value(tmp_path: Path) -> None:
    gpu = render("gpu")
    vllm = container(gpu, "bon-vllm", "vllm")
    assert "--tensor-parallel-size=$(TENSOR_PARALLEL_SIZE)" in vllm["args"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    settings = copy_root / "overlays" / "gpu" / "vllm-settings.env"
    settings.write_text(settings.read_text().replace("TENSOR_PARALLEL_SIZE=1", "TENSOR_PARALLEL_SIZE=4"))
    four = container(render("gpu", copy_root), "bon-vllm", "vllm")
    assert (four["resources"]["requests"]["nvidia.com/gpu"], four["resources"]["limits"]["nvidia.com/gpu"]) == ("4", "4")
    for name, pod in pod_specs(gpu):
        if name in ("bon-vllm", "bon-reward", "bon-trainer"):
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert all(c["image"].endswith("-cuda") for c in containers(pod))


def trainer_argv(command: list[str]) -> list[str]:
    """The trainer's own arguments in a container command: ``python -m trainer ...`` or, in the gpu overlay,
    ``accelerate launch ... -m trainer ...``."""
    start = next(i for i in range(len(command) - 1) if command[i : i + 2] == ["-m", "trainer"])
    return command[start + 2 :]


def test_the_gpu_overlay_trains_under_accelerate_on_as_many_gpus_as_one_value_says(tmp_path: Path) -> None:
    from accelerate.commands.launch import launch_command_parser

    from trainer.__main__ import _parser as trainer_parser

    gpu = render("gpu")
    trainer = container(gpu, "bon-trainer", "trainer")
    assert trainer["command"][:2] == ["accelerate", "launch"]
    assert "$(TRAINER_GPUS)" in trainer["command"]
    (source,) = [e["valueFrom"]["configMapKeyRef"] for e in trainer["env"] if e["name"] == "TRAINER_GPUS"]
    gpus = of_kind(gpu, "ConfigMap")[source["name"]]["data"][source["key"]]
    assert gpus == trainer["resources"]["requests"]["nvidia.com/gpu"] == trainer["resources"]["limits"]["nvidia.com/gpu"]
    expanded = [gpus if a == "$(TRAINER_GPUS)" else a for a in trainer["command"]]  # as Kubernetes expands it
    launch = launch_command_parser().parse_args(expanded[2:])
    assert launch.module
    assert (launch.training_script, launch.training_script_args) == ("trainer", trainer_argv(trainer["command"]))
    assert trainer_parser().parse_args(launch.training_script_args).command == "run"
    assert launch.num_processes == int(gpus)
    accelerate = yaml.safe_load(configmap_file(gpu, "bon-trainer-config", Path(launch.config_file).name, tmp_path).read_text())
    assert accelerate["distributed_type"] == "MULTI_GPU"  # what the round accepts (trainer.round.DATA_PARALLEL)
    assert any(m["mountPath"] == "/dev/shm" for m in trainer["volumeMounts"])

    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    (copy_root / "overlays" / "gpu" / "trainer-settings.env").write_text("TRAINER_GPUS=4\n")
    four = container(render("gpu", copy_root), "bon-trainer", "trainer")
    assert (four["resources"]["requests"]["nvidia.com/gpu"], four["resources"]["limits"]["nvidia.com/gpu"]) == ("4", "4")


def test_the_alerts_name_metrics_the_gateway_exposes() -> None:
    exposed = exposition()
    (rule,) = of_kind(render("gpu"), "PrometheusRule").values()
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    names = {a["alert"] for a in alerts}
    assert {"BonGatewayErrorRate", "BonGatewayLatencyP99", "BonChosenRewardFalling", "BonCanaryRolledBack"} <= names
    assert "BonLogSpoolGrowing" in names
    for alert in alerts:
        for metric in METRIC.findall(alert["expr"]):
            assert metric in exposed, f"{alert['alert']}: {metric} is not exposed by the gateway"
