"""The OpenAPI document of the gateway's HTTP API (``/openapi.json``, and ``/docs`` on it).

The routes read their JSON bodies themselves, so that bad input gets OpenAI's error shape
rather than FastAPI's, which leaves FastAPI unable to see them: this module adds each body's
pydantic schema (the gateway's extensions included) and OpenAI's error body to the document
FastAPI generates from the routes. Knows schemas, not behaviour.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.protocol import AdminAction, ChatCompletionRequest, FeedbackRequest

BODIES: dict[tuple[str, str], tuple[type[BaseModel], bool]] = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, True),
    ("/v1/feedback", "post"): (FeedbackRequest, True),
    ("/admin/policy/promote", "post"): (AdminAction, False),
    ("/admin/policy/rollback", "post"): (AdminAction, False),
    ("/admin/watch/clear", "post"): (AdminAction, False),
}
"""(path, method) → the body's model, and whether a body is required."""

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def install(app: FastAPI) -> None:
    """Serve the completed document as the app's ``/openapi.json`` (built once, on first request)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR
    for (path, method), (model, required) in BODIES.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        operation = doc["paths"][path][method]
        operation["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    error = {
        "description": "OpenAI's error body",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for operations in doc["paths"].values():
        for operation in operations.values():
            operation["responses"].update({"4XX": error, "5XX": error})
    return doc
