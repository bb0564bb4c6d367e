"""Thumbs that accumulate over versions (``trainer.history``): which earlier thumbs a round reads, how much each counts,
and a round reading them from a real log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.store.records import CompletionRecord, FeedbackRecord
from gateway.store.sql import SqlStore
from trainer.__main__ import main
from trainer.history import Window, number, repeats, thumbs_by_version, weigh
from trainer.pairs import weighted
from versioning.registry import Registry


def completion(version: str, created: float = 100.0, cid: str = "c") -> CompletionRecord:
    return CompletionRecord(cid, created, "k", [{"role": "user", "content": "q"}], {}, version, "rm-base", 2, 1, 1, {})


def thumb(cid: str = "c") -> FeedbackRecord:
    return FeedbackRecord(cid, "k", "up", None, 100.0)


def test_version_numbers_and_ages() -> None:
    assert number("base", "base") == 0
    assert number("v0012", "base") == 12
    assert number("custom", "base") is None
    window = Window("v0003", "base", since=50.0, versions=2, thumbs_since=0.0, decay=0.5)
    assert [window.age(v) for v in ("v0003", "v0002", "v0001", "base", "v0004", "custom")] == [0, 1, 2, 3, 0, None]
    assert [window.weight(v) for v in ("v0003", "v0002", "v0001", "base", "custom")] == [1.0, 0.5, 0.25, 0.125, 0.0]


def test_the_window_keeps_the_current_versions_completions_and_recent_versions_thumbed_ones() -> None:
    window = Window("v0003", "base", since=50.0, versions=2, thumbs_since=10.0, decay=0.5)
    assert window.keeps(completion("v0003"), None)
    assert not window.keeps(completion("v0003", created=40.0), None)  # older than the window's staleness bound
    assert not window.keeps(completion("v0002"), None)  # an earlier version's unthumbed completion: its rewards are not ours
    assert window.keeps(completion("v0002"), thumb())
    assert window.keeps(completion("v0001"), thumb())
    assert window.keeps(completion("v0004"), thumb())  # a refused canary newer than current
    assert not window.keeps(completion("base"), thumb())  # three versions back, past versions=2
    assert not window.keeps(completion("v0002", created=5.0), thumb())  # past the thumbs' own staleness bound
    assert not window.keeps(completion("custom"), thumb())
    assert not Window("v0003", "base", since=50.0).keeps(completion("v0002"), thumb())  # versions=0: current only
    labelled = [(completion("v0003"), thumb()), (completion("v0002"), thumb()), (completion("v0002"), None)]
    assert thumbs_by_version(labelled) == {"v0003": 1, "v0002": 1}


def test_repeats_round_a_weight_by_a_stable_draw_with_the_right_mean() -> None:
    assert repeats(2.0, "a") == 2
    assert repeats(0.0, "a") == 0
    assert repeats(0.25, "same-key") == repeats(0.25, "same-key")
    drawn = [repeats(1.25, f"c{i}") for i in range(4000)]
    assert set(drawn) == {1, 2}
    assert sum(drawn) / len(drawn) == pytest.approx(1.25, abs=0.03)  # a binomial mean: 4000 draws, sd 0.007


def test_weighted_repeats_thumb_rows_by_thumb_weight_and_age() -> None:
    window = Window("v0002", "base", since=0.0, versions=1, decay=0.5)
    rows: list[dict[str, Any]] = [
        {"source": "thumb", "thumb": "up", "policy_version": "v0002", "completion_id": "a"},
        {"source": "thumb", "thumb": "down", "policy_version": "v0001", "completion_id": "b"},
        {"source": "reward_model", "thumb": None, "policy_version": "v0002", "completion_id": "c"},
    ]
    weighed = weigh(rows, window)
    assert [r["weight"] for r in weighed] == [1.0, 0.5, 1.0]
    counted = [r["completion_id"] for r in weighted(weighed, 4)]
    assert counted == ["a"] * 4 + ["b"] * 2 + ["c"]


@pytest.fixture
def later_round(tmp_path: Path) -> tuple[Path, SqlStore]:
    """A deployment whose current version is v0002; its log holds thumbed and unthumbed completions of base and
    v0001 (four each) and none of v0002."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = SqlStore(url)
    store.migrate()
    from gateway.store.records import CandidateRecord

    now = time.time()
    records: list[Any] = []
    for version in ("base", "v0001"):
        for i in range(8):
            cid = f"{version}-{i}"
            cands = [CandidateRecord(0, f"right {version} {i}", [1], "stop", 1.0, chosen=True),
                     CandidateRecord(1, f"wrong {version} {i}", [2], "stop", 0.0)]  # fmt: skip
            records.append(CompletionRecord(cid, now - 60, "k", [{"role": "user", "content": f"q{i}"}], {}, version, "rm-base",
                                            2, 1, 1, {}, cands))  # fmt: skip
            if i < 4:
                records.append(FeedbackRecord(cid, "k", "up", None, now - 30))
    store.write(records)
    registry = Registry(tmp_path / "registry")

    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"w")

    for _ in range(2):
        version = registry.publish("policy", write, format="lora", parent=None).version
    registry.set_pointer("policy", "current", version)
    config = {
        "store": {"url": url, "data_dir": str(tmp_path / "data")},
        "trainer": {"registry_dir": str(registry.root), "base_policy": str(tmp_path), "min_pairs": 100},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "config.json").write_text("{}")  # the round checks that a base policy is there before reading
    return path, store


def test_a_round_reads_earlier_versions_thumbs_only_when_told(later_round: tuple[Path, SqlStore], capsys: Any) -> None:
    path, store = later_round
    assert main(["run", "--config", str(path), "--quiet"]) == 0
    assert "0 pairs from 0 completions" in capsys.readouterr().out  # v0002 served nothing yet
    config = yaml.safe_load(path.read_text())
    config["trainer"]["history"] = {"versions": 1}
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--quiet"]) == 0
    assert "4 pairs from 4 completions" in capsys.readouterr().out  # v0001's thumbed four; base is two versions back
    config["trainer"]["history"] = {"versions": 2}
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--quiet"]) == 0
    assert "8 pairs from 8 completions" in capsys.readouterr().out
    store.close()
