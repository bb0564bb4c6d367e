"""The OpenAPI document describes the real request bodies, extensions included."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_the_schema_describes_the_bodies_and_the_error_shape(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    schemas = doc["components"]["schemas"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    fields = schemas["ChatCompletionRequest"]["properties"]
    assert {"messages", "model", "n", "stream", "n_candidates", "return_candidates"} <= set(fields)
    assert schemas["ChatCompletionRequest"]["required"] == ["messages", "model"]
    assert set(schemas["FeedbackRequest"]["properties"]) == {"completion_id", "thumb", "comment"}
    assert schemas["FeedbackRequest"]["additionalProperties"] is False
    assert "Message" in schemas  # nested models are components too
    assert chat["responses"]["4XX"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert client.get("/docs").status_code == 200
