"""POST /v1/feedback on fakes: ownership without the database, validation, idempotent queueing, limits, metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import digest
from gateway.store.records import FeedbackRecord
from gateway.store.spool import Spool
from tests.gateway.fakes import FakeStore

CHAT = "/v1/chat/completions"
FEEDBACK = "/v1/feedback"
MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]
KEYS = [{"id": "team-a", "sha256": digest("sk-a")}, {"id": "team-b", "sha256": digest("sk-b")}]
A = {"authorization": "Bearer sk-a"}
B = {"authorization": "Bearer sk-b"}


def complete(client: TestClient, headers: dict[str, str] | None = None) -> str:
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}, headers=headers or {})
    assert response.status_code == 200
    completion_id: str = response.json()["id"]
    return completion_id


def thumbs(records: Iterable[object]) -> list[FeedbackRecord]:
    return [r for r in records if isinstance(r, FeedbackRecord)]


def test_thumb_is_written_before_its_200(make_client: Callable[..., TestClient], store: FakeStore) -> None:
    client = make_client(store={"flush_interval_ms": 60_000})  # the queue would hold it for a minute
    completion_id = complete(client)
    response = client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": "up", "comment": "nice"})
    assert response.status_code == 200
    assert response.json() == {"object": "feedback", "completion_id": completion_id, "thumb": "up", "status": "accepted"}
    [thumb] = thumbs(store.snapshot())  # no waiting: a crash right after the 200 keeps it
    assert (thumb.completion_id, thumb.key_id, thumb.thumb, thumb.comment) == (completion_id, "anonymous", "up", "nice")


def test_only_the_owner_may_rate_and_others_get_the_unknown_id_answer(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=KEYS)
    completion_id = complete(client, A)
    stranger = client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": "down"}, headers=B)
    unknown = client.post(FEEDBACK, json={"completion_id": "chatcmpl-" + "0" * 48, "thumb": "down"}, headers=A)
    for response in (stranger, unknown):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "completion_not_found"
        assert response.json()["error"]["param"] == "completion_id"
    assert stranger.json()["error"]["message"].replace(completion_id, "X") == unknown.json()["error"]["message"].replace(
        "chatcmpl-" + "0" * 48, "X"
    )
    assert client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": "down"}).status_code == 401
    assert client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": "down"}, headers=A).status_code == 200


def test_a_thumb_is_accepted_before_the_completion_is_written(
    make_client: Callable[..., TestClient], store: FakeStore, tmp_path: Path
) -> None:
    client = make_client()
    store.down = True  # nothing reaches the database, yet the id is verifiable from its signature
    completion_id = complete(client)
    assert client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": "up"}).status_code == 200
    [spooled] = thumbs(Spool(tmp_path / "data" / "spool").read(tmp_path / "data" / "spool" / "spool.jsonl"))
    assert spooled.completion_id == completion_id  # on disk (fsync'd) before the 200, with the database down


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"completion_id": "x", "thumb": "sideways"}, "thumb"),
        ({"completion_id": "x"}, "thumb"),
        ({"thumb": "up"}, "completion_id"),
        ({"completion_id": "x", "thumb": "up", "reward": 10}, "reward"),
        ({"completion_id": "x", "thumb": "up", "key_id": "team-b"}, "key_id"),
    ],
)
def test_bad_feedback_is_a_400(client: TestClient, body: dict[str, object], param: str) -> None:
    response = client.post(FEEDBACK, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_long_comment_is_a_400(make_client: Callable[..., TestClient]) -> None:
    client = make_client(feedback={"max_comment_chars": 10})
    completion_id = complete(client)
    response = client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": "up", "comment": "x" * 11})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "comment"


def test_feedback_is_rate_limited_per_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=KEYS, feedback={"per_minute": 1, "burst": 2})
    mine = complete(client, A)
    theirs = complete(client, B)
    statuses = [client.post(FEEDBACK, json={"completion_id": mine, "thumb": "up"}, headers=A).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = client.post(FEEDBACK, json={"completion_id": mine, "thumb": "up"}, headers=A)
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1
    assert client.post(FEEDBACK, json={"completion_id": theirs, "thumb": "up"}, headers=B).status_code == 200


def test_metrics_count_requests_and_thumbs_per_version(client: TestClient) -> None:
    ids = [complete(client) for _ in range(3)]
    for completion_id, thumb in zip(ids, ["up", "up", "down"], strict=True):
        client.post(FEEDBACK, json={"completion_id": completion_id, "thumb": thumb})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples["bon_feedback_total", (("policy_version", "base"), ("thumb", "up"))] == 2
    assert samples["bon_feedback_total", (("policy_version", "base"), ("thumb", "down"))] == 1
    assert samples["bon_requests_total", (("status", "200"),)] == 3
    assert samples["bon_candidates_per_request_count", ()] == 3
    assert samples["bon_reward_margin_count", (("vs", "mean"),)] == 3
    assert samples["bon_chosen_length_tokens_count", ()] == 3
    assert samples["bon_stage_latency_seconds_count", (("stage", "log"),)] == 3
    assert ("bon_policy_version_info", (("policy", "base"), ("reward_model", "rm-fake"))) in samples
