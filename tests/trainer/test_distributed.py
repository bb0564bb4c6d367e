"""A round under ``accelerate launch`` with two processes: the gpu overlay's command, on CPUs (gloo instead of nccl).

Rank 0 alone locks, reads, evaluates, publishes and reports; both ranks train; the KL
budget's retry decision reaches both; a round rank 0 skips releases the other rank; and the
reference log-probs the two processes compute together are cached under the right keys.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.store.sql import SqlStore
from tests.k8s.kustomize import K8S, render
from tests.k8s.test_manifests import container
from tests.trainer.rounds import logp
from trainer import dpo
from trainer.distributed import Team
from trainer.export import window
from trainer.pairs import build
from trainer.round import RoundError, run
from trainer.settings import load
from versioning.registry import Registry

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(config: Path, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """The gpu overlay's trainer command as it renders, on this machine's CPUs: its accelerate config (data parallel
    through torchrun; gloo here, nccl on GPUs), ``processes`` for $(TRAINER_GPUS), the test's trainer config."""
    trainer = container(render("gpu"), "bon-trainer", "trainer")
    mounted = {"/etc/bon/accelerate.yaml": str(K8S / "overlays" / "gpu" / "accelerate.yaml"),
               "/etc/bon/trainer.yaml": str(config), "$(TRAINER_GPUS)": str(processes)}  # fmt: skip
    command = [mounted.get(a, a) for a in trainer["command"]]
    assert command[:2] == ["accelerate", "launch"]
    command[2:2] = ["--main_process_port", str(_free_port())]  # tests may run beside other launches
    command = [sys.executable, "-m", "accelerate.commands.launch", *command[2:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_two_processes_train_one_version_that_rank_0_alone_publishes(deployment: Path, test_models: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = yaml.safe_load(deployment.read_text())
    config["trainer"]["dpo"]["learning_rate"] = 5e-3
    config["trainer"]["kl_budget"] = {"max_nats": 1e-6, "backoff": 1e-3, "retries": 1}  # the first try is over it
    deployment.write_text(yaml.safe_dump(config))

    done = _launch(deployment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("round trained") == 1, done.stdout  # one summary: rank 0's
    registry = Registry(deployment.parent / "registry")
    assert [m.version for m in registry.versions("policy")] == ["v0001"]
    manifest = registry.verify("policy", "v0001")
    assert manifest.hyperparameters["processes"] == 2
    assert manifest.hyperparameters["batch_size"] == 8  # the global batch: 4 on each process
    first, second = manifest.evaluation["kl_budget_tries"]  # both ranks trained the second try: rank 0 decided it
    assert first["kl_to_reference"] > 1e-6 > second["kl_to_reference"]
    assert manifest.evaluation["ref_cached"] == 48  # the first try computed them, the second found them
    pointer = registry.pointer("policy", "current")
    assert pointer is not None
    assert pointer.version == "v0001"
    metrics = (deployment.parent / "registry" / "metrics" / "trainer.prom").read_text()
    assert 'trainer_round_outcome{outcome="trained"} 1.0' in metrics

    # The reference log-probs the two processes computed (each half of the batches, gathered) are stored under
    # the right keys: each equals the base policy's log-prob of that very (prompt, answer), computed by hand.
    settings = load(deployment)
    reference = f"{dpo.reference_id(test_models / 'policy')}-fp32"
    cache = dpo.RefCache(deployment.parent / "registry" / "cache" / "ref_logps.sqlite", reference)
    store = SqlStore(settings.store.database_url())
    pairs = build(list(window(store, 0, 2e9, "base", "rm-base", True)), settings.trainer.pairs).pairs
    store.close()
    tokenizer = AutoTokenizer.from_pretrained(test_models / "policy")
    made = dpo.rows(pairs, tokenizer, settings.trainer.adapter.max_length).rows
    base = AutoModelForCausalLM.from_pretrained(test_models / "policy", dtype="float32").eval()
    keys = {cache.key(r["prompt_ids"], a): (r["prompt_ids"], a) for r in made for a in (r["chosen_ids"], r["rejected_ids"])}
    stored = cache.get_many(keys)
    assert len(stored) == len(keys) == 48
    for key, (prompt, answer) in keys.items():
        assert stored[key] == pytest.approx(logp(base, prompt, answer), abs=1e-3)

    # Nothing served by v0001 yet: rank 0 skips, releases the other rank, and the launch exits 0.
    again = _launch(deployment)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("round skipped") == 1, again.stdout
    assert [m.version for m in registry.versions("policy")] == ["v0001"]


def test_algorithms_and_strategies_not_tested_on_several_processes_are_refused(deployment: Path) -> None:
    settings = load(deployment)
    with pytest.raises(RoundError, match="--algo kto runs in one process"):
        run(settings, "kto", team=Team(0, 2, "MULTI_GPU"))
    with pytest.raises(RoundError, match="accelerate's FSDP is not supported"):
        run(settings, "dpo", team=Team(0, 2, "FSDP"))


def test_a_team_of_one_shares_without_torch_distributed() -> None:
    team = Team()
    assert team.main
    assert not team.distributed
    value: Any = {"pairs": 3}
    assert team.share(value) is value
    team.finish("trained", "no one to tell")  # a no-op, not a broadcast
