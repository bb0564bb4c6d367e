"""The canary gate at work (a real registry, a fake store of constructed totals) and the admin endpoints.

The statistics themselves are ``test_gate.py``'s; here: a look is taken once per look
number, a decision moves the pointers, is written to ``gate.jsonl`` with its reason and
counted in the metrics; ``canary.auto: false`` records without applying; a held lock
(another replica deciding) makes a check do nothing; the admin endpoints' 401/403.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.auth import digest
from gateway.canary import DECISIONS, CanaryGate, NoCanary
from gateway.gate import ArmTotals
from gateway.metrics import Metrics
from gateway.settings import CanarySettings
from versioning import watch
from versioning.lock import gate_lock
from versioning.registry import Pointer, Registry


def arm(n: int, reward: float, length: float = 20.0, sd: float = 1.0, up: int = 0, down: int = 0) -> ArmTotals:
    """Totals of ``n`` answers with this mean reward, standard deviation and mean length."""
    return ArmTotals(
        n=n, reward_sum=reward * n, reward_sq_sum=(sd**2) * (n - 1) + reward**2 * n, length_sum=length * n,
        thumbs_up=up, thumbs_down=down,
    )  # fmt: skip


class TotalsStore:
    """What ``SqlStore.arm_totals`` returns, set by the test."""

    def __init__(self) -> None:
        self.totals: dict[str, ArmTotals] = {}
        self.calls: list[tuple[list[str], str, float]] = []

    def arm_totals(self, versions: Sequence[str], rm_version: str, since: float) -> dict[str, ArmTotals]:
        self.calls.append((list(versions), rm_version, since))
        return {v: self.totals.get(v, ArmTotals()) for v in versions}


def publish(registry: Registry, kl: float = 1.0, kl_stderr: float = 0.1, window: dict[str, Any] | None = None) -> str:
    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"w")

    evaluation = {"kl_to_reference": kl, "kl_to_reference_stderr": kl_stderr}
    return registry.publish("policy", write, format="lora", parent=None, evaluation=evaluation, data_window=window).version


@pytest.fixture
def trial(tmp_path: Path) -> tuple[Registry, str, str]:
    """A registry with v0001 current and v0002 on trial."""
    registry = Registry(tmp_path / "registry")
    current = publish(registry)
    registry.set_pointer("policy", "current", current)
    canary = publish(registry)
    registry.set_pointer("policy", "canary", canary)
    return registry, current, canary


def gate(registry: Registry, store: TotalsStore, metrics: Metrics, **settings: Any) -> CanaryGate:
    rules = CanarySettings(**{"min_requests": 100, "looks": 3, **settings})
    return CanaryGate(registry.root, store, lambda: "rm1", "base", rules, metrics)


def at(registry: Registry, pointer: Pointer) -> str | None:
    state = registry.pointer("policy", pointer)
    return state.version if state is not None else None


def looks(registry: Registry) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (registry.root / "policy" / DECISIONS).read_text().splitlines()]


def decisions(metrics: Metrics, action: str, by: str = "gate") -> float:
    value = metrics.registry.get_sample_value("bon_canary_decisions_total", {"action": action, "by": by})
    return value or 0.0


def test_a_clear_loss_is_rolled_back_at_the_first_look_with_its_reason(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store, metrics = TotalsStore(), Metrics()
    g = gate(registry, store, metrics)
    state = registry.pointer("policy", "canary")
    assert state is not None
    began = state.updated
    store.totals = {current: arm(400, 1.0), canary: arm(99, 0.2)}
    assert g.check() is None  # 99 canary answers: no look yet
    assert registry.pointer("policy", "canary") is not None
    store.totals[canary] = arm(120, 0.2)
    look = g.check()
    assert look is not None
    assert look.action == "rollback"
    assert look.look == 1
    assert look.applied
    assert "reward fell" in look.reason
    assert registry.pointer("policy", "canary") is None
    assert at(registry, "current") == current
    [line] = looks(registry)
    assert line["action"] == "rollback"
    assert line["canary"] == canary
    assert line["canary_totals"]["answers"] == 120
    assert decisions(metrics, "rollback") == 1
    low = metrics.registry.get_sample_value("bon_canary_reward_diff", {"bound": "high"})
    assert low is not None
    assert low < 0
    # the totals were asked for both arms, one reward model, since the trial began
    versions, rm, since = store.calls[-1]
    assert versions == [current, canary]
    assert rm == "rm1"
    assert since == began


def test_a_version_trained_mainly_on_thumbs_is_judged_on_thumbs_with_its_plan_shown(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    current = publish(registry)
    registry.set_pointer("policy", "current", current)
    canary = publish(registry, window={"pairs": 100, "from_thumbs": 80})
    registry.set_pointer("policy", "canary", canary)
    store, metrics = TotalsStore(), Metrics()
    g = gate(registry, store, metrics, thumbs_margin=0.1)
    # the reward model prefers current by 0.25 (within the 0.3 guardrail); users prefer the canary
    store.totals = {current: arm(600, 0.8, up=60, down=60), canary: arm(600, 0.55, up=90, down=30)}
    assert g.check() is None  # 120 thumbs per arm: short of the first planned look
    assert g.trial is not None
    assert g.trial.primary == "thumbs"
    assert g.trial.thumb_share == 0.8
    assert g.trial.plan.looks_at == (131, 262, 524)
    assert g.trial.plan.answers_needed == 524 * 5
    assert g.trial.look == 0
    needed = metrics.registry.get_sample_value("bon_canary_needed", {"primary": "thumbs", "unit": "thumbs"})
    assert needed == 524
    assert metrics.registry.get_sample_value("bon_canary_thumbs", {"arm": "canary"}) == 120
    store.totals = {current: arm(700, 0.8, up=70, down=70), canary: arm(700, 0.55, up=105, down=35)}
    look = g.check()
    assert look is not None
    assert look.primary == "thumbs"
    assert look.action == "promote"
    assert at(registry, "current") == canary
    assert looks(registry)[-1]["primary"] == "thumbs"


def test_the_watch_is_exported_at_each_poll(trial: tuple[Registry, str, str]) -> None:
    registry, _current, _canary = trial
    metrics = Metrics()
    g = gate(registry, TotalsStore(), metrics)
    g.check()
    assert metrics.registry.get_sample_value("bon_watch_firing") == 0
    watch.write(registry.root, watch.WatchState(firing=True, version="v0002"))
    g.check()
    assert metrics.registry.get_sample_value("bon_watch_firing") == 1


def test_no_look_is_taken_while_the_current_arm_is_short(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store = TotalsStore()
    g = gate(registry, store, Metrics())
    store.totals = {current: arm(60, 1.0), canary: arm(150, 0.0)}
    assert g.check() is None
    assert not (registry.root / "policy" / DECISIONS).exists()
    store.totals[current] = arm(120, 1.0)
    look = g.check()
    assert look is not None
    assert look.look == 1


def test_a_clear_win_is_promoted(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store, metrics = TotalsStore(), Metrics()
    store.totals = {current: arm(900, 0.5), canary: arm(100, 1.5)}
    look = gate(registry, store, metrics).check()
    assert look is not None
    assert look.action == "promote"
    assert at(registry, "current") == canary
    assert registry.pointer("policy", "canary") is None
    assert decisions(metrics, "promote") == 1


def test_longer_answers_roll_back_even_with_a_higher_reward(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store = TotalsStore()
    store.totals = {current: arm(900, 0.5, length=20), canary: arm(100, 1.5, length=40)}
    look = gate(registry, store, Metrics()).check()
    assert look is not None
    assert look.action == "rollback"
    assert "longer" in look.reason


def test_kl_from_the_manifest_is_a_guardrail_and_a_gauge(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    current = publish(registry, kl=0.5, kl_stderr=0.05)
    registry.set_pointer("policy", "current", current)
    canary = publish(registry, kl=12.0, kl_stderr=0.75)
    registry.set_pointer("policy", "canary", canary)
    store, metrics = TotalsStore(), Metrics()
    store.totals = {current: arm(900, 0.5), canary: arm(100, 1.5)}
    look = gate(registry, store, metrics, max_kl=8.0).check()
    assert look is not None
    assert look.action == "rollback"
    assert "KL to the starting policy 12.00 ± 0.75 nats exceeds 8.0" in look.reason
    assert (look.canary_kl, look.canary_kl_stderr) == (12.0, 0.75)
    assert metrics.registry.get_sample_value("bon_policy_kl_nats", {"version": current, "role": "current"}) == 0.5
    assert metrics.registry.get_sample_value("bon_policy_kl_stderr_nats", {"version": current, "role": "current"}) == 0.05


def test_each_look_is_taken_once_and_undecided_at_the_last_rolls_back(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store = TotalsStore()
    g = gate(registry, store, Metrics())
    store.totals = {current: arm(900, 1.0, sd=3.0), canary: arm(150, 1.0, sd=3.0)}  # equal means, wide intervals
    first = g.check()
    assert first is not None
    assert first.action == "wait"
    assert first.look == 1
    assert not first.applied
    assert g.check() is None  # still look 1: not tested again, however often the gate polls
    store.totals[canary] = arm(250, 1.0, sd=3.0)
    second = g.check()
    assert second is not None
    assert second.look == 2
    assert second.action == "wait"
    store.totals[canary] = arm(450, 1.0, sd=3.0)
    last = g.check()
    assert last is not None
    assert last.look == 3
    assert last.action == "rollback"
    assert "not shown as good" in last.reason
    assert [entry["look"] for entry in looks(registry)] == [1, 2, 3]


def test_with_auto_off_decisions_are_recorded_not_applied(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store = TotalsStore()
    store.totals = {current: arm(900, 1.0), canary: arm(100, 0.0)}
    look = gate(registry, store, Metrics(), auto=False).check()
    assert look is not None
    assert look.action == "rollback"
    assert not look.applied
    assert at(registry, "canary") == canary


def test_while_another_replica_holds_the_lock_a_check_does_nothing(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    store = TotalsStore()
    store.totals = {current: arm(900, 1.0), canary: arm(100, 0.0)}
    g = gate(registry, store, Metrics())
    with gate_lock(registry.root):
        assert g.check() is None
    assert store.calls == []
    assert g.check() is not None  # once released, one decision


def test_two_gates_on_one_trial_decide_once(trial: tuple[Registry, str, str]) -> None:
    """Replicas poll the same store; the first to look acts, the second finds the trial ended."""
    registry, current, canary = trial
    store = TotalsStore()
    store.totals = {current: arm(900, 1.0), canary: arm(100, 0.0)}
    a, b = gate(registry, store, Metrics()), gate(registry, store, Metrics())
    assert a.check() is not None
    assert b.check() is None
    assert len(looks(registry)) == 1


def test_by_hand(trial: tuple[Registry, str, str]) -> None:
    registry, current, canary = trial
    metrics = Metrics()
    g = gate(registry, TotalsStore(), metrics)
    look = g.decide_by_hand("promote", "looks fine")
    assert look.by == "admin"
    assert at(registry, "current") == canary
    with pytest.raises(NoCanary):
        g.decide_by_hand("promote", "again")
    g.decide_by_hand("rollback", "changed my mind")  # no canary: current goes back one version
    assert at(registry, "current") == current
    assert decisions(metrics, "promote", "admin") == 1
    assert decisions(metrics, "rollback", "admin") == 1


# ---- the admin endpoints ----
ADMIN = "admin-secret"
CLIENT_KEY = "sk-client"


def admin_client(make_client: Callable[..., TestClient], tmp_path: Path, **overrides: Any) -> TestClient:
    return make_client(swap={"registry_dir": str(tmp_path / "registry")}, **overrides)


def test_admin_endpoints_need_the_admin_token(
    make_client: Callable[..., TestClient], tmp_path: Path, trial: tuple[Registry, str, str]
) -> None:
    registry, _current, canary = trial
    client = admin_client(make_client, tmp_path, admin_token=ADMIN, api_keys=[{"id": "client", "sha256": digest(CLIENT_KEY)}])
    missing = client.post("/admin/policy/promote")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = client.post("/admin/policy/promote", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    client_key = client.post("/admin/policy/promote", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert client_key.status_code == 403
    assert client_key.json()["error"]["type"] == "permission_error"
    assert registry.pointer("policy", "canary") is not None  # none of those moved anything

    auth = {"authorization": f"Bearer {ADMIN}"}
    status = client.get("/admin/policy", headers=auth)
    assert status.status_code == 200
    assert status.json()["object"] == "policy_status"
    assert "trial" in status.json()
    done = client.post("/admin/policy/promote", headers=auth, json={"reason": "dashboards look fine"})
    assert done.status_code == 200
    assert done.json()["action"] == "promote"
    assert done.json()["reason"] == "dashboards look fine"
    assert at(registry, "current") == canary
    again = client.post("/admin/policy/promote", headers=auth)
    assert again.status_code == 409
    assert "no canary" in again.json()["error"]["message"]
    bad = client.post("/admin/policy/promote", headers=auth, json={"reason": "x", "force": True})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "force"
    unknown = client.post("/admin/policy/delete", headers=auth)
    assert unknown.status_code == 404

    # the reward-hacking watch: shown in the status, cleared by an admin (a client key may not)
    watch.write(registry.root, watch.WatchState(firing=True, version=canary, reasons=["length: answers 1.6x"]))
    assert client.get("/admin/policy", headers=auth).json()["watch"]["reasons"] == ["length: answers 1.6x"]
    assert client.post("/admin/watch/clear", headers={"authorization": f"Bearer {CLIENT_KEY}"}).status_code == 403
    assert watch.read(registry.root).firing
    cleared = client.post("/admin/watch/clear", headers=auth, json={"reason": "longer answers are wanted"})
    assert cleared.status_code == 200
    assert cleared.json()["object"] == "watch"
    assert cleared.json()["cleared_reason"] == "longer answers are wanted"
    assert not watch.read(registry.root).firing
    assert watch.read(registry.root).cleared_for == canary


def test_without_a_token_admin_answers_on_loopback_only(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    local = admin_client(make_client, tmp_path)
    assert local.get("/admin/policy").status_code == 200
    public = admin_client(make_client, tmp_path, host="0.0.0.0", api_keys=[{"id": "client", "sha256": digest(CLIENT_KEY)}])
    refused = public.get("/admin/policy", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert refused.status_code == 403
    assert "admin_token" in refused.json()["error"]["message"]


def test_without_a_token_admin_refuses_callers_through_a_proxy_or_from_elsewhere(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Judged by the connection, not by the loopback address the gateway listens on (a local proxy would open it)."""
    local = admin_client(make_client, tmp_path)
    for header in ("x-forwarded-for", "forwarded", "x-real-ip"):
        proxied = local.get("/admin/policy", headers={header: "203.0.113.7"})
        assert proxied.status_code == 403, header
    remote = TestClient(local.app, client=("203.0.113.7", 40000), raise_server_exceptions=False)
    refused = remote.post("/admin/policy/rollback")
    assert refused.status_code == 403
    assert "not on this gateway's host" in refused.json()["error"]["message"]


def test_a_look_still_being_appended_is_not_read(tmp_path: Path) -> None:
    from gateway.canary import recorded

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "gate.jsonl").write_text('{"look": 1}\n{"look": 2}\n{"look": ')  # a reader outside the lock
    assert recorded(tmp_path) == [{"look": 1}, {"look": 2}]
