"""The trainer's Kubernetes manifests (k8s/trainer/) against the API's schemas and our own CLI and settings.

Schema validation is ``kubernetes-validate`` (the API server's OpenAPI schemas, strict: an unknown
field fails) for the oldest and newest Kubernetes versions we claim. The rest checks what a
schema cannot: the CronJob's command is one our CLI parses, its config file (from the ConfigMap)
loads into valid trainer settings, the registry and base-policy paths it names are mounted
volumes, and the GPU variant is the CPU one plus a GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from trainer.__main__ import _parser
from trainer.settings import load

K8S = Path(__file__).resolve().parents[2] / "k8s" / "trainer"
VERSIONS = ("1.29.0", "1.34.0")


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _all() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in _documents(path.name)]


def _cronjob(name: str) -> dict[str, Any]:
    (doc,) = _documents(name)
    assert doc["kind"] == "CronJob"
    return doc


def _pod(cronjob: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def test_the_manifests_exist() -> None:
    kinds = sorted(doc["kind"] for _, doc in _all())
    assert kinds == ["ConfigMap", "CronJob", "CronJob", "PersistentVolumeClaim", "PersistentVolumeClaim"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    for name, doc in _all():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(_cronjob("cronjob.yaml"))
    broken["spec"]["concurrencyPolicyy"] = broken["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", ["cronjob.yaml", "cronjob-gpu.yaml"])
def test_rounds_never_overlap_and_a_failed_round_waits_for_the_next_schedule(name: str) -> None:
    job = _cronjob(name)
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert _pod(job)["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", ["cronjob.yaml", "cronjob-gpu.yaml"])
def test_the_command_config_and_volumes_fit_the_trainer(name: str, tmp_path: Path) -> None:
    pod = _pod(_cronjob(name))
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "trainer"]
    args = _parser().parse_args(command[3:])
    assert args.command == "run"

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = str(Path(args.config).parent)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "bon-trainer-config"
    (configmap,) = [d for _, d in _all() if d["kind"] == "ConfigMap"]
    config = tmp_path / "config.yaml"
    config.write_text(configmap["data"][Path(args.config).name])
    settings = load(config).trainer

    def claim(path: Path) -> str:
        for mount_path, volume in mounts.items():
            if path.is_relative_to(mount_path):
                return str(volumes[volume]["persistentVolumeClaim"]["claimName"])
        raise AssertionError(f"{path} is on no mounted volume")

    claims = {d["metadata"]["name"] for _, d in _all() if d["kind"] == "PersistentVolumeClaim"}
    assert claim(settings.registry_dir) == "bon-registry"
    assert claim(settings.base_policy) in claims
    assert claim(settings.base_reward_model) in claims
    env = {e["name"]: e for e in container["env"]}
    assert env["TRAINER_STORE__URL"]["valueFrom"]["secretKeyRef"]["name"] == "bon-store"


def test_the_gpu_variant_is_the_cpu_one_with_a_gpu() -> None:
    cpu, gpu = _cronjob("cronjob.yaml"), _cronjob("cronjob-gpu.yaml")
    for container in _pod(gpu)["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(_pod(cpu))

    def strip(job: dict[str, Any]) -> dict[str, Any]:
        job = copy.deepcopy(job)
        job["metadata"].pop("name")
        pod = _pod(job)
        pod.pop("tolerations", None)
        for container in pod["containers"]:
            container.pop("resources")
            container.pop("image")
        return job

    assert strip(gpu) == strip(cpu)
