"""The canary gate at work: reads both arms' live totals, decides at each new look, moves the registry's pointers.

Knows when a trial has a new look to take (``gate.look_number`` of the canary's answers, so
the gate tests at most ``looks`` times however often it polls), the lock that makes one
decision for many replicas (``versioning.lock.gate_lock``: a PostgreSQL advisory lock with a
shared database, else a file lock on the registry volume; the store's totals are every
replica's), what a decision does (``promote``: the canary becomes current; ``rollback``:
the canary pointer is cleared; gateways then follow the pointers), and where it is
recorded: one JSON line per look in ``<registry>/policy/gate.jsonl`` (why, with the
figures), the log, and the metrics (``bon_canary_*``). A person can promote or roll back
through the same lock (``decide_by_hand``). It also exports the trainer's reward-hacking
watch (``versioning.watch``) as ``bon_watch_firing`` and lets an admin clear it. Does not
know the statistics (``gateway.gate``) or how pointers are followed (``gateway.swap``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from gateway.gate import ArmTotals, Decision, GateRules, Plan, Primary, decide, plan, primary_for
from gateway.metrics import Metrics
from gateway.settings import CanarySettings
from versioning import watch
from versioning.lock import LockHeld, gate_lock
from versioning.registry import Pointer, Registry, RegistryError
from versioning.watch import WatchState

log = logging.getLogger("gateway.canary")
DECISIONS = "gate.jsonl"


@runtime_checkable
class Totals(Protocol):
    def arm_totals(self, versions: Sequence[str], rm_version: str, since: float) -> dict[str, ArmTotals]: ...


class GateBusy(Exception):
    """Another gateway holds the gate's lock (try again in a moment)."""


class NoCanary(Exception):
    """There is no canary to decide on (or, for a rollback, no earlier current version)."""


@dataclass(frozen=True)
class Look:
    """One look at a trial, as written to ``gate.jsonl``."""

    at: float
    canary: str
    current: str
    rm_version: str
    look: int
    action: str
    reason: str
    by: Literal["gate", "admin"]
    canary_totals: dict[str, float | None]
    current_totals: dict[str, float | None]
    reward_diff: list[float] | None = None
    up_rate_diff: list[float] | None = None
    length_ratio: float | None = None
    canary_kl: float | None = None
    canary_kl_stderr: float | None = None
    applied: bool = True
    """Whether the pointers were moved (``canary.auto: false``: decisions are recorded, not applied)."""
    primary: Primary = "reward"


@dataclass(frozen=True)
class Trial:
    """The running trial as the gate last read it: what ``GET /admin/policy`` shows."""

    canary: str
    current: str
    primary: Primary
    thumb_share: float | None
    """Share of the canary's training pairs that thumbs decided (from its manifest; None: unknown)."""
    plan: Plan
    answers: dict[str, int]
    thumbs: dict[str, int]
    look: int
    """The look the arms have reached (0: none yet)."""


def recorded(registry_dir: Path) -> list[dict[str, Any]]:
    """Every look in ``<registry>/policy/gate.jsonl``, oldest first ([] before the first). A reader outside the gate
    lock (the inspector) may meet a line still being appended: only whole lines (ending in a newline) are read."""
    path = Path(registry_dir) / "policy" / DECISIONS
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines if line]


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (from a manifest or a total), else None."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def rules(settings: CanarySettings) -> GateRules:
    return GateRules(
        min_requests=settings.min_requests, looks=settings.looks, alpha=settings.alpha,
        reward_margin=settings.reward_margin, min_thumbs=settings.min_thumbs, thumbs_margin=settings.thumbs_margin,
        max_length_ratio=settings.max_length_ratio, max_kl=settings.max_kl, primary=settings.primary,
        power=settings.power, guard_reward_margin=settings.guard_reward_margin,
        planning_up_rate=settings.planning_up_rate,
    )  # fmt: skip


class CanaryGate:
    def __init__(
        self,
        registry_dir: Path,
        store: Totals | None,
        rm_version: Callable[[], str | None],
        base_version: str,
        settings: CanarySettings,
        metrics: Metrics,
        database_url: str | None = None,
    ) -> None:
        """``store``: the log's totals (None: no automatic decisions, by hand only); ``rm_version``: the reward
        model scoring now (only its rewards are compared); ``database_url``: the shared database whose advisory
        lock serialises decisions (None or SQLite: a file lock)."""
        self._registry = Registry(registry_dir)
        self._store = store
        self._rm_version = rm_version
        self._base = base_version
        self._settings = settings
        self._rules = rules(settings)
        self._metrics = metrics
        self._database_url = database_url
        self.last: Look | None = None
        self.trial: Trial | None = None

    @property
    def registry_root(self) -> Path:
        return self._registry.root

    @property
    def automatic(self) -> bool:
        """Whether ``run`` has anything to do: the store's totals are readable (``canary.auto`` off still records looks)."""
        return self._store is not None

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # the loop must outlive any one failure (a database outage: the trial waits)
                log.exception("canary gate check failed")
            await asyncio.sleep(self._settings.poll_s)

    # ---- the automatic gate ----
    def check(self) -> Look | None:
        """One poll: if a trial has reached a new look, decide (and apply, with ``auto``); the look, else None."""
        self._export_kl()
        self._metrics.watch_firing.set(watch.read(self._registry.root).firing)
        if self._registry.pointer("policy", "canary") is None:
            return None
        try:
            with gate_lock(self._registry.root, self._database_url):
                return self._check_locked()
        except LockHeld:
            return None  # another replica is deciding on the same totals

    def _check_locked(self) -> Look | None:
        canary = self._registry.pointer("policy", "canary")  # again, under the lock: another replica may have acted
        rm = self._rm_version()
        if canary is None or rm is None or self._store is None:
            self.trial = None
            return None
        current = self._current()
        totals = self._store.arm_totals([current, canary.version], rm, canary.updated)
        arm, base = totals[canary.version], totals[current]
        share = self._thumb_share(canary.version)
        primary = primary_for(self._rules, share)
        schedule = plan(self._rules, primary, base, arm)
        look = schedule.look(base, arm, self._rules.min_requests)
        self.trial = Trial(canary.version, current, primary, share, schedule, {"canary": arm.n, "current": base.n},
                           {"canary": arm.thumbs, "current": base.thumbs}, look)  # fmt: skip
        self._export_trial(self.trial)
        if look == 0 or look <= self._looked(canary.version):
            return None
        kl, kl_stderr = self._kl(canary.version)
        decision = decide(base, arm, self._rules, kl, kl_stderr, primary, schedule)
        applied = self._settings.auto and decision.action != "wait"
        record = _look(canary.version, current, rm, decision, "gate", arm, base, (kl, kl_stderr), applied)
        self._apply(record)
        return record

    def _export_trial(self, trial: Trial) -> None:
        for name, count in trial.answers.items():
            self._metrics.canary_answers.labels(name).set(count)
        for name, count in trial.thumbs.items():
            self._metrics.canary_thumbs.labels(name).set(count)
        self._metrics.reset(self._metrics.canary_needed, math.nan)
        self._metrics.canary_needed.labels(trial.primary, trial.plan.unit).set(trial.plan.looks_at[-1])
        if trial.plan.answers_needed is not None:
            self._metrics.canary_needed.labels(trial.primary, "answers_at_last_look").set(trial.plan.answers_needed)
        if trial.plan.powered is not None:
            self._metrics.canary_needed.labels(trial.primary, f"{trial.plan.unit}_for_power").set(trial.plan.powered)

    def _looked(self, canary: str) -> int:
        """The last look recorded for this canary's trial (0: none yet)."""
        taken = [
            int(e.get("look", 0)) for e in recorded(self._registry.root) if e.get("canary") == canary and e.get("by") == "gate"
        ]
        return max(taken, default=0)

    # ---- by hand ----
    def decide_by_hand(self, action: Literal["promote", "rollback"], reason: str) -> Look:
        """The admin endpoint's promote or rollback, under the gate's lock; raises GateBusy, NoCanary."""
        for _ in range(20):
            try:
                with gate_lock(self._registry.root, self._database_url):
                    return self._by_hand(action, reason)
            except LockHeld:
                time.sleep(0.1)
        raise GateBusy("another gateway's canary gate is deciding; try again")

    def _by_hand(self, action: Literal["promote", "rollback"], reason: str) -> Look:
        canary = self._registry.pointer("policy", "canary")
        current = self._current()
        if canary is None:
            if action == "promote":
                raise NoCanary("there is no canary to promote")
            state = self._registry.pointer("policy", "current")
            if state is None or not state.history:
                raise NoCanary(f"there is no canary, and the current policy {current} replaced no earlier version")
        version = canary.version if canary is not None else current
        kl, kl_stderr = self._kl(version)
        record = Look(
            time.time(), version, current, self._rm_version() or "none", 0, action, reason, "admin", {}, {},
            canary_kl=kl, canary_kl_stderr=kl_stderr,
        )  # fmt: skip
        self._apply(record)
        return record

    def clear_watch(self, reason: str) -> WatchState:
        """The admin's clear of the reward-hacking watch: training rounds resume (``versioning.watch``)."""
        state = watch.clear(self._registry.root, "admin", reason)
        self._metrics.watch_firing.set(0)
        log.warning("reward-hacking watch cleared by admin about %s: %s", state.cleared_for or "-", reason)
        return state

    # ---- effects ----
    def _apply(self, record: Look) -> None:
        """Write the look, move the pointers (when applied), count it and log it."""
        path = self._registry.root / "policy" / DECISIONS
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # appended under the gate lock: one writer at a time
            f.write(json.dumps(asdict(record)) + "\n")
        why = f"{record.by}: {record.reason}"
        if record.applied and record.action == "promote":
            self._registry.promote("policy", reason=why)
        elif record.applied and record.action == "rollback":
            self._registry.rollback("policy", reason=why)
        self.last = record
        self._metrics.canary_decisions.labels(record.action, record.by).inc()
        if record.reward_diff is not None:
            for bound, value in zip(("estimate", "low", "high"), record.reward_diff, strict=True):
                self._metrics.canary_reward_diff.labels(bound).set(value)
        level = logging.INFO if record.action == "wait" else logging.WARNING
        log.log(
            level, "canary %s vs current %s, look %d: %s%s (%s)", record.canary, record.current, record.look,
            record.action, "" if record.applied or record.action == "wait" else " (not applied: canary.auto is off)", why,
        )  # fmt: skip

    # ---- registry reads ----
    def _current(self) -> str:
        return self._registry.version_at("policy", default=self._base)

    def _thumb_share(self, version: str) -> float | None:
        """The share of ``version``'s training pairs that thumbs decided, from its manifest (None: not recorded)."""
        try:
            window = self._registry.manifest("policy", version).data_window
        except RegistryError:
            return None
        if (share := finite(window.get("thumb_share"))) is not None:
            return share
        pairs, from_thumbs = finite(window.get("pairs")), finite(window.get("from_thumbs"))
        return from_thumbs / pairs if pairs and from_thumbs is not None else None

    def _kl(self, version: str) -> tuple[float | None, float | None]:
        """KL to the starting policy and its standard error from the version's manifest (the trainer's one
        definition); None: unknown (a manifest from before the standard error was recorded has none)."""
        try:
            evaluation = self._registry.manifest("policy", version).evaluation
        except RegistryError:
            return None, None
        return finite(evaluation.get("kl_to_reference")), finite(evaluation.get("kl_to_reference_stderr"))

    def _export_kl(self) -> None:
        self._metrics.reset(self._metrics.policy_kl, math.nan)
        self._metrics.reset(self._metrics.policy_kl_stderr, math.nan)
        roles: tuple[Pointer, ...] = ("current", "canary")
        for role in roles:
            version = self._registry.version_at("policy", role)
            if version is None:
                continue
            kl, kl_stderr = self._kl(version)
            if kl is not None:
                self._metrics.policy_kl.labels(version, role).set(kl)
            if kl_stderr is not None:
                self._metrics.policy_kl_stderr.labels(version, role).set(kl_stderr)


def _look(
    canary: str, current: str, rm: str, decision: Decision, by: Literal["gate", "admin"], arm: ArmTotals,
    base: ArmTotals, kl: tuple[float | None, float | None], applied: bool,
) -> Look:  # fmt: skip
    def interval(value: Any) -> list[float] | None:
        return None if value is None else [value.estimate, value.low, value.high]

    return Look(
        time.time(), canary, current, rm, decision.look, decision.action, decision.reason, by, _summary(arm),
        _summary(base), interval(decision.reward_diff), interval(decision.up_rate_diff), decision.length_ratio, *kl, applied,
        decision.primary,
    )  # fmt: skip


def _summary(totals: ArmTotals) -> dict[str, float | None]:
    return {
        "answers": totals.n, "reward_mean": finite(totals.reward_mean), "length_mean": finite(totals.length_mean),
        "thumbs_up": totals.thumbs_up, "thumbs_down": totals.thumbs_down,
    }  # fmt: skip
