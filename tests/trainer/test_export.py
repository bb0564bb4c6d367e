"""``python -m trainer pairs export`` on a real SQLite log: files TRL loads and trains on."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from gateway.store.sql import SqlStore
from tests.cli import assert_one_line_error
from tests.trainer.test_cli import run_cli
from toyworld.world import prompt_sets
from trainer.__main__ import main
from trainer.export import ExportError, parse_time

ANSWERS = ("The answer is {a}.", "Sure! It is {a}, happy to help.", "Ugh, {b}. Whatever.", "{a}")


@pytest.fixture
def log_db(tmp_path: Path) -> str:
    """A log with 12 best-of-4 completions (3 thumbed) and one old completion outside the window."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    store = SqlStore(url)
    store.migrate()
    now = time.time()
    records: list[CompletionRecord | FeedbackRecord] = []
    for i, prompt in enumerate(t.prompt for t in prompt_sets(seed=0, n_train=0, n_heldout=13).heldout):
        cands = [
            CandidateRecord(
                k, text.format(a=i, b=i + 1), list(range(3 + k)), "stop", reward=1.0 - k * 0.4 + i * 0.01, chosen=k == 0
            )
            for k, text in enumerate(ANSWERS)
        ]
        created = now - 30 * 86400 if i == 12 else now - 60 + i
        records.append(
            CompletionRecord(
                f"chatcmpl-{i:02d}",
                created,
                "k",
                [{"role": "user", "content": prompt}],
                {},
                "base",
                "rm-base",
                4,
                9,
                12,
                {},
                cands,
            )
        )
    records += [FeedbackRecord(f"chatcmpl-{i:02d}", "k", "down" if i == 0 else "up", None, now) for i in (0, 1, 2)]
    store.write(records)
    store.close()
    return url


def test_times_parse_in_every_documented_form() -> None:
    now = 1_800_000_000.0
    assert parse_time("7d", now) == now - 7 * 86400
    assert parse_time("30m", now) == now - 1800
    assert parse_time("1700000000", now) == 1_700_000_000
    assert parse_time("2026-11-20T08:00Z", now) == parse_time("2026-11-20T08:00:00+00:00", now) == 1_795_161_600
    with pytest.raises(ExportError, match="cannot read time"):
        parse_time("last tuesday", now)


def test_export_writes_trl_formats_that_load_with_datasets(
    log_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "export", "--db", log_db, "--since", "7d", "--out", str(out)]) == 0
    assert "12 completions -> 12 pairs (3 decided by thumbs)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first = next(r for r in rows if r["completion_id"] == "chatcmpl-00")  # thumbed down: served answer rejected
    assert (first["chosen"][0]["content"], first["rejected"][0]["content"]) == (
        "Sure! It is 0, happy to help.",
        "The answer is 0.",
    )
    assert (tmp_path / "pairs.kto.jsonl").read_text() == ""  # every thumb found a pair

    assert main(["pairs", "export", "--db", log_db, "--format", "parquet", "--out", str(tmp_path / "pairs.parquet")]) == 0
    from_jsonl = datasets.load_dataset("json", data_files=str(out), split="train")
    from_parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train")
    assert len(from_parquet) == 13  # no --since: the old completion too
    assert from_jsonl[0] == from_parquet.filter(lambda r: r["completion_id"] == from_jsonl[0]["completion_id"])[0]


@pytest.mark.slow
def test_exported_pairs_train_one_dpo_step(log_db: str, tmp_path: Path, test_models: Path) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "export", "--db", log_db, "--out", str(out)]) == 0
    dataset = datasets.load_dataset("json", data_files=str(out), split="train")
    config = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(test_models / "policy"),
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(test_models / "policy"),
    )
    result = trainer.train()
    assert result.global_step == 1
    assert math.isfinite(result.training_loss)
    assert abs(result.training_loss - math.log(2)) < 0.05  # first step: policy == reference, loss = -log sigmoid(0)


def test_bad_input_is_one_line(log_db: str, tmp_path: Path) -> None:
    out = str(tmp_path / "p.jsonl")
    assert_one_line_error(run_cli("pairs", "export", "--db", log_db, "--since", "someday", "--out", out), "cannot read time")
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert_one_line_error(run_cli("pairs", "export", "--db", missing, "--out", out), "no log database")
    assert_one_line_error(run_cli("pairs", "export", "--db", log_db, "--out", "/proc/x/p.jsonl"), "cannot write")
    assert_one_line_error(run_cli("pairs", "export", "--db", log_db, "--out", out, "--format", "csv"), "invalid choice")


def test_the_reward_model_filter_keeps_thumbed_completions_only_when_thumbs_decide(tmp_path: Path) -> None:
    from trainer.export import window

    store = SqlStore(f"sqlite:///{tmp_path / 'log.db'}")
    store.migrate()
    now = time.time()
    cands = [CandidateRecord(0, "4.", [1], "stop", reward=1.0, chosen=True), CandidateRecord(1, "5.", [2], "stop", reward=0.0)]
    old = [
        CompletionRecord(f"c{i}", now + i, "k", [{"role": "user", "content": "2+2?"}], {}, "base", "rm-old", 2, 3, 2, {}, cands)
        for i in range(2)
    ]
    store.write([*old, FeedbackRecord("c1", "k", "down", None, now)])
    assert [r.id for r, _ in window(store, 0.0, None, rm_version="rm-new")] == ["c1"]
    assert [r.id for r, _ in window(store, 0.0, None, rm_version="rm-new", keep_thumbed=False)] == []
    assert [r.id for r, _ in window(store, 0.0, None, rm_version="rm-old")] == ["c0", "c1"]
    store.close()


def test_pick_narrows_rows_already_read_as_a_window_would() -> None:
    """One read of the log serves several windows: ``pick`` applies ``window``'s filters and a later start in memory."""
    from trainer.export import pick

    cands = [CandidateRecord(0, "4.", [1], "stop", reward=1.0, chosen=True)]

    def record(cid: str, created: float, policy: str, rm: str, status: str = "ok") -> CompletionRecord:
        return CompletionRecord(cid, created, "k", [], {}, policy, rm, 1, 3, 2, {}, cands, status=status)  # type: ignore[arg-type]

    thumb = FeedbackRecord("c3", "k", "up", None, 0.0)
    rows = [(record("c0", 10, "v1", "rm1"), None), (record("c1", 20, "v2", "rm1"), None),
            (record("c2", 30, "v2", "rm2", "cancelled"), None), (record("c3", 40, "v2", "rm2"), thumb)]  # fmt: skip
    assert [r.id for r, _ in pick(rows)] == ["c0", "c1", "c3"]
    assert [r.id for r, _ in pick(rows, since=20)] == ["c1", "c3"]
    assert [r.id for r, _ in pick(rows, policy_version="v2")] == ["c1", "c3"]
    assert [r.id for r, _ in pick(rows, rm_version="rm1")] == ["c0", "c1", "c3"]  # c3 is thumbed
    assert [r.id for r, _ in pick(rows, rm_version="rm1", keep_thumbed=False)] == ["c0", "c1"]


def test_a_cancelled_completion_is_logged_but_never_trained_on(tmp_path: Path) -> None:
    from trainer.export import window

    store = SqlStore(f"sqlite:///{tmp_path / 'log.db'}")
    store.migrate()
    now = time.time()
    cands = [CandidateRecord(0, "4.", [1], "stop", reward=1.0, chosen=True), CandidateRecord(1, "5.", [2], "stop", reward=0.0)]
    done = CompletionRecord("c0", now, "k", [{"role": "user", "content": "2+2?"}], {}, "base", "rm", 2, 3, 2, {}, cands)
    left = CompletionRecord("c1", now, "k", [{"role": "user", "content": "2+2?"}], {}, "base", "rm", 2, 3, 2, {}, cands,
                            status="cancelled")  # fmt: skip
    store.write([done, left, FeedbackRecord("c1", "k", "up", None, now)])
    assert {r.id: r.status for r in store.read_completions()} == {"c0": "ok", "c1": "cancelled"}
    assert [r.id for r, _ in window(store, 0.0, None)] == ["c0"]
    store.close()
