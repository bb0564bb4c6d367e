"""Prometheus metrics of one gateway process, on its own registry (no process globals).

Knows the metric names, labels and buckets: request latency by route and status, latency
per stage (generate, score, select), the chosen candidate's reward, the margin between
the chosen and the runner-up, candidates per request, errors by type. Does not serve them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REWARD_BUCKETS = (-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
MARGIN_BUCKETS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
N_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("gateway_requests", "Chat completion requests", ["status"], registry=r)
        self.request_latency = Histogram(
            "gateway_request_latency_seconds", "Whole request latency", ["route", "stream"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_latency = Histogram(
            "gateway_stage_latency_seconds", "Latency per pipeline stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.chosen_reward = Histogram(
            "gateway_chosen_reward", "Reward of the chosen candidate", buckets=REWARD_BUCKETS, registry=r
        )
        # a histogram with negative buckets exposes no _sum (OpenMetrics); this summary gives sum and count for means
        self.chosen_reward_total = Summary(
            "gateway_chosen_reward_stats", "Reward of the chosen candidate (sum, count)", registry=r
        )
        self.reward_margin = Histogram(
            "gateway_reward_margin", "Chosen minus runner-up reward (N>1)", buckets=MARGIN_BUCKETS, registry=r
        )
        self.candidates = Histogram("gateway_candidates_per_request", "N generated per request", buckets=N_BUCKETS, registry=r)
        self.errors = Counter("gateway_errors", "Errors returned to clients", ["type", "code"], registry=r)
        self.in_flight = Gauge("gateway_requests_in_flight", "Chat completion requests in progress", registry=r)
        self.policy_info = Gauge(
            "gateway_policy_version_info", "Policy and reward-model versions served", ["policy", "reward_model"], registry=r
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
