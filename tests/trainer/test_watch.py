"""The reward-hacking watch (``trainer.watch``): each check on constructed versions, its false-alarm rate on equal versions
by simulation, and a round that pauses while it fires until an admin clears it."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from gateway.store.sql import SqlStore
from trainer.__main__ import main
from trainer.settings import WatchSettings
from trainer.watch import CHECKS, VersionStats, auc, checks, stats
from versioning import watch as state
from versioning.registry import Registry

SETTINGS = WatchSettings()


def version(name: str, n: int = 300, *, length: float = 10.0, reward: float = 0.5, up_rate: float = 0.7, thumbs: int = 60,
            agree: bool = True, refusals: int = 0, seed: int = 0) -> VersionStats:  # fmt: skip
    """``n`` answers of about ``length`` tokens and ``reward``; ``thumbs`` of them thumbed at ``up_rate``, with rewards
    that order the thumbs (``agree``) or not."""
    rng = random.Random(seed)
    v = VersionStats(name, answers=n, refusals=refusals)
    v.lengths = [max(1.0, rng.gauss(length, 3.0)) for _ in range(n)]
    v.rewards = {"rm": [rng.gauss(reward, 0.3) for _ in range(n)]}
    ups = [rng.random() < up_rate for _ in range(thumbs)]
    v.ups, v.downs = sum(ups), thumbs - sum(ups)
    shift = 0.3 if agree else 0.0
    v.thumbed = {
        "rm": ([rng.gauss(reward + shift, 0.3) for _ in range(v.ups)], [rng.gauss(reward - shift, 0.3) for _ in range(v.downs)])
    }
    return v


def fired(current: VersionStats, parent: VersionStats, kl: tuple[float | None, float | None] = (None, None)) -> set[str]:
    return {c.name for c in checks(current, parent, "rm", SETTINGS, kl) if c.fired}


def test_auc_by_hand() -> None:
    a, se = auc([3.0, 2.0], [1.0, 2.0])
    assert a == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert se > 0
    assert auc([1.0], [2.0])[0] == 0.0


def test_each_check_fires_on_its_own_evidence() -> None:
    parent = version("v0001", seed=1)
    assert fired(version("v0002", seed=2), parent) == set()
    assert fired(version("v0002", length=16.0, seed=2), parent) == {"length"}
    assert fired(version("v0002", refusals=60, seed=2), parent) == {"refusals"}
    assert fired(version("v0002", agree=False, seed=2, thumbs=200), parent) == {"agreement"}
    gamed = version("v0002", reward=0.8, up_rate=0.3, thumbs=200, seed=2)
    assert "reward_vs_thumbs" in fired(gamed, version("v0001", thumbs=200, seed=1))
    assert fired(version("v0002", seed=2), parent, kl=(12.0, 0.5)) == set()  # no bound configured
    bounded = checks(version("v0002", seed=2), parent, "rm", WatchSettings(max_kl=8.0), (12.0, 0.5))
    assert {c.name for c in bounded if c.fired} == {"kl"}


def test_a_small_length_rise_or_too_little_data_does_not_fire() -> None:
    parent = version("v0001", seed=1)
    assert fired(version("v0002", length=12.5, seed=2), parent) == set()  # 1.25x: within the limit of 1.3x
    assert fired(version("v0002", n=20, length=30.0, seed=2), version("v0001", n=20, seed=1)) == set()  # min_answers
    reasons = {c.name: c.detail for c in checks(version("v0002", n=20, seed=2), version("v0001", n=20), "rm", SETTINGS)}
    assert "too little data" in reasons["length"]


def test_equal_versions_raise_a_false_alarm_in_at_most_alpha_of_runs() -> None:
    """The old report fired on a 0.01-nat move; the watch needs evidence: 400 pairs of equal versions, at most 5% fire
    (Bonferroni over the checks keeps the family-wise rate at or under alpha)."""
    runs = 400
    alarms = sum(bool(fired(version("v2", seed=2 * k + 1), version("v1", seed=2 * k))) for k in range(runs))
    assert alarms <= runs * SETTINGS.alpha
    assert set(CHECKS) == {"reward_vs_thumbs", "agreement", "length", "refusals", "kl"}


def test_stats_read_what_a_version_served() -> None:
    def record(cid: str, version: str, text: str, reward: float) -> CompletionRecord:
        cands = [CandidateRecord(0, text, [1, 2, 3], "stop", reward, chosen=True), CandidateRecord(1, "x", [1], "stop", 0.0)]
        return CompletionRecord(cid, 0.0, "k", [], {}, version, "rm", 2, 1, 3, {}, cands)

    labelled = [
        (record("a", "v1", "Sure, 5.", 1.0), FeedbackRecord("a", "k", "up", None, 0.0)),
        (record("b", "v1", "I can't help with that.", 0.2), FeedbackRecord("b", "k", "down", None, 0.0)),
        (record("c", "v2", "Other version.", 0.5), None),
    ]
    v = stats("v1", labelled)
    assert (v.answers, v.refusals, v.ups, v.downs) == (2, 1, 1, 1)
    assert v.lengths == [2.0, 2.0]  # per request, the mean of its candidates' lengths (3 and 1 tokens)
    assert v.rewards == {"rm": [1.0, 0.2]}
    assert v.thumbed == {"rm": ([1.0], [0.2])}


@pytest.fixture
def grown(tmp_path: Path) -> Path:
    """A deployment whose current version v0001 serves answers twice as long as the base did."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = SqlStore(url)
    store.migrate()
    rng = random.Random(0)
    records: list[Any] = []
    now = time.time()
    for i in range(120):
        for label, words in (("base", 6), ("v0001", 14)):
            text = " ".join(["word"] * (words + rng.randint(-2, 2)))
            cands = [CandidateRecord(0, text, list(range(len(text.split()))), "stop", rng.random(), chosen=True),
                     CandidateRecord(1, f"{label} {i}", [1], "stop", -1.0)]  # fmt: skip
            records.append(CompletionRecord(f"{label}-{i}", now - 60, "k", [{"role": "user", "content": f"q{i}"}], {}, label,
                                            "rm-base", 2, 1, 1, {}, cands))  # fmt: skip
    store.write(records)
    store.close()
    registry = Registry(tmp_path / "registry")

    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"w")

    registry.set_pointer("policy", "current", registry.publish("policy", write, format="lora", parent=None).version)
    config = {"store": {"url": url, "data_dir": str(tmp_path / "data")},
              "trainer": {"registry_dir": str(registry.root), "base_policy": str(tmp_path), "min_pairs": 1000}}  # fmt: skip
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_round_pauses_while_the_watch_fires_and_resumes_once_an_admin_clears_it(grown: Path, capsys: Any) -> None:
    assert main(["run", "--config", str(grown), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "round skipped: the reward-hacking watch is firing about v0001" in out
    assert "length: samples" in out
    root = grown.parent / "registry"
    assert state.read(root).firing
    assert "trainer_watch_firing 1.0" in (root / "metrics" / "watch.prom").read_text()
    assert main(["watch", "--config", str(grown)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["firing"]
    assert shown["parent"] == "base"
    assert main(["watch", "clear", "--config", str(grown), "--reason", "longer answers are wanted"]) == 0
    capsys.readouterr()
    cleared = state.read(root)
    assert (cleared.firing, cleared.cleared_for, cleared.cleared_by) == (False, "v0001", "admin")
    assert "trainer_watch_firing 0.0" in (root / "metrics" / "watch.prom").read_text()
    # the clear holds for v0001: the next round does not fire on the same evidence; it goes on (and skips on min_pairs)
    assert main(["run", "--config", str(grown), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "watch" not in out
    assert "trainer.min_pairs is 1000" in out
    # observe only: it fires and records, and the round goes on
    config = yaml.safe_load(grown.read_text())
    config["trainer"]["watch"] = {"pause": False}
    grown.write_text(yaml.safe_dump(config))
    state.write(root, state.WatchState())
    assert main(["run", "--config", str(grown), "--quiet"]) == 0
    assert "trainer.min_pairs is 1000" in capsys.readouterr().out
    assert state.read(root).firing
    # disabled: not checked at all
    config = yaml.safe_load(grown.read_text())
    config["trainer"]["watch"] = {"enabled": False}
    grown.write_text(yaml.safe_dump(config))
    state.write(root, state.WatchState())
    assert main(["run", "--config", str(grown), "--quiet"]) == 0
    assert "watch" not in capsys.readouterr().out
    assert not state.read(root).firing


def test_the_watch_and_the_round_share_one_read_of_the_log(grown: Path, capsys: Any, monkeypatch: Any) -> None:
    """The watch checks v0001 against base and the round then builds its data: both from one pass over the log."""
    reads: list[tuple[float, float | None]] = []
    real = SqlStore.read_labelled

    def counted(self: SqlStore, since: float = 0.0, until: float | None = None, **kw: Any) -> Any:
        reads.append((since, until))
        return real(self, since, until, **kw)

    monkeypatch.setattr(SqlStore, "read_labelled", counted)
    config = yaml.safe_load(grown.read_text())
    config["trainer"]["watch"] = {"pause": False}
    grown.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(grown), "--quiet"]) == 0
    assert "trainer.min_pairs is 1000" in capsys.readouterr().out  # the round went on to count its pairs
    assert state.read(grown.parent / "registry").firing  # and the watch judged on the same rows
    assert len(reads) == 1
    # while the watch stays firing and pauses training, the round reads nothing
    config["trainer"]["watch"] = {"pause": True}
    grown.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(grown), "--quiet"]) == 0
    assert "the reward-hacking watch is firing" in capsys.readouterr().out
    assert len(reads) == 1
