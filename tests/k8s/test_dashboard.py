"""The Grafana dashboard (k8s/base/monitoring/bon-gateway.json) against the metrics the gateway really exposes.

Every metric name and label a query uses must be in the gateway's own exposition (a
``Metrics`` registry with one observation on each metric, rendered and parsed the way
Prometheus reads it), and the dashboard must keep a panel for each metric family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.exposition import METRIC, VLLM_METRIC, Sample, exposition

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "base" / "monitoring" / "bon-gateway.json"
SELECTOR = re.compile(r"(bon_[a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*(?:,|$)')
GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)\s*(\()?")
RANGE_FUNCTION = re.compile(r"\b(?:rate|irate|increase)\s*\(")
QUANTILE = re.compile(r"\bhistogram_quantile\s*\(\s*([0-9.]+)\s*,")
LABEL_VALUES = re.compile(r"^label_values\(\s*(bon_[a-z_]+)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$")
NO_TARGETS = {"row", "text"}

# what the dashboard must show: the sample names a panel needs for it
REQUIRED: dict[str, set[str]] = {
    "request rate": {"bon_requests_total"},
    "request latency": {"bon_request_latency_seconds_bucket"},
    "stage latency": {"bon_stage_latency_seconds_bucket"},
    "candidates per request": {"bon_candidates_per_request_sum", "bon_candidates_per_request_count"},
    "chosen reward": {"bon_chosen_reward_bucket", "bon_chosen_reward_stats_sum", "bon_chosen_reward_stats_count"},
    "reward margin": {"bon_reward_margin_bucket", "bon_reward_margin_sum", "bon_reward_margin_count"},
    "chosen length": {"bon_chosen_length_tokens_bucket"},
    "feedback": {"bon_feedback_total"},
    "errors": {"bon_errors_total"},
    "requests in flight": {"bon_requests_in_flight"},
    "log written": {"bon_log_records_written_total"},
    "log spooled": {"bon_log_records_spooled_total"},
    "log write errors": {"bon_log_write_errors_total"},
    "log queue depth": {"bon_log_queue_depth"},
    "log spool pending": {"bon_log_spool_pending"},
    "policy version info": {"bon_policy_version_info"},
    "canary decisions": {"bon_canary_decisions_total"},
    "canary answers": {"bon_canary_answers"},
    "canary thumbs and the sample needed": {"bon_canary_thumbs", "bon_canary_needed"},
    "reward-hacking watch": {"bon_watch_firing"},
    "canary reward difference": {"bon_canary_reward_diff"},
    "KL to the starting policy": {"bon_policy_kl_nats", "bon_policy_kl_stderr_nats"},
}
# histogram quantiles the panels must plot, by bucket series
REQUIRED_QUANTILES: dict[str, set[float]] = {
    "bon_request_latency_seconds_bucket": {0.5, 0.95, 0.99},
    "bon_stage_latency_seconds_bucket": {0.5, 0.99},
    "bon_chosen_reward_bucket": {0.5, 0.9},
}


@pytest.fixture(scope="module")
def exposed() -> dict[str, Sample]:
    return exposition()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    """The queries on the gateway's metrics; vLLM's own (``vllm:``) are checked against a real vLLM in
    tests/e2e/test_models_in_vllm.py."""
    return [e for e in all_exprs(dashboard) if not VLLM_METRIC.search(e)]


def all_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]


def test_every_query_is_on_the_gateway_s_metrics_or_vllm_s(dashboard: dict[str, Any]) -> None:
    for expr in all_exprs(dashboard):
        assert bool(metrics_in(expr)) != bool(VLLM_METRIC.search(expr)), f"one source per query: {expr!r}"
    assert len(panel_exprs(dashboard)) < len(all_exprs(dashboard)), "vLLM's own panels are missing"


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's PromQL (Grafana stores it as a string or, since 10, as an object)."""
    query = variable["query"]
    text: str = query["query"] if isinstance(query, dict) else query
    return text


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    return [variable_query(v) for v in dashboard["templating"]["list"] if v["type"] == "query"]


def group(expr: str, start: int) -> str:
    """The text inside the parentheses opened just before ``start``."""
    depth, i = 1, start
    while depth:
        assert i < len(expr), f"unbalanced parentheses in {expr!r}"
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        i += 1
    return expr[start : i - 1]


def metrics_in(text: str) -> set[str]:
    return set(METRIC.findall(text))


def sample(exposed: dict[str, Sample], name: str, expr: str) -> Sample:
    assert name in exposed, f"{name} (in {expr!r}) is not exposed by the gateway"
    return exposed[name]


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] == 39
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    graphs = [p for p in panels if p["type"] not in NO_TARGETS]
    assert graphs
    for panel in panels:
        assert panel["title"], panel
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert min(grid["h"], grid["w"]) > 0, panel["title"]
        assert min(grid["x"], grid["y"]) >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
    for panel in graphs:
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat", "table"}, title
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel["fieldConfig"]["defaults"]["unit"], f"{title} has no unit"
        targets = panel["targets"]
        assert targets, f"{title} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), f"{title} repeats a refId"
        for target in targets:
            assert target["expr"].strip(), title
            assert target["datasource"]["uid"] == "${datasource}", title


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]


def test_template_variables(dashboard: dict[str, Any], exposed: dict[str, Sample]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    policy = variables["policy_version"]
    assert policy["datasource"]["uid"] == "${datasource}"
    query = variable_query(policy)
    match = LABEL_VALUES.match(query)
    assert match, f"policy_version is not a label_values() query: {query!r}"
    metric, label = match.groups()
    assert metric in exposed, f"{metric} is not exposed"
    assert label in exposed[metric].labels, f"{metric} has no label {label}"
    used = "\n".join(panel_exprs(dashboard))
    for name in variables:
        if name != "datasource":
            assert f"${name}" in used, f"no panel uses ${name}"


def test_every_metric_is_exposed(dashboard: dict[str, Any], exposed: dict[str, Sample]) -> None:
    for expr in panel_exprs(dashboard) + variable_queries(dashboard):
        assert metrics_in(expr), f"no bon_ metric in {expr!r}"
        for name in metrics_in(expr):
            assert not name.endswith("_created"), f"{name} is a creation timestamp, not a value"
            sample(exposed, name, expr)


def test_every_label_exists_on_its_metric(dashboard: dict[str, Any], exposed: dict[str, Sample]) -> None:
    for expr in panel_exprs(dashboard):
        assert not re.search(r"\b(on|ignoring|group_left|group_right)\s*\(", expr), f"vector matching is not checked: {expr!r}"
        for selector in SELECTOR.finditer(expr):
            name, body = selector.groups()
            matchers = list(MATCHER.finditer(body))
            assert "".join(m.group(0) for m in matchers) == body, f"unparsed label matcher in {selector.group(0)!r}"
            for matcher in matchers:
                label = matcher.group(1)
                assert label in sample(exposed, name, expr).labels, f"{name} has no label {label} (in {expr!r})"
        for grouping in GROUPING.finditer(expr):
            assert grouping.group(3), f"write aggregations as sum by (...) (...), not postfix: {expr!r}"
            labels = [label.strip() for label in grouping.group(2).split(",") if label.strip()]
            inner = metrics_in(group(expr, grouping.end()))
            assert inner, f"nothing aggregated by {grouping.group(0)!r} in {expr!r}"
            for name in inner:
                for label in labels:
                    assert label in sample(exposed, name, expr).labels, f"{name} has no label {label} (in {expr!r})"


def test_rates_are_of_counters_and_quantiles_of_buckets(dashboard: dict[str, Any], exposed: dict[str, Sample]) -> None:
    for expr in panel_exprs(dashboard):
        for call in RANGE_FUNCTION.finditer(expr):
            for name in metrics_in(group(expr, call.end())):
                assert sample(exposed, name, expr).kind != "gauge", f"rate of the gauge {name} in {expr!r}"
        for name in metrics_in(expr):
            if name.endswith("_bucket"):
                assert "histogram_quantile" in expr, f"{name} outside histogram_quantile in {expr!r}"
        for call in QUANTILE.finditer(expr):
            assert 0 < float(call.group(1)) < 1, expr
            inner = group(expr, expr.index("(", call.start()) + 1)
            assert all(name.endswith("_bucket") for name in metrics_in(inner)), f"histogram_quantile of no buckets: {expr!r}"
            by = [g.group(2) for g in GROUPING.finditer(inner)]
            assert by, f"histogram_quantile over no sum by (le, ...): {expr!r}"
            assert all("le" in [label.strip() for label in b.split(",")] for b in by), f"quantile loses le: {expr!r}"


@pytest.mark.parametrize("feature", sorted(REQUIRED))
def test_dashboard_covers(dashboard: dict[str, Any], feature: str) -> None:
    used = {name for expr in panel_exprs(dashboard) for name in metrics_in(expr)}
    missing = REQUIRED[feature] - used
    assert not missing, f"no panel for {feature}: {sorted(missing)} unused"


def test_every_gateway_metric_has_a_panel(dashboard: dict[str, Any], exposed: dict[str, Sample]) -> None:
    used = {exposed[name].family for expr in panel_exprs(dashboard) for name in metrics_in(expr) if name in exposed}
    families = {sample.family for sample in exposed.values()}
    assert families - used == set(), "metrics in gateway/metrics.py with no panel"


@pytest.mark.parametrize("bucket", sorted(REQUIRED_QUANTILES))
def test_quantiles(dashboard: dict[str, Any], bucket: str) -> None:
    plotted = {float(q) for expr in panel_exprs(dashboard) if bucket in metrics_in(expr) for q in QUANTILE.findall(expr)}
    assert REQUIRED_QUANTILES[bucket] <= plotted, f"{bucket}: quantiles {sorted(plotted)}"


def test_thumbs_up_rate_per_policy_version(dashboard: dict[str, Any]) -> None:
    ratios = [
        expr
        for expr in panel_exprs(dashboard)
        if re.search(r'bon_feedback_total\{[^}]*thumb="up"', expr)
        and "/" in expr
        and re.search(r"\bby\s*\(\s*policy_version\s*\)", expr)
    ]
    assert ratios, "no thumbs-up share (up / (up + down)) by policy_version"
