"""One training round: the log's window → pairs → DPO, KTO or PPO → evaluation → a registered version → the pointer.

Knows the round's order and its rules:
- the data window is what the *current* policy version served, scored by the *current*
  reward-model version (rewards of two reward models are never compared), within a
  staleness bound; a thumbed completion is kept whatever scored it (its thumb decides), and
  with the ``trainer.history`` settings thumbed completions of earlier versions too, weighted
  by age; the manifest records the thumbs read per version and the share of thumb-decided
  training rows (the canary gate judges a version trained mainly on thumbs by thumbs);
- first, the reward-hacking watch (``trainer.watch``): while it fires, the round skips;
- too few pairs is a skipped round, not a failure (a quiet night is not a failed CronJob);
- the new adapter starts from its parent's adapter; the reference is the base policy;
- before registering, it measures the adapter (loss, reward margin, KL to the reference and
  answer length on sampled answers) and computes the swap probe (``versioning.probe``);
- with a KL budget (``trainer.kl_budget``), a version further from the reference than the
  budget is trained again from the same parent at a smaller learning rate, aimed at the room
  its parent left from the KL it measured (``aim``); if no try fits, the round is skipped and
  nothing is registered, and a round whose parent has no room left (``min_room``) skips first;
- it publishes through the registry (nothing half-registered after a crash) and only then
  moves the pointer that gateways follow;
- its outcome goes to Prometheus metrics (a textfile, and a Pushgateway when configured).
Only one round runs at a time (``versioning.lock``). Does not know how gateways swap.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.canary import finite
from trainer import groups
from trainer.algorithms import ALGORITHMS, DISTRIBUTED, TABLE, RoundData
from trainer.distributed import Team
from trainer.export import parse_time, pick, window
from trainer.history import Labelled, Window, thumbs_by_version, weigh
from trainer.pairs import build, thumbed, weighted
from trainer.settings import KlBudgetSettings, TrainerSettings
from versioning import watch as watch_state
from versioning.lock import round_lock
from versioning.registry import Kind, Manifest, Registry, RegistryError
from versioning.watch import WatchState

log = logging.getLogger("trainer.round")
Outcome = Literal["trained", "skipped", "failed"]
DATA_PARALLEL = ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU")


class RoundError(Exception):
    """A round that cannot run (bad input, missing registry, unreadable log); one line for the user."""


@dataclass
class RoundResult:
    outcome: Outcome
    reason: str
    seconds: float = 0.0
    version: str | None = None
    parent: str | None = None
    pairs: int = 0
    completions: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "dpo"

    def summary(self) -> str:
        head = f"round {self.outcome}: {self.reason} ({self.seconds:.1f} s)"
        if self.outcome != "trained":
            return head
        f = self.figures
        if self.algorithm == "reward":
            return (
                f"{head}\n  {self.pairs} {f.get('pair_kind', 'thumb')} pairs ({f['train_pairs']} trained on, "
                f"{f['held_out_pairs']} held out), "
                f"loss {f['loss']:.4f}\n  agreement with thumbs: held out {f['agreement_before_held_out']:.3f} -> "
                f"{f['agreement_after_held_out']:.3f} (change {f['held_out_change']:+.3f} "
                f"[{f['held_out_change_low']:+.3f}, {f['held_out_change_high']:+.3f}] over {f['held_out_chosen']} chosen "
                f"and {f['held_out_rejected']} rejected answers), trained-on {f['agreement_before_train']:.3f} -> "
                f"{f['agreement_after_train']:.3f}"
            )
        unit = {"dpo": "pairs", "kto": "KTO rows", "ppo": "prompts", "grpo": "samples"}[self.algorithm]
        nan = math.nan
        extra = {
            "dpo": f"reward margin {f.get('reward_margin', nan):.3f}, reward accuracy {f.get('reward_accuracy', nan):.2f}",
            "kto": f"{f.get('desirable', 0)} desirable, {f.get('undesirable', 0)} undesirable, {f.get('from_thumbs', 0)} thumbed",
            "ppo": f"mean reward {f.get('reward', nan):.3f}",
            "grpo": f"{f.get('groups', 0)} groups ({f.get('thumbed_groups', 0)} thumbed), importance ratio "
            f"{f.get('ratio', nan):.3f} ({f.get('clipped', nan):.0%} clipped)",
        }[self.algorithm]
        return (
            f"{head}\n  {self.algorithm} version {self.version} (parent {self.parent or 'base'}), {self.pairs} {unit} from "
            f"{self.completions} completions\n  loss {f['loss']:.4f}, {extra}, KL to reference {f['kl_to_reference']:.3g} ± "
            f"{f.get('kl_to_reference_stderr', nan):.2g} nats, mean length {f['mean_length']:.1f} tokens"
        )


def policy_label(settings: TrainerSettings, registry: Registry) -> tuple[str | None, str]:
    """(current policy version or None for the base, the label the gateway logs it under)."""
    current = registry.version_at("policy")
    return current, current or settings.trainer.base_policy_version


def rm_label(settings: TrainerSettings, registry: Registry) -> str:
    return registry.version_at("reward_model", default=settings.trainer.base_rm_version)


def run(
    settings: TrainerSettings, algorithm: str | None = None, *, progress: bool = True, team: Team | None = None
) -> RoundResult:
    """One round under the round lock. Raises RoundError for bad input; LockHeld when another round runs.

    Under ``accelerate launch`` with several processes (``team``), rank 0 holds the lock, reads the window and
    publishes; the other ranks train with it (``trainer.distributed``) and end with ``Stopped``."""
    s = settings.trainer
    algorithm = algorithm or s.algorithm
    team = team or Team()
    if not team.main:  # rank 0 checks, locks and reads; a failure there finishes the round for this rank too
        return _follow(settings, algorithm, progress, team)
    if algorithm not in ALGORITHMS:
        raise RoundError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    if team.distributed and team.kind not in DATA_PARALLEL:
        raise RoundError(f"accelerate's {team.kind} is not supported: a round trains a LoRA adapter (or a model) that fits "
                         "one device on each process; use data parallelism (distributed_type: MULTI_GPU)")  # fmt: skip
    if team.distributed and algorithm not in DISTRIBUTED:
        raise RoundError(f"--algo {algorithm} runs in one process; launch it without accelerate or with --num_processes 1 "
                         f"(several processes run {', '.join(DISTRIBUTED)})")  # fmt: skip
    if not s.registry_dir.is_dir():
        raise RoundError(f"no registry at {s.registry_dir} (create it with `python -m trainer registry init`)")
    if not (s.base_policy / "config.json").is_file():
        raise RoundError(f"no base policy at {s.base_policy} (run `python -m toyworld bootstrap` or set trainer.base_policy)")
    if algorithm == "ppo" and not (s.base_reward_model / "config.json").is_file():
        raise RoundError(f"no reward model at {s.base_reward_model} for --algo ppo (set trainer.base_reward_model)")
    url = settings.store.database_url()
    started = time.perf_counter()
    try:
        with round_lock(s.registry_dir, url):
            result = _run_locked(settings, algorithm, url, progress, team)
    except BaseException as exc:
        team.finish("failed", f"{exc.__class__.__name__} on rank 0")
        raise
    team.finish(result.outcome, result.reason)
    result.seconds = time.perf_counter() - started
    return result


def _follow(settings: TrainerSettings, algorithm: str, progress: bool, team: Team) -> RoundResult:
    """A rank other than 0: train on rank 0's plan, with rank 0's decisions, until rank 0 finishes (``Stopped``)."""
    plan: tuple[str | None, str, RoundData, dict[str, Any]] = team.share()
    parent, rm_version, data, data_window = plan
    _train(settings, Registry(settings.trainer.registry_dir), algorithm, parent, rm_version, data, data_window, progress,
           team)  # fmt: skip
    team.share()  # rank 0 publishes, then finishes the round
    raise AssertionError("rank 0 shared a decision after the round's last one")


def _run_locked(settings: TrainerSettings, algorithm: str, url: str, progress: bool, team: Team) -> RoundResult:
    s = settings.trainer
    registry = Registry(s.registry_dir)
    trial = registry.pointer("policy", "canary")
    if s.publish_to == "canary" and trial is not None:  # a new canary would restart the trial the gate is judging
        return RoundResult("skipped", f"policy {trial.version} is still on trial as the canary; the next round waits for the "
                           "gateway's canary gate to promote or roll it back", parent=None, pairs=0, completions=0)  # fmt: skip
    parent, policy_version = policy_label(settings, registry)
    rm_version = rm_label(settings, registry)
    until = time.time()
    history = s.history
    spec = Window(policy_version, s.base_policy_version, parse_time(s.max_age, until), history.versions,
                  parse_time(history.max_age or s.max_age, until), history.decay)  # fmt: skip
    # one read of the log serves the watch (its window starts at spec.since) and the round; none while the watch stays firing
    logged = _LogRead(settings, url, min(spec.since, spec.thumbs_since) if history.versions else spec.since, until)
    watching = _watch(settings, url, registry, parent, rm_version, until, logged)
    if watching.firing and s.watch.pause:
        return RoundResult("skipped", f"the reward-hacking watch is firing about {watching.version} (since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(watching.since or 0))} UTC): "
                           f"{'; '.join(watching.reasons)}. Training pauses until a reward-model refit restores its agreement "
                           "with thumbs or an admin clears it (python -m trainer watch clear, POST /admin/watch/clear)",
                           parent=parent)  # fmt: skip
    keep_thumbed = s.pairs.thumbs_override
    if history.versions:  # every version's thumbed completions, then the window's selection
        read = pick(logged.rows(), logged.since, None, rm_version, keep_thumbed)
    else:
        read = pick(logged.rows(), spec.since, policy_version, rm_version, keep_thumbed)
    labelled = spec.select(read)
    exported = build(labelled, s.pairs)
    stats = exported.stats
    pairs = weigh(exported.pairs, spec)
    trained_rows = weighted(pairs, s.pairs.thumb_weight)
    thumb_rows = sum(1 for row in trained_rows if row["source"] == "thumb")
    data_window = {
        "since": spec.since, "until": until, "policy_version": policy_version, "rm_version": rm_version,
        "completions": stats.completions, "pairs": stats.pairs, "from_thumbs": stats.from_thumbs,
        "thumb_share": thumb_rows / len(trained_rows) if trained_rows else 0.0,
        "thumbs_used": sum(1 for _, thumb in labelled if thumb is not None),
        "thumbs_by_version": thumbs_by_version(labelled),
        "history": history.model_dump() if history.versions else None,
    }  # fmt: skip
    served_groups = groups.build(labelled)
    for group in served_groups.groups:
        group.weight = spec.weight(group.policy_version) if group.thumb is not None else 1.0
    data = RoundData(pairs, weigh(thumbed(labelled), spec), [r.messages for r, _ in labelled], served_groups.groups)
    available, unit = data.size(algorithm, s.kto.from_pairs)
    if available < s.min_pairs:
        reason = (
            f"{available} {unit} from {stats.completions} completions served by {policy_version} and scored by "
            f"{rm_version} in the last {s.max_age}; trainer.min_pairs is {s.min_pairs}"
        )
        return RoundResult("skipped", reason, parent=parent, pairs=stats.pairs, completions=stats.completions)
    team.share((parent, rm_version, data, data_window))
    return _train(settings, registry, algorithm, parent, rm_version, data, data_window, progress, team)


def _train(
    settings: TrainerSettings,
    registry: Registry,
    algorithm: str,
    parent: str | None,
    rm_version: str,
    data: RoundData,
    data_window: dict[str, Any],
    progress: bool,
    team: Team,
) -> RoundResult:
    """Train, evaluate and publish a version. Every rank trains; rank 0 alone saves, measures, decides whether the
    KL budget needs another try (shared with the others) and publishes."""
    import torch
    from transformers import AutoTokenizer

    from trainer import adapter, kl
    from versioning import probe

    s = settings.trainer
    tokenizer = AutoTokenizer.from_pretrained(s.base_policy)
    parent_dir = registry.path("policy", parent) if parent else None
    parent_manifest = registry.verify("policy", parent) if parent is not None else None
    parent_format = parent_manifest.format if parent_manifest is not None else None
    if s.format == "full" and algorithm != "dpo":
        raise RoundError(f"trainer.format full is implemented for dpo only, not {algorithm}")
    if s.format == "lora" and parent_format == "full":
        raise RoundError(f"the current version {parent} is a full fine-tune; trainer.format lora cannot continue it")
    budget = s.kl_budget
    parent_kl = _parent_kl(parent_manifest)
    if (room := _no_room(budget, parent, parent_kl)) is not None:
        return RoundResult("skipped", room, parent=parent, pairs=data_window["pairs"],
                           completions=data_window["completions"], algorithm=algorithm)  # fmt: skip
    tries: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix=f"{algorithm}-") as work:
        factor = 1.0
        kept: tuple[Any, ...] | None = None  # a try far under the budget, while a refined one is tried (refine_below)
        attempts = 1 + (budget.retries if budget.max_nats is not None else 0)
        for attempt in range(attempts):
            torch.manual_seed(s.adapter.seed)
            if s.format == "full":
                init = adapter.full_model(s.base_policy, parent_dir, parent_is_adapter=parent_format == "lora")
            else:
                init = adapter.policy_model(s.base_policy, parent_dir, s.adapter)
            attempt_dir = Path(work) / f"try{attempt}"
            attempt_dir.mkdir()
            fit = TABLE[algorithm].fit
            fitted = fit(_step_scaled(settings, factor), registry, rm_version, init, tokenizer, data, attempt_dir, progress)
            trained, model, used, hyperparameters = fitted.trained, fitted.model, fitted.rows, fitted.hyperparameters
            if not math.isfinite(trained.loss):
                raise RoundError(f"training diverged (loss {trained.loss}); nothing registered")
            # Everything below measures the version as saved (what vLLM will load), not the trainer's in-memory model:
            # after a bf16 round the two gave probe log-probs 0.014 nats per token apart (cause not pinned down).
            saved = attempt_dir / "version"
            within = False
            if team.main:
                model.save_pretrained(saved)
                if s.format == "full":
                    tokenizer.save_pretrained(saved)  # vLLM serves the directory as a model of its own
                    served = adapter.load_full(saved)
                else:
                    served = adapter.load_adapter(s.base_policy, saved)
                eval_prompts = _distinct_prompts(tokenizer, data.prompts, s.evaluation.prompts)
                drift = kl.measure(served, tokenizer.eos_token_id, tokenizer.pad_token_id, eval_prompts,
                                   s.evaluation.max_new_tokens, seed=s.adapter.seed, reference=init.reference)  # fmt: skip
                tries.append({"step_scale": factor, "kl_to_reference": drift.kl, "kl_to_reference_stderr": drift.kl_stderr})
                within = budget.max_nats is None or drift.kl <= budget.max_nats
                if not within:
                    log.warning("round %s: KL to the reference %s is over trainer.kl_budget.max_nats %.3g at %.3gx the "
                                "learning rate", algorithm, drift, budget.max_nats, factor)  # fmt: skip
            # rank 0 measured: every rank learns whether this try is the round's and, if not, the next try's step
            decided = (within, factor)
            if team.main and not within and kept is not None:  # the refined try went over: the kept one is the round's
                (fitted, trained, model, used, hyperparameters, saved, served, drift), kept = kept, None
                decided = (True, factor)
            elif team.main and not within:
                decided = (False, factor * _backoff(budget, drift.kl, parent_kl))
            elif team.main and kept is None and attempt + 1 < attempts and (refined := _refined(budget, tries)) is not None:
                kept = (fitted, trained, model, used, hyperparameters, saved, served, drift)
                decided = (False, refined)
            within, factor = team.share(decided)
            if within:
                break
        else:
            listed = ", ".join(f"{t['kl_to_reference']:.3g} ± {t['kl_to_reference_stderr']:.2g} at {t['step_scale']:.3g}x"
                               for t in tries)  # fmt: skip
            return RoundResult(
                "skipped", f"every try went over the KL budget of {budget.max_nats} nats to the reference "
                f"(nats at the learning-rate scale: {listed}); nothing registered", parent=parent, pairs=used,
                completions=data_window["completions"], algorithm=algorithm,
            )  # fmt: skip
        if not team.main:
            return RoundResult("trained", f"rank {team.rank} of {team.size}: trained; rank 0 publishes", parent=parent,
                               pairs=used, completions=data_window["completions"], algorithm=algorithm)  # fmt: skip
        probe.compute(served, probe.sequences(tokenizer)).save(saved)
        figures: dict[str, Any] = {
            "loss": trained.loss, **trained.figures, "kl_to_reference": drift.kl,
            "kl_to_reference_stderr": drift.kl_stderr, "mean_length": drift.mean_length,
            "kl_samples": drift.samples, "steps": trained.steps, "train_seconds": trained.seconds,
        }  # fmt: skip
        if budget.max_nats is not None:
            figures["kl_budget_tries"] = tries

        manifest = _publish_files(
            registry, "policy", saved, skip=("README.md",), format=s.format, parent=parent, algorithm=algorithm,
            hyperparameters=hyperparameters, data_window={**data_window, "rows": used}, evaluation=figures,
        )  # fmt: skip
    registry.set_pointer("policy", s.publish_to, manifest.version, reason=f"{algorithm} on {used} rows")
    _retain(registry, "policy", s.keep_versions)
    return RoundResult(
        "trained", f"{manifest.version} registered and set as {s.publish_to}", version=manifest.version, parent=parent,
        pairs=used, completions=data_window["completions"], figures=figures, algorithm=algorithm,
    )  # fmt: skip


def _watch(settings: TrainerSettings, url: str, registry: Registry, current: str | None, rm_version: str,
           until: float, logged: _LogRead | None = None) -> WatchState:  # fmt: skip
    """The reward-hacking watch before a round: a firing watch stays firing until cleared; otherwise the current version
    is checked against its parent on what each served in the window (read from ``logged`` when the round has read it), and
    a check that fires is written down."""
    from trainer import watch

    state = watch_state.read(registry.root)
    s = settings.trainer
    if state.firing or not s.watch.enabled or current is None or state.cleared_for == current:
        return state
    manifest = registry.manifest("policy", current)
    parent = manifest.parent or s.base_policy_version
    since = parse_time(s.max_age, until)
    rows = (logged if logged is not None else _LogRead(settings, url, since, until)).rows()
    stats = {v: watch.stats(v, pick(rows, since, v)) for v in (current, parent)}
    kl = (finite(manifest.evaluation.get("kl_to_reference")), finite(manifest.evaluation.get("kl_to_reference_stderr")))
    evaluation = watch.Evaluation(current, parent, watch.checks(stats[current], stats[parent], rm_version, s.watch, kl))
    state.checks, state.checked_at = evaluation.as_dicts(), evaluation.at
    if evaluation.fired:
        state.firing, state.version, state.parent, state.since = True, current, parent, evaluation.at
        state.reasons = [f"{c.name}: {c.detail}" for c in evaluation.fired]
        log.warning("reward-hacking watch fired about %s (vs %s): %s", current, parent, "; ".join(state.reasons))
    watch_state.write(registry.root, state)
    return state


def check_watch(settings: TrainerSettings) -> WatchState:
    """The watch's check on its own (``python -m trainer watch check``), under the round lock."""
    s = settings.trainer
    if not s.registry_dir.is_dir():
        raise RoundError(f"no registry at {s.registry_dir} (create it with `python -m trainer registry init`)")
    url = settings.store.database_url()
    with round_lock(s.registry_dir, url):
        registry = Registry(s.registry_dir)
        return _watch(settings, url, registry, registry.version_at("policy"), rm_label(settings, registry), time.time())


def _parent_kl(parent: Manifest | None) -> float:
    """The parent version's KL to the reference, as its round measured it (0: the round starts from the reference, or
    the parent's is unknown)."""
    kl = finite(parent.evaluation.get("kl_to_reference")) if parent is not None else None
    return kl if kl is not None and kl > 0 else 0.0


def _no_room(budget: KlBudgetSettings, parent: str | None, parent_kl: float) -> str | None:
    """Why a round skips before training: its parent is already within ``min_room`` of the KL budget (None: it may
    train). Every try of such a round went over in the loop's runs, or fitted by barely moving the policy."""
    if budget.max_nats is None or budget.min_room is None or parent_kl <= (1 - budget.min_room) * budget.max_nats:
        return None
    return (f"the current version {parent} is already {parent_kl:.3g} nats from the reference, within "
            f"trainer.kl_budget.min_room ({budget.min_room:g}) of the {budget.max_nats:g}-nat budget: no room to train; "
            "nothing registered")  # fmt: skip


def _backoff(budget: KlBudgetSettings, kl: float, parent_kl: float = 0.0) -> float:
    """How much smaller the next try's step is than one that went ``kl`` nats from the reference (over the budget).
    Aimed at the round's own move: a try starts from its parent, ``parent_kl`` from the reference, and the step scales
    the way from there, so the next try aims at ``aim`` x the room left (``max_nats - parent_kl``) over the way this
    try went (``kl - parent_kl``); from the reference the two are the same aim."""
    assert budget.max_nats is not None
    if budget.aim is None or not math.isfinite(kl) or kl <= 0:
        return budget.backoff
    start = parent_kl if 0 <= parent_kl < budget.max_nats < kl else 0.0
    return min(budget.backoff, budget.aim * (budget.max_nats - start) / (kl - start))


def _refined(budget: KlBudgetSettings, tries: list[dict[str, float]]) -> float | None:
    """After a try fitted the budget at under ``refine_below`` of it, following one over it: the step where the line
    through the two tries' (log step, log KL) reaches ``aim`` x the budget (KL grew with the step's power 1.2 to 2.6 in
    the loop's rounds, so one aimed as if linear could land 600x under, leaving the round nearly untrained). None: no
    refinement (the try is close enough, no try went over, or the two do not give a rising line)."""
    if budget.max_nats is None or budget.refine_below is None or len(tries) < 2:
        return None
    over, fit = tries[-2], tries[-1]
    target = (budget.aim or budget.backoff) * budget.max_nats
    if fit["kl_to_reference"] >= budget.refine_below * budget.max_nats or over["kl_to_reference"] <= budget.max_nats:
        return None
    if min(fit["kl_to_reference"], fit["step_scale"]) <= 0 or over["step_scale"] <= fit["step_scale"]:
        return None
    power = math.log(over["kl_to_reference"] / fit["kl_to_reference"]) / math.log(over["step_scale"] / fit["step_scale"])
    if not math.isfinite(power) or power <= 0:
        return None
    return float(min(fit["step_scale"] * (target / fit["kl_to_reference"]) ** (1 / power), over["step_scale"] * budget.backoff))


def _step_scaled(settings: TrainerSettings, factor: float) -> TrainerSettings:
    """The settings with every policy algorithm's learning rate times ``factor`` (the KL budget's back-off)."""
    if factor == 1.0:
        return settings
    s = settings.trainer
    scaled = {name: getattr(s, name).model_copy(update={"learning_rate": getattr(s, name).learning_rate * factor})
              for name in ALGORITHMS}  # fmt: skip
    return settings.model_copy(update={"trainer": s.model_copy(update=scaled)})


def refit_reward_model(settings: TrainerSettings, *, progress: bool = True) -> RoundResult:
    """Refit the current reward model on the window's thumb-decided pairs, under the round lock; register it
    as a reward-model version and make it current unless its held-out agreement with thumbs fell with evidence
    (``reward.Check``: an interval over the held-out answers; ``trainer.reward.accept`` and ``margin``)."""
    s = settings.trainer
    if not s.registry_dir.is_dir():
        raise RoundError(f"no registry at {s.registry_dir} (create it with `python -m trainer registry init`)")
    url = settings.store.database_url()
    started = time.perf_counter()
    with round_lock(s.registry_dir, url):
        result = _refit_locked(settings, url, progress)
    result.seconds = time.perf_counter() - started
    return result


class _LogRead:
    """The log's completed completions from ``since`` to ``until``, read once on first use (then narrowed with
    ``export.pick``)."""

    def __init__(self, settings: TrainerSettings, url: str, since: float, until: float) -> None:
        self.settings, self.url, self.since, self.until = settings, url, since, until
        self._rows: list[Labelled] | None = None

    def rows(self) -> list[Labelled]:
        if self._rows is None:
            self._rows = _read_window(self.settings, self.url, self.since, self.until)
        return self._rows


def _read_window(settings: TrainerSettings, url: str, since: float, until: float) -> list[Labelled]:
    """Every completed completion in the window with its thumb, whatever served or scored it."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.store.sql import SqlStore

    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        raise RoundError(f"no log database at {url} (has the gateway run with store.enabled?)")
    store = SqlStore(url, connect_timeout_s=settings.store.connect_timeout_s)
    try:
        return list(window(store, since, until))
    except SQLAlchemyError as exc:
        raise RoundError(f"cannot read the log: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        store.close()


def _refit_locked(settings: TrainerSettings, url: str, progress: bool) -> RoundResult:
    from trainer import reward
    from trainer.settings import PairSettings

    s = settings.trainer
    registry = Registry(s.registry_dir)
    since, until = parse_time(s.max_age), time.time()
    labelled = _read_window(settings, url, since, until)  # a thumb orders a pair whatever scored it
    if s.reward.pairs == "thumb_vs_thumb":
        data = reward.thumb_pairs(labelled, s.reward.holdout_every, s.reward.holdout_every_down, s.reward.max_pairs,
                                  s.reward.seed)  # fmt: skip
        kind = "thumb-vs-thumb pairs (an answer thumbed up against one thumbed down)"
    else:
        built = build(labelled, PairSettings(policy=s.pairs.policy, thumbs_override=True))
        data = reward.split([p for p in built.pairs if p["source"] == "thumb"], s.reward.holdout_every,
                            s.reward.holdout_every_down)  # fmt: skip
        kind = "thumb-decided pairs"
    pairs = [*data.train, *data.held_out]
    if len(data.train) < s.reward.min_pairs:
        reason = (f"{len(data.train)} {kind} to train on in the last {s.max_age}; trainer.reward.min_pairs is "
                  f"{s.reward.min_pairs}")  # fmt: skip
        return RoundResult("skipped", reason, pairs=len(pairs), completions=len(labelled), algorithm="reward")
    parent = registry.version_at("reward_model")
    source = registry.path("reward_model", parent) if parent else s.base_reward_model
    if parent is not None:
        registry.verify("reward_model", parent)
    elif not (source / "config.json").is_file():
        raise RoundError(f"no reward model at {source} (set trainer.base_reward_model)")
    model, tokenizer = reward.load(source)
    with tempfile.TemporaryDirectory(prefix="reward-") as work:
        fitted = reward.refit(model, tokenizer, data, s.reward, Path(work), progress=progress)
        if not math.isfinite(fitted.loss):
            raise RoundError(f"reward-model training diverged (loss {fitted.loss}); nothing registered")
        saved = Path(work) / "model"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        figures: dict[str, Any] = {
            "loss": fitted.loss, "steps": fitted.steps, "train_seconds": fitted.seconds,
            "agreement_before_train": fitted.train_before, "agreement_after_train": fitted.train_after,
            "agreement_before_held_out": fitted.check.before, "agreement_after_held_out": fitted.check.after,
            "train_pairs": len(data.train), "held_out_pairs": len(data.held_out), "pair_kind": s.reward.pairs,
            "same_prompt_pairs": sum(1 for p in pairs if p.get("same_prompt")),
            "held_out_change": fitted.check.change.estimate, "held_out_change_low": fitted.check.change.low,
            "held_out_change_high": fitted.check.change.high, "held_out_chosen": fitted.check.chosen,
            "held_out_rejected": fitted.check.rejected, "held_out_confidence": fitted.check.confidence,
        }  # fmt: skip

        manifest = _publish_files(
            registry, "reward_model", saved, format="full", parent=parent, algorithm="bradley-terry",
            hyperparameters=s.reward.model_dump(), data_window={"since": since, "until": until, "pairs": len(pairs)},
            evaluation=figures,
        )  # fmt: skip
    check, after = fitted.check, fitted.check.after
    label = parent or s.base_rm_version
    refused = check.verdict(s.reward.min_held_out, s.reward.margin, s.reward.accept)
    if refused is not None:
        reason = (f"reward model {manifest.version} registered but not made current: held-out agreement with thumbs "
                  f"{check.describe()}: {refused}; {label} stays current")  # fmt: skip
    else:
        registry.set_pointer("reward_model", "current", manifest.version, reason=f"held-out agreement {check.describe()}")
        reason = (f"reward model {manifest.version} registered and set as current (was {label}): held-out agreement "
                  f"{check.describe()}")  # fmt: skip
        watching = watch_state.read(registry.root)
        if watching.firing and after >= s.watch.min_agreement:
            watch_state.clear(registry.root, f"refit {manifest.version}", f"held-out agreement with thumbs {check.describe()}")
            reason += f"; it restores agreement with thumbs ({after:.3f}), so the reward-hacking watch is cleared"
    _retain(registry, "reward_model", s.keep_versions)
    return RoundResult("trained", reason, version=manifest.version, parent=parent, pairs=len(pairs),
                       completions=len(labelled), figures=figures, algorithm="reward")  # fmt: skip


def _publish_files(registry: Registry, kind: Kind, saved: Path, skip: tuple[str, ...] = (), **manifest: Any) -> Manifest:
    """The files of a saved model directory (those named in ``skip`` left out) published as a new version."""

    def write(directory: Path) -> None:
        for file in saved.iterdir():
            if file.is_file() and file.name not in skip:
                shutil.copy2(file, directory / file.name)

    return registry.publish(kind, write, **manifest)


def _retain(registry: Registry, kind: Kind, keep: int) -> None:
    try:
        registry.retain(kind, keep)
    except (OSError, RegistryError) as exc:  # retention is housekeeping: the round itself succeeded
        log.warning("registry retention of %s versions failed: %s", kind, exc)


def _distinct_prompts(tokenizer: Any, prompts: list[list[dict[str, Any]]], limit: int) -> list[list[int]]:
    from trainer.adapter import prompt_ids  # torch-free, but keeps the module's imports light

    seen: set[str] = set()
    out: list[list[int]] = []
    for messages in prompts:
        key = repr(messages)
        if key in seen:
            continue
        seen.add(key)
        out.append(prompt_ids(tokenizer, messages))
        if len(out) == limit:
            break
    return out
