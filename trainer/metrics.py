"""A round's outcome as Prometheus metrics, for a process that exits when the round ends.

Knows the metric names and the two ways a batch job reports them: a textfile for
node-exporter's textfile collector (written atomically), and a push to a Pushgateway when
one is configured (the usual route for a Kubernetes CronJob). The last-success time is
read back from the registry (the newest version's creation time), so a skipped or failed
round still reports when the last good one was. Does not run the round.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

from versioning.registry import Kind, Registry

if TYPE_CHECKING:
    from trainer.round import RoundResult
    from versioning.watch import WatchState

log = logging.getLogger("trainer.metrics")
OUTCOMES = ("trained", "skipped", "failed")


POLICY_FIGURES = (
    ("loss", "training loss of the last trained round"),
    ("kl_to_reference", "KL to the base policy of the last trained version (nats per response)"),
    ("kl_to_reference_stderr", "standard error of trainer_round_kl_to_reference over the sampled answers"),
    ("mean_length", "mean sampled answer length of the last trained version (tokens)"),
)
REFIT_FIGURES = (
    ("loss", "Bradley-Terry loss of the last reward-model refit"),
    ("agreement_before_held_out", "held-out agreement with thumbs of the reward model before the last refit"),
    ("agreement_after_held_out", "held-out agreement with thumbs of the last refit reward model"),
    ("held_out_change_low", "lower bound of the last refit's held-out agreement change (after - before), DeLong over answers"),
    ("held_out_change_high", "upper bound of the last refit's held-out agreement change (no_loss refuses it below -margin)"),
)


def collect(result: RoundResult, registry: Registry | None) -> CollectorRegistry:
    """``trainer_round_*`` for a policy round, ``trainer_reward_refit_*`` for a reward-model refit."""
    refit = result.algorithm == "reward"
    prefix = "trainer_reward_refit" if refit else "trainer_round"
    kind: Kind = "reward_model" if refit else "policy"
    figures = REFIT_FIGURES if refit else POLICY_FIGURES
    metrics = CollectorRegistry()
    outcome = Gauge(f"{prefix}_outcome", "1 for the last run's outcome, 0 for the others", ["outcome"], registry=metrics)
    for name in OUTCOMES:
        outcome.labels(name).set(1 if name == result.outcome else 0)
    Gauge(f"{prefix}_duration_seconds", "wall time of the last run", registry=metrics).set(result.seconds)
    Gauge(f"{prefix}_pairs", "pairs the last run used (or found, when it skipped)", registry=metrics).set(result.pairs)
    Gauge(f"{prefix}_last_run_timestamp_seconds", "when the last run ended", registry=metrics).set(time.time())
    last_success = Gauge(
        f"{prefix}_last_success_timestamp_seconds", f"when the newest {kind} version was registered", registry=metrics
    )
    versions = registry.versions(kind) if registry is not None and registry.root.is_dir() else []
    if versions:
        last_success.set(max(m.created for m in versions))
    for key, help_text in figures:
        if key in result.figures:
            Gauge(f"{prefix}_{key}", help_text, registry=metrics).set(float(result.figures[key]))
    return metrics


def watch_metrics(state: WatchState) -> CollectorRegistry:
    """``trainer_watch_firing`` and, per check of the last evaluation, ``trainer_watch_check_fired{check}``."""
    metrics = CollectorRegistry()
    Gauge("trainer_watch_firing", "1 while the reward-hacking watch fires (rounds pause)", registry=metrics).set(state.firing)
    fired = Gauge("trainer_watch_check_fired", "1 when the check fired at the watch's last evaluation", ["check"],
                  registry=metrics)  # fmt: skip
    for check in state.checks:
        fired.labels(str(check.get("name"))).set(1 if check.get("fired") else 0)
    return metrics


def write_watch(state: WatchState, round_textfile: Path) -> None:
    """The watch's metrics in ``watch.prom`` beside the round's textfile (a failure is logged)."""
    target = round_textfile.with_name("watch.prom")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(target), watch_metrics(state))
    except OSError as exc:
        log.warning("cannot write the watch's metrics to %s: %s", target, exc)


def report(result: RoundResult, registry: Registry | None, textfile: Path | None, pushgateway: str | None) -> None:
    """Write the textfile and push; a metrics failure is logged, never turned into a failed round. A refit
    writes ``reward_refit.prom`` beside the round's textfile and pushes under its own job."""
    metrics = collect(result, registry)
    refit = result.algorithm == "reward"
    if refit and textfile is not None:
        textfile = textfile.with_name("reward_refit.prom")
    if textfile is not None:
        try:
            textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(textfile), metrics)
        except OSError as exc:
            log.warning("cannot write round metrics to %s: %s", textfile, exc)
        if registry is not None and registry.root.is_dir():
            from versioning import watch

            write_watch(watch.read(registry.root), textfile)
    if pushgateway:
        try:
            push_to_gateway(pushgateway, job="bon-trainer-reward" if refit else "bon-trainer", registry=metrics, timeout=10)
        except OSError as exc:
            log.warning("cannot push round metrics to %s: %s", pushgateway, exc)
