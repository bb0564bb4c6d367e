"""Data hygiene: redaction before text is stored, no prompt or secret in the application log, retention on a schedule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.redact import Redactor
from gateway.store.records import CompletionRecord, FeedbackRecord
from tests.gateway.conftest import ANSWERS
from tests.gateway.fakes import FakeGenerator, FakeStore

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "mail me at [EMAIL] please"),
        ("call +44 20 7946 0958 or 020-7946-0958", "call [PHONE] or [PHONE]"),
        ("card 4111 1111 1111 1111, exp 12/27", "card [CARD], exp 12/27"),
        ("card 4111 1111 1111 1112 fails Luhn", "card [PHONE] fails Luhn"),  # not a card, still a long digit run
        ("What is 3 plus 4? It is 7. In 2024 there were 365 days.", "What is 3 plus 4? It is 7. In 2024 there were 365 days."),
        ("my id is EMP-12345", "my id is [REDACTED]"),
    ],
)
def test_each_kind_is_replaced_and_ordinary_text_kept(text: str, redacted: str) -> None:
    assert Redactor([r"EMP-\d{5}"]).text(text) == redacted


def test_the_log_never_holds_the_original_and_the_answer_is_unchanged(
    make_client: Callable[..., TestClient], store: FakeStore
) -> None:
    answer = "Write to help@example.com."
    client = make_client(generator=FakeGenerator([answer, *ANSWERS]), store={"redact": {"enabled": True}})
    body = {"model": "toy-bon", "messages": [{"role": "user", "content": "I am bob@example.org, what is 3 plus 4?"}]}
    response = client.post(CHAT, json={**body, "n_candidates": 1})
    assert response.json()["choices"][0]["message"]["content"] == answer  # served as generated
    completion_id = response.json()["id"]
    client.post("/v1/feedback", json={"completion_id": completion_id, "thumb": "down", "comment": "reach me at +1 415 555 0100"})
    records = store.wait_for(lambda rs: len(rs) == 2)
    [done] = [r for r in records if isinstance(r, CompletionRecord)]
    [thumb] = [r for r in records if isinstance(r, FeedbackRecord)]
    assert done.messages[0]["content"] == "I am [EMAIL], what is 3 plus 4?"
    assert done.candidates[0].text == "Write to [EMAIL]."
    assert done.candidates[0].token_ids == []  # they would spell the original
    assert done.candidates[0].token_count == 2  # the length the canary's guardrail compares stays (FakeGenerator: 2)
    assert thumb.comment == "reach me at [PHONE]"
    assert Redactor().text("x" * 100_000 + " a@b.io") == "x" * 100_000 + " [EMAIL]"  # linear: no re-scan per position
    assert "example" not in repr(records)


def test_no_prompt_answer_key_or_comment_in_the_application_log_by_default(
    make_client: Callable[..., TestClient], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.auth import digest

    key = "sk-do-not-log-this-key"
    client = make_client(generator=FakeGenerator(["ANSWER-MUST-NOT-BE-LOGGED"]), api_keys=[{"id": "team", "sha256": digest(key)}])
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "toy-bon", "messages": [{"role": "user", "content": "PROMPT-MUST-NOT-BE-LOGGED"}], "n_candidates": 2}
    with caplog.at_level("DEBUG"):
        completion_id = client.post(CHAT, json=body, headers=auth).json()["id"]
        client.post(
            "/v1/feedback", json={"completion_id": completion_id, "thumb": "up", "comment": "COMMENT-NOT-LOGGED"}, headers=auth
        )
        client.post(CHAT, json={**body, "typo": 1}, headers=auth)  # an error path too
        client.post(CHAT, json=body, headers={"authorization": "Bearer sk-wrong-key-not-logged"})
    captured = capsys.readouterr()
    logged = captured.out + captured.err + caplog.text
    assert "chat_completion" in logged  # the access log line is there
    for secret in (
        "PROMPT-MUST-NOT-BE-LOGGED",
        "ANSWER-MUST-NOT-BE-LOGGED",
        "COMMENT-NOT-LOGGED",
        key,
        "sk-wrong-key-not-logged",
    ):
        assert secret not in logged


def test_records_past_their_retention_are_deleted_on_a_schedule(tmp_path: Path) -> None:
    import time

    from gateway.app import create_app
    from gateway.store.sql import SqlStore
    from tests.gateway.conftest import REWARDS, settings
    from tests.gateway.fakes import FakeScorer
    from tests.gateway.store.test_sql import completion
    from tests.polling import wait_until

    (tmp_path / "data").mkdir()
    db = SqlStore(f"sqlite:///{tmp_path / 'data' / 'gateway.db'}")
    db.migrate()
    db.write([completion(1, created=time.time() - 10 * 86400), completion(2)])
    store = {"data_dir": str(tmp_path / "data"), "retention_days": 1, "purge_every_h": 1}
    app = create_app(settings(store=store), generator=FakeGenerator(ANSWERS), scorer=FakeScorer(REWARDS))
    with TestClient(app):  # the first purge runs at start
        wait_until(lambda: db.completion_ids() == ["chatcmpl-2"], 30, "the old record was not purged")
    db.close()
