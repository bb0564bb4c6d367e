"""Prometheus metrics of one gateway process, on its own registry (no process globals).

Knows the metric names (prefix ``bon_``, units in names), labels and buckets: request
latency, latency per stage (generate, score, select, log), the chosen candidate's reward
and length, its margin over the runner-up and over the mean, candidates per request,
thumbs by value and policy version, the log's records written/spooled, its queue and
spool depth and write errors, errors returned by type, the versions served and hot-swaps, the
canary trial (its version, answers and thumbs per arm, what it needs, the gate's decisions and reward interval) and
each served version's KL to the starting policy, and the reward-hacking watch. Does not serve them. ``scrape``/``sample``
read any Prometheus endpoint back (the loop, the benchmarks and the tests use them).

Several worker processes (``workers: N``): prometheus-client's multiprocess mode, chosen by
``PROMETHEUS_MULTIPROC_DIR`` (set by the parent before the workers start). Every process writes
its values to files there and ``exposition`` merges them: counters and histograms summed,
each gauge as its ``multiprocess_mode`` says (live sums for queues and requests in flight, the
live maximum for 0/1 states, the most recent for figures one process measured). In that mode a
label set is never removed (the files cannot forget one): a replaced version's info series and a
gone backend's gauges are set to 0 instead.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

PREFIX = "bon_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REWARD_BUCKETS = (-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
MARGIN_BUCKETS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
N_BUCKETS = (1, 2, 4, 8, 16, 32)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LENGTH_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, when this process is one of several workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    multiprocess: str | None = field(default_factory=multiprocess_dir)

    def __post_init__(self) -> None:
        self._versions = ("none", "none")
        self._watched: list[tuple[Gauge, Callable[[], float]]] = []
        r, p = self.registry, PREFIX
        self.requests = Counter(f"{p}requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.request_latency = Histogram(
            f"{p}request_latency_seconds", "Whole request latency", ["route", "stream"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_latency = Histogram(
            f"{p}stage_latency_seconds",
            "Latency per pipeline stage (generate, score, select, log)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # the children the hot path observes, bound once (``labels()`` takes a lock and builds a key on every call)
        self.stage = {name: self.stage_latency.labels(name) for name in ("generate", "score", "select", "log")}
        self.chat_latency = {
            stream: self.request_latency.labels("chat_completions", stream) for stream in ("true", "false")
        }  # fmt: skip
        self.chosen_reward = Histogram(
            f"{p}chosen_reward", "Reward of the chosen candidate", ["policy_version"], buckets=REWARD_BUCKETS, registry=r
        )
        # a histogram with negative buckets exposes no _sum (OpenMetrics); this summary gives sum and count for means
        self.chosen_reward_stats = Summary(
            f"{p}chosen_reward_stats", "Reward of the chosen candidate (sum, count)", ["policy_version"], registry=r
        )
        self.reward_margin = Histogram(
            f"{p}reward_margin",
            "Chosen reward minus the runner-up's (vs=runner_up) or the candidates' mean (vs=mean), N>1",
            ["vs"],
            buckets=MARGIN_BUCKETS,
            registry=r,
        )
        self.chosen_length = Histogram(
            f"{p}chosen_length_tokens", "Tokens in the chosen candidate", buckets=LENGTH_BUCKETS, registry=r
        )
        self.candidates = Histogram(f"{p}candidates_per_request", "N generated per request", buckets=N_BUCKETS, registry=r)
        self.pruned = Counter(f"{p}pruned_candidates", "Candidates aborted while decoding (selection: prune)", registry=r)
        self.bon_gain = Histogram(
            f"{p}best_of_n_gain", "What best-of-N bought per request: the chosen reward minus the first candidate's (the "
            "answer N=1 would have given), by policy version", ["policy_version"], buckets=MARGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.bon_gain_squares = Counter(
            f"{p}best_of_n_gain_squares", "Sum of the squared best-of-N gains (with the gain's _sum and _count: its "
            "standard error), by policy version", ["policy_version"], registry=r,
        )  # fmt: skip
        self.version_candidates = Counter(
            f"{p}version_candidates", "Candidates generated, by policy version (over bon_version_requests_total: N per "
            "request)", ["policy_version"], registry=r,
        )  # fmt: skip
        self.version_requests = Counter(
            f"{p}version_requests", "Chat completions generated, by policy version", ["policy_version"], registry=r
        )
        self.adaptive_kept = Histogram(
            f"{p}adaptive_gain_kept", "Adaptive N's spread decisions: the share of the cap's measured best-of-N gain the "
            "chosen N keeps", buckets=(0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0), registry=r,
        )  # fmt: skip
        self.adaptive = Counter(
            f"{p}adaptive_n", "Requests whose N adaptive N chose, by the rule that set it (cap, cold, explore, spread, "
            "budget)", ["reason"], registry=r,
        )  # fmt: skip
        self.errors = Counter(f"{p}errors", "Errors returned to clients by type and code", ["type", "code"], registry=r)
        self.in_flight = Gauge(
            f"{p}requests_in_flight", "Chat completion requests in progress", registry=r, multiprocess_mode="livesum"
        )
        self.policy_info = Gauge(
            f"{p}policy_version_info",
            "Policy and reward-model versions served",
            ["policy", "reward_model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.feedback = Counter(
            f"{p}feedback",
            "Thumbs received, by value and the policy version that answered",
            ["thumb", "policy_version"],
            registry=r,
        )
        self.records_logged = Counter(f"{p}log_records_written", "Records written to the log database", registry=r)
        self.records_spooled = Counter(f"{p}log_records_spooled", "Records written to the local spool instead", registry=r)
        self.log_write_errors = Counter(f"{p}log_write_errors", "Failed log database writes", ["error"], registry=r)
        self.records_quarantined = Counter(
            f"{p}log_records_quarantined", "Records the log database refused, kept in the spool's quarantine file", registry=r
        )
        self.log_queue_depth = Gauge(
            f"{p}log_queue_depth", "Records waiting for the log writer", registry=r, multiprocess_mode="livesum"
        )
        self.log_spool_pending = Gauge(
            f"{p}log_spool_pending", "Spooled records not yet replayed into the database", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.swaps = Counter(
            f"{p}swaps",
            "Policy hot-swap attempts by result (ok, registry, verification, launch: a full version's vLLM did not start, "
            "waiting: no adapter slot yet, died: a routed full version's vLLM exited)",
            ["result"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            f"{p}swap_seconds",
            "Time to serve a policy version, verified, by format (lora: load on every backend; full: start a vLLM)",
            ["format"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.swap_probe_diff = Gauge(
            f"{p}swap_probe_diff_nats",
            "Served vs expected probe log-probs at the last swap (mean per token)",
            ["backend"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.swap_backend_failures = Counter(
            f"{p}swap_backend_failures", "Backends that failed to load or verify a version", ["backend"], registry=r
        )

        self.degraded = Counter(
            f"{p}degraded", "Answers served without best-of-N (scorer.on_failure fail_open) by reason", ["reason"], registry=r
        )
        self.backend_circuit = Gauge(
            f"{p}backend_circuit_open", "1 while a model backend's circuit is open (skipped)", ["backend"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip

        self.canary_info = Gauge(
            f"{p}canary_version_info", "The canary policy version on trial (none: no trial)", ["version"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.canary_decisions = Counter(
            f"{p}canary_decisions",
            "Canary gate decisions (promote, rollback, wait) by who made them (gate, admin)",
            ["action", "by"],
            registry=r,
        )
        self.canary_answers = Gauge(
            f"{p}canary_answers", "Scored answers per arm of the running trial, all replicas (arm: canary, current)", ["arm"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.canary_thumbs = Gauge(
            f"{p}canary_thumbs", "Thumbs per arm of the running trial, all replicas (arm: canary, current)", ["arm"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.canary_needed = Gauge(
            f"{p}canary_needed",
            "What the running trial needs per arm (primary: reward or thumbs; unit: answers or thumbs at the last look, "
            "answers_at_last_look at the thumb rate so far, <unit>_for_power for the power at the margin)",
            ["primary", "unit"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.canary_reward_diff = Gauge(
            f"{p}canary_reward_diff",
            "Canary minus current mean chosen reward at the gate's last look (bound: estimate, low, high)",
            ["bound"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.watch_firing = Gauge(
            f"{p}watch_firing", "1 while the trainer's reward-hacking watch fires (training rounds pause)", registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.policy_kl = Gauge(
            f"{p}policy_kl_nats",
            "KL to the starting policy, nats per response (the trainer's evaluation of each served version)",
            ["version", "role"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.policy_kl_stderr = Gauge(
            f"{p}policy_kl_stderr_nats",
            "Standard error of bon_policy_kl_nats over the trainer's sampled answers",
            ["version", "role"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.set_canary(None)

    def set_canary(self, version: str | None) -> None:
        self.reset(self.canary_info, 0)
        self.canary_info.labels(version or "none").set(1)

    def set_versions(self, policy: str | None = None, reward_model: str | None = None) -> None:
        """The versions served now (the previous label set is dropped); None keeps that one as it is."""
        self._versions = (policy or self._versions[0], reward_model or self._versions[1])
        self.reset(self.policy_info, 0)
        self.policy_info.labels(*self._versions).set(1)

    def reset(self, gauge: Gauge, value: float) -> None:
        """Drop every label set of ``gauge``; with several workers, set each of this process's to ``value`` instead."""
        if self.multiprocess is None:
            gauge.clear()
            return
        for family in gauge.collect():
            for s in family.samples:
                gauge.labels(**s.labels).set(value)

    def forget_backend(self, url: str) -> None:
        """Drop the per-backend series of a backend that is gone for good (a stopped blue-green instance)."""
        if self.multiprocess is not None:  # blue-green needs one worker (settings); kept correct anyway
            self.backend_circuit.labels(url).set(0)
            return
        for metric in (self.backend_circuit, self.swap_probe_diff, self.swap_backend_failures):
            with contextlib.suppress(KeyError):
                metric.remove(url)

    def watch_log(self, queue_depth: Callable[[], float], spool_pending: Callable[[], float]) -> None:
        """The log's queue and spool, read at each scrape (several workers: at each ``refresh``)."""
        if self.multiprocess is None:
            self.log_queue_depth.set_function(queue_depth)
            self.log_spool_pending.set_function(spool_pending)
        else:
            self._watched = [(self.log_queue_depth, queue_depth), (self.log_spool_pending, spool_pending)]

    def refresh(self) -> None:
        """Several workers: write the watched values to this process's files (the lifespan calls it every second)."""
        for gauge, read in self._watched:
            gauge.set(read())

    def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.refresh()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess)
        return generate_latest(merged), CONTENT_TYPE_LATEST


def scrape(url: str, timeout_s: float = 10.0) -> list[Sample]:
    """Every sample ``url``/metrics exposes, read with prometheus_client's own parser (the exposition format's
    escaping and ordering are the library's business, not a regular expression's)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample(url: str, name: str, labels: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> float | None:
    """The value of the first sample ``name`` whose labels include ``labels``; None when there is none."""
    wanted = dict(labels or {})
    return next((s.value for s in scrape(url, timeout_s) if s.name == name and wanted.items() <= s.labels.items()), None)
