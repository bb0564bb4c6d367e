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

from trainer.registry import Registry

if TYPE_CHECKING:
    from trainer.round import RoundResult

log = logging.getLogger("trainer.metrics")
OUTCOMES = ("trained", "skipped", "failed")


def collect(result: RoundResult, registry: Registry | None) -> CollectorRegistry:
    metrics = CollectorRegistry()
    outcome = Gauge("trainer_round_outcome", "1 for the last round's outcome, 0 for the others", ["outcome"], registry=metrics)
    for name in OUTCOMES:
        outcome.labels(name).set(1 if name == result.outcome else 0)
    Gauge("trainer_round_duration_seconds", "wall time of the last round", registry=metrics).set(result.seconds)
    Gauge("trainer_round_pairs", "pairs the last round used (or found, when it skipped)", registry=metrics).set(result.pairs)
    Gauge("trainer_round_last_run_timestamp_seconds", "when the last round ended", registry=metrics).set(time.time())
    last_success = Gauge(
        "trainer_round_last_success_timestamp_seconds", "when the newest policy version was registered", registry=metrics
    )
    versions = registry.versions("policy") if registry is not None and registry.root.is_dir() else []
    if versions:
        last_success.set(max(m.created for m in versions))
    for key, help_text in (("loss", "DPO loss of the last trained round"),
                           ("kl_to_reference", "KL to the base policy of the last trained version (nats per response)"),
                           ("mean_length", "mean sampled answer length of the last trained version (tokens)")):  # fmt: skip
        if key in result.figures:
            Gauge(f"trainer_round_{key}", help_text, registry=metrics).set(float(result.figures[key]))
    return metrics


def report(result: RoundResult, registry: Registry | None, textfile: Path | None, pushgateway: str | None) -> None:
    """Write the textfile and push; a metrics failure is logged, never turned into a failed round."""
    metrics = collect(result, registry)
    if textfile is not None:
        try:
            textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(textfile), metrics)
        except OSError as exc:
            log.warning("cannot write round metrics to %s: %s", textfile, exc)
    if pushgateway:
        try:
            push_to_gateway(pushgateway, job="bon-trainer", registry=metrics, timeout=10)
        except OSError as exc:
            log.warning("cannot push round metrics to %s: %s", pushgateway, exc)
