"""Several workers: slots, spools no worker holds, the shared id secret, each worker's share of the caps, and
Prometheus metrics written by separate processes and merged in one exposition."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from gateway.ids import load_or_create_secret
from gateway.metrics import Metrics
from gateway.settings import ConfigError, GatewaySettings, load
from gateway.store.records import FeedbackRecord
from gateway.store.spool import Spool
from gateway.workers import adopt_spools, claim_slot

BACKENDS = [{"url": "http://127.0.0.1:9", "model": "policy"}]


def test_each_worker_claims_its_own_slot_and_a_replacement_gets_the_freed_one(tmp_path: Path) -> None:
    first, second = claim_slot(tmp_path), claim_slot(tmp_path)
    assert (first.index, second.index) == (0, 1)
    assert first.owner
    assert not second.owner
    assert first.spool_dir(tmp_path) == tmp_path / "spool"  # a single gateway's spool, as before workers
    assert second.spool_dir(tmp_path) == tmp_path / "spool-1"
    second.release()
    assert claim_slot(tmp_path).index == 1


def test_slot_zero_adopts_the_spools_of_slots_nobody_holds(tmp_path: Path) -> None:
    slots = tmp_path / "workers"
    held = claim_slot(slots)
    live = claim_slot(slots)  # slot 1: a running worker's spool stays its own
    for index in (1, 2):
        Spool(tmp_path / f"spool-{index}").append([FeedbackRecord(f"c{index}", "k", "up", None, 1.0)])
    orphan = Spool(tmp_path / "spool-2")
    orphan.append([FeedbackRecord("c3", "k", "down", None, 2.0)])
    orphan.replay_files()  # one frozen replay file and a fresh live one
    orphan.append([FeedbackRecord("c4", "k", "up", None, 3.0)])

    assert adopt_spools(tmp_path, slots, held.spool_dir(tmp_path)) == 2
    adopted = Spool(tmp_path / "spool")
    assert adopted.pending == 3
    ids = sorted(r.completion_id for p in adopted.replay_files() for r in adopted.read(p) if isinstance(r, FeedbackRecord))
    assert ids == ["c2", "c3", "c4"]
    assert Spool(tmp_path / "spool-1").pending == 1
    live.release()


def test_workers_starting_together_create_one_id_secret(tmp_path: Path) -> None:
    path = tmp_path / "data" / "id_secret"
    barrier = threading.Barrier(8)
    got: list[bytes] = []

    def start() -> None:
        barrier.wait()
        got.append(load_or_create_secret(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    assert len(set(got)) == 1
    assert got[0] == bytes.fromhex(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["id_secret"]  # no temporary file left


def test_each_worker_enforces_its_share_of_the_caps_and_rates() -> None:
    s = GatewaySettings.model_validate({
        "backends": BACKENDS, "workers": 3, "quota_replicas": 2, "swap": {"full": "refuse"},
        "limits": {"max_in_flight": 256, "degrade_above": 10}, "feedback": {"per_minute": 60, "burst": 20},
    })  # fmt: skip
    share = s.per_worker()
    assert (share.limits.max_in_flight, share.limits.degrade_above) == (86, 4)  # rounded up
    assert (share.feedback.per_minute, share.feedback.burst) == (20, 7)
    assert share.quota_replicas == 6
    assert share.workers == 3
    one = GatewaySettings.model_validate({"backends": BACKENDS})
    assert one.per_worker() is one


def test_several_workers_refuse_blue_green_full_swaps(tmp_path: Path) -> None:
    config = tmp_path / "g.yaml"
    config.write_text("workers: 2\nbackends: [{url: 'http://127.0.0.1:9', model: policy}]\n")
    with pytest.raises(ConfigError, match=r"workers: 2 needs swap.full: refuse"):
        load(config)
    assert load(config, swap={"full": "refuse"}).workers == 2
    assert load(config, swap={"enabled": False}).workers == 2


WORKER = textwrap.dedent("""
    import sys
    from gateway.metrics import Metrics
    m = Metrics()
    assert m.multiprocess is not None
    for _ in range(int(sys.argv[1])):
        m.requests.labels("200").inc()
    m.in_flight.inc(int(sys.argv[1]))
    m.set_versions(policy="v1", reward_model="rm")
    m.set_versions(policy=sys.argv[2])
    queued = int(sys.argv[1]) * 10
    m.watch_log(lambda: queued, lambda: 0)
    m.refresh()
    print("ok", flush=True)
    sys.stdin.read()  # alive until the test closes stdin
""")


def _exposed(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_of_separate_worker_processes_merge_in_one_exposition(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n), version], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        for n, version in ((3, "v2"), (5, "v1"))
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ok"
        reader = Metrics(multiprocess=str(tmp_path))  # any worker's /metrics: every process's files
        seen = _exposed(reader)
        assert seen[("bon_requests_total", (("status", "200"),))] == 8  # counters summed
        assert seen[("bon_requests_in_flight", ())] == 8  # live sum
        assert seen[("bon_log_queue_depth", ())] == 80  # the watched values, written by refresh
        # one worker moved on to v2, the other is back on v1: both served now; v1 is not dropped by the mover
        assert seen[("bon_policy_version_info", (("policy", "v2"), ("reward_model", "rm")))] == 1
        assert seen[("bon_policy_version_info", (("policy", "v1"), ("reward_model", "rm")))] == 1
    finally:
        for w in workers:
            assert w.stdin is not None
            assert w.stdout is not None
            w.stdin.close()
            w.wait(30)
            w.stdout.close()
    for w in workers:
        assert w.returncode == 0
        mark_process_dead(w.pid, str(tmp_path))  # type: ignore[no-untyped-call]  # what the parent does for a worker that exited
    seen = _exposed(Metrics(multiprocess=str(tmp_path)))
    assert seen[("bon_requests_total", (("status", "200"),))] == 8  # a counter outlives its worker
    assert seen.get(("bon_requests_in_flight", ()), 0) == 0  # live gauges do not
