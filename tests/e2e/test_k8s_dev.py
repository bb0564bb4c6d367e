"""The dev overlay's rendered manifests, run for real as local processes (Kubernetes cannot run here).

``kubectl kustomize k8s/overlays/dev`` is rendered; its containers' commands, arguments,
environment (Secrets and ConfigMaps resolved from the rendering) and ConfigMap files become
local processes: the registry-init Job, the policy vLLM, the reward model's vLLM pooling
server, two gateway replicas scoring on it, then the trainer CronJob's command. PostgreSQL is
the test session's server, under the Secret's user and database. What a pod would see at a
mount path is a local directory (a PVC: one directory shared by every process that mounts
it; an emptyDir: one per replica; a ConfigMap or Secret: its files), and a Service name is
the local address of what backs it; those are the only rewrites, plus a port per process
(two gateways cannot share port 8000 on one host). The models Job is not run: the test
preset's models stand in on ``bon-models`` (the default preset's build takes minutes; its
command is checked in tests/k8s).

Checks: both replicas answer and log to the one database; a thumb given through one replica
on the other's completion is accepted and logged; the trainer's round (the CronJob's own
config: 32 pairs, 2 epochs) publishes a version that both replicas hot-swap and verify
through vLLM's filesystem resolver; both report the same policy state.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from gateway.metrics import sample
from gateway.store.sql import SqlStore
from gateway.vllm_process import free_port
from loadtest.servers import wait_http
from tests.k8s.kustomize import of_kind, pod_specs, render
from tests.polling import wait_until
from tests.postgres import Postgres

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
KEY = {"authorization": "Bearer sk-dev-only"}  # overlays/dev/api_keys.yaml


class Rendering:
    """The rendered dev overlay and the local stand-ins for its volumes and Services."""

    def __init__(self, tmp: Path, models: Path, services: dict[str, str]) -> None:
        self.docs = render("dev")
        self.tmp, self.models, self.services = tmp, models, services
        self.secrets = {d["metadata"]["name"]: d["data"] for d in self.docs if d["kind"] == "Secret"}
        self.configmaps = {d["metadata"]["name"]: d["data"] for d in self.docs if d["kind"] == "ConfigMap"}

    def container(self, workload: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        pod = dict(pod_specs(self.docs))[workload]
        (found,) = [c for c in pod["containers"] if c["name"] == name]
        return pod, found

    def local(self, workload: str, name: str, instance: str) -> tuple[list[str], dict[str, str]]:
        """The container's argv and environment as a local process; its volumes laid out under ``tmp``."""
        pod, container = self.container(workload, name)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
        where = {m["mountPath"]: self._volume(volumes[m["name"]], instance) for m in mounts}
        mapped = self._mapper(where)
        for mount in mounts:  # ConfigMap and Secret files, their paths and Service names mapped like the rest
            volume = volumes[mount["name"]]
            files = self._files(volume)
            for key, content in files.items():
                (where[mount["mountPath"]] / key).write_text(mapped(content))
        env = {"PATH": os.environ["PATH"]}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = mapped(item["value"])
            elif "secretKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = mapped(base64.b64decode(self.secrets[ref["name"]][ref["key"]]).decode())
        for source in container.get("envFrom", []):
            env.update({k: mapped(v) for k, v in self.configmaps[source["configMapRef"]["name"]].items()})
        command = [sys.executable if part == "python" else mapped(part) for part in container["command"]]
        return [*command, *(mapped(a) for a in container.get("args", []))], env

    def _volume(self, volume: dict[str, Any], instance: str) -> Path:
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            path = self.models if claim == "bon-models" else self.tmp / "pvc" / claim
        else:  # emptyDir, ConfigMap, Secret: the pod's own
            path = self.tmp / instance / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _files(self, volume: dict[str, Any]) -> dict[str, str]:
        if "configMap" in volume:
            return dict(self.configmaps[volume["configMap"]["name"]])
        if "secret" in volume:
            return {k: base64.b64decode(v).decode() for k, v in self.secrets[volume["secret"]["secretName"]].items()}
        return {}

    def _mapper(self, where: dict[str, Path]) -> Callable[[str], str]:
        paths = re.compile(r"(^|[\s=\"':\[])(" + "|".join(re.escape(p) for p in where) + r")(?=/|$|[\s\"',\]])", re.M)

        def mapped(value: str) -> str:
            value = paths.sub(lambda m: m.group(1) + str(where[m.group(2)]), value)
            for service, address in self.services.items():
                value = value.replace(service, address)
            return value

        return mapped


@contextmanager
def started(argv: list[str], env: dict[str, str], log: Path, health: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health, timeout_s=300)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def fresh_database(postgres: Postgres, url: str) -> str:
    """The Secret's database on the session's server (trust auth: its password is not checked)."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url


def test_the_dev_overlay_runs_the_whole_loop_with_two_replicas_and_one_database(
    postgres: Postgres, test_models: Path, tmp_path: Path
) -> None:
    vllm_port, reward_port = free_port(), free_port()
    services = {
        "http://bon-vllm:8000": f"http://127.0.0.1:{vllm_port}", "http://bon-reward:8000": f"http://127.0.0.1:{reward_port}",
        "bon-postgres:5432": f"127.0.0.1:{postgres.port}",
    }  # fmt: skip
    k8s = Rendering(tmp_path, test_models, services)
    assert of_kind(k8s.docs, "Deployment")["bon-gateway"]["spec"]["replicas"] == 2
    logs = tmp_path / "logs"
    logs.mkdir()

    argv, env = k8s.local("bon-registry-init", "init", "init")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr

    with ExitStack() as stack:
        for workload, name, port in (("bon-vllm", "vllm", vllm_port), ("bon-reward", "reward", reward_port)):
            argv, env = k8s.local(workload, name, name)
            argv = [a.replace("--port=8000", f"--port={port}") for a in argv]
            stack.enter_context(started(argv, env, logs / f"{name}.log", f"http://127.0.0.1:{port}/health"))
        gateways = []
        for replica in ("a", "b"):
            argv, env = k8s.local("bon-gateway", "gateway", f"gateway-{replica}")
            port = free_port()
            env["GATEWAY_PORT"] = str(port)  # the one rewrite a second replica on this host needs
            db_url = env["GATEWAY_STORE__URL"]
            if replica == "a":
                fresh_database(postgres, db_url)
            assert env["GATEWAY_SCORER__KIND"] == "remote"  # components/remote-scorer
            stack.enter_context(started(argv, env, logs / f"gateway-{replica}.log", f"http://127.0.0.1:{port}/ready"))
            gateways.append(f"http://127.0.0.1:{port}")
        client = stack.enter_context(httpx.Client(timeout=120, headers=KEY))

        # traffic through a round-robin over the two replicas
        answered: list[tuple[int, str]] = []
        for k in range(48):
            body = {"model": "toy-bon", "messages": [{"role": "user", "content": f"What is {k % 9} plus {k % 7}?"}]}
            response = client.post(f"{gateways[k % 2]}/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            answered.append((k % 2, response.json()["id"]))
        store = SqlStore(db_url)
        try:
            wait_until(lambda: {cid for _, cid in answered} <= set(store.completion_ids()), 60, "both replicas' records")
            # a thumb through replica b on a completion replica a served: one secret, one database
            from_a = next(cid for replica, cid in answered if replica == 0)
            thumb = client.post(f"{gateways[1]}/v1/feedback", json={"completion_id": from_a, "thumb": "up"})
            assert thumb.status_code == 200, thumb.text
            assert store.read_feedback([from_a])[from_a].thumb == "up"
        finally:
            store.close()

        # the CronJob's command with its own config: a round, published as current
        argv, env = k8s.local("bon-trainer", "trainer", "trainer")
        round_ = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert round_.returncode == 0, round_.stderr[-3000:]
        assert "round trained" in round_.stdout, round_.stdout[-2000:]

        def served_by_v0001(url: str) -> bool:
            body = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 2 plus 2?"}]}
            version: str | None = client.post(f"{url}/v1/chat/completions", json=body).headers.get("x-policy-version")
            return version == "v0001"

        for url in gateways:
            wait_until(functools.partial(served_by_v0001, url), 300, f"{url} never served v0001")
            assert sample(url, "bon_swaps_total", {"result": "ok"}) == 1.0  # verified by its probe through vLLM
        states = [client.get(f"{url}/admin/policy").json() for url in gateways]
        assert states[0] == states[1]
        assert states[0]["current"] == "v0001"
    print(
        f"\ndev overlay as local processes: 2 replicas answered {len(answered)} requests into one PostgreSQL database, "
        f"a thumb crossed replicas, the CronJob's round published v0001 and both replicas swapped to it and verified it; "
        f"the round said: {round_.stdout.strip().splitlines()[-1][:300]}"
    )
