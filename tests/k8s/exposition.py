"""The gateway's own Prometheus exposition, as Prometheus parses it: what the dashboard's queries and the
alert rules may name (a ``Metrics`` registry with one observation on each metric)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

METRIC = re.compile(r"(?<![A-Za-z0-9_:])bon_[a-z_]+")
VLLM_METRIC = re.compile(r"(?<![A-Za-z0-9_:])vllm:[a-z_]+")


@dataclass(frozen=True)
class Sample:
    family: str
    kind: str  # the family's type: counter, gauge, histogram, summary, ...
    labels: frozenset[str]


def exposition() -> dict[str, Sample]:
    """Every sample name the gateway exposes, with its family, type and label names."""
    metrics = Metrics()
    metrics.requests.labels("200").inc()
    metrics.request_latency.labels("chat_completions", "false").observe(0.2)
    for stage in ("generate", "score", "select", "log"):
        metrics.stage_latency.labels(stage).observe(0.01)
    metrics.chosen_reward.labels("v1").observe(1.5)
    metrics.chosen_reward_stats.labels("v1").observe(1.5)
    for vs in ("runner_up", "mean"):
        metrics.reward_margin.labels(vs).observe(0.5)
    metrics.chosen_length.observe(40)
    metrics.candidates.observe(4)
    metrics.errors.labels("invalid_request_error", "none").inc()
    metrics.in_flight.inc()
    metrics.policy_info.labels("v1", "rm-v1").set(1)
    for thumb in ("up", "down"):
        metrics.feedback.labels(thumb, "v1").inc()
    metrics.records_logged.inc()
    metrics.records_spooled.inc()
    metrics.log_write_errors.labels("OperationalError").inc()
    metrics.watch_log(lambda: 3.0, lambda: 1.0)
    metrics.swaps.labels("ok").inc()
    metrics.swap_seconds.labels("lora").observe(0.2)
    metrics.swap_probe_diff.labels("http://vllm:8000").set(1e-5)
    metrics.swap_backend_failures.labels("http://vllm:8000").inc()
    metrics.backend_circuit.labels("http://vllm:8000").set(1)
    metrics.records_quarantined.inc()
    metrics.degraded.labels("scorer_failed").inc()
    metrics.adaptive.labels("spread").inc()
    metrics.adaptive_kept.observe(0.9)
    metrics.bon_gain.labels("v1").observe(0.3)
    metrics.bon_gain_squares.labels("v1").inc(0.09)
    metrics.version_candidates.labels("v1").inc(4)
    metrics.version_requests.labels("v1").inc()
    metrics.set_canary("v2")
    metrics.canary_decisions.labels("rollback", "gate").inc()
    for arm in ("canary", "current"):
        metrics.canary_answers.labels(arm).set(200)
        metrics.canary_thumbs.labels(arm).set(40)
    metrics.canary_needed.labels("thumbs", "thumbs").set(500)
    metrics.watch_firing.set(1)
    for bound in ("estimate", "low", "high"):
        metrics.canary_reward_diff.labels(bound).set(-0.1)
    metrics.policy_kl.labels("v2", "canary").set(0.4)
    metrics.policy_kl_stderr.labels("v2", "canary").set(0.02)

    samples: dict[str, Sample] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if family.name.endswith("_created"):
            continue  # counters' and histograms' creation times: the text format gives them families of their own
        # a labelled metric with no observation exposes no sample: observe it above
        assert family.samples, f"{family.name} has no sample; observe it in exposition()"
        for sample in family.samples:
            known = samples.get(sample.name)
            labels = frozenset(sample.labels) | (known.labels if known else frozenset())
            samples[sample.name] = Sample(family.name, family.type, labels)
    return samples
