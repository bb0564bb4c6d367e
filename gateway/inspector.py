"""The inspector: a page at ``/ui`` to look at what the loop is doing, and the admin reads it uses.

Knows three reads, each behind the admin guard (admin token or an ``admin``-scoped key; a
local caller when neither is configured): ``GET /admin/completions`` (recent requests with
every candidate, its reward and which was chosen, and the thumb; filters by policy version,
status and before a time), ``GET /admin/versions`` (per policy version: answers, mean chosen
reward and length, thumbs-up rate, the registry's KL to the starting policy, which pointer
names it; and the canary gate's recent looks), ``GET /admin/loop.png`` (the evaluate-loop's
plot when ``ui.loop_plot`` names one). The page itself (``gateway/ui/index.html``: plain
HTML and JavaScript, no build step) holds no data: it asks for a token, then calls those
reads and the public ``/v1/chat/completions`` and ``/v1/feedback`` with it. Reads from the
log's SQL store in a worker thread; does not write anything but what the page's chat and
thumbs send through the public API.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, HTMLResponse

from gateway.canary import finite, recorded
from gateway.errors import InvalidRequest
from gateway.state import Admin, GatewayState, State
from gateway.store.records import CompletionRecord, FeedbackRecord
from gateway.store.sql import SqlStore
from versioning.registry import Pointer, Registry

router = APIRouter()
LOOKS_SHOWN = 50


class NotBrowsable(InvalidRequest):
    """The log is off (or not a SQL store): there is nothing to browse on this gateway."""

    status = 404
    default_code = "log_not_browsable"


@router.get("/ui", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("gateway").joinpath("ui/index.html").read_text(encoding="utf-8"))


@router.get("/admin/completions", dependencies=[Admin])
async def recent_completions(
    state: State,
    limit: int = Query(default=50, ge=1, le=500),
    policy_version: str | None = Query(default=None, max_length=200),
    status: str | None = Query(default=None, pattern="^(ok|cancelled)$"),
    before: float | None = Query(default=None, description="only completions created before this (epoch seconds)"),
) -> dict[str, Any]:
    """The newest logged requests (and their candidates and thumbs), newest first."""
    store = _store(state)

    def read() -> tuple[list[CompletionRecord], dict[str, FeedbackRecord]]:
        records = store.recent(limit, policy_version=policy_version, status=status, before=before)
        return records, store.read_feedback([r.id for r in records])

    records, thumbs = await asyncio.to_thread(read)
    return {"object": "list", "data": [_completion(r, thumbs.get(r.id)) for r in records]}


@router.get("/admin/versions", dependencies=[Admin])
async def versions(state: State) -> dict[str, Any]:
    """Per policy version what the log and the registry say, and the canary gate's recent looks."""
    store = _store(state)
    figures = await asyncio.to_thread(store.version_figures)
    registry = Registry(state.settings.registry_dir())
    manifests, looks, pointers = await asyncio.to_thread(_registry_reads, registry)
    rows = []
    for version in sorted({*figures, *manifests}, key=lambda v: (v != "base", v)):
        f = figures.get(version)
        manifest = manifests.get(version, {})
        thumbs = (f.thumbs_up + f.thumbs_down) if f else 0
        rows.append(
            {
                "version": version, "role": [name for name, v in pointers.items() if v == version],
                "answers": f.answers if f else 0, "mean_reward": f.mean_reward if f else None,
                "mean_length": f.mean_length if f else None, "thumbs_up": f.thumbs_up if f else 0,
                "thumbs_down": f.thumbs_down if f else 0, "up_rate": f.thumbs_up / thumbs if f and thumbs else None,
                "kl": finite(manifest.get("kl_to_reference")), "kl_stderr": finite(manifest.get("kl_to_reference_stderr")),
                "algorithm": manifest.get("algorithm"), "created": manifest.get("created"),
            }
        )  # fmt: skip
    return {"object": "list", "data": rows, "looks": looks}


@router.get("/admin/loop.png", dependencies=[Admin])
async def loop_plot(state: State) -> FileResponse:
    """The evaluate-loop's plot (``ui.loop_plot``), for the page."""
    path = state.settings.ui.loop_plot
    if path is None or not path.is_file():
        raise InvalidRequest("no loop plot: set ui.loop_plot to an evaluate-loop run's loop.png", code="not_found")
    return FileResponse(path, media_type="image/png")


def _store(state: GatewayState) -> SqlStore:
    store = state.writer.store if state.writer is not None else None
    if not isinstance(store, SqlStore):
        raise NotBrowsable("the log is off on this gateway (store.enabled: false): nothing to browse")
    return store


def _registry_reads(registry: Registry) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, str | None]]:
    """Each version's evaluation and algorithm, the gate's last looks (newest first), the pointers."""
    manifests: dict[str, dict[str, Any]] = {}
    if registry.versions_dir("policy").is_dir():
        for m in registry.versions("policy"):
            manifests[m.version] = {**m.evaluation, "algorithm": m.algorithm, "created": m.created}
    looks = recorded(registry.root)[-LOOKS_SHOWN:]
    names: tuple[Pointer, ...] = ("current", "canary")
    pointers: dict[str, str | None] = {name: registry.version_at("policy", name) for name in names}
    return manifests, looks[::-1], pointers


def _completion(record: CompletionRecord, thumb: FeedbackRecord | None) -> dict[str, Any]:
    return {
        "id": record.id, "created": record.created, "key_id": record.key_id, "messages": record.messages,
        "policy_version": record.policy_version, "rm_version": record.rm_version, "n_candidates": record.n_candidates,
        "status": record.status, "timings_ms": record.timings_ms, "thumb": thumb.thumb if thumb else None,
        "candidates": [
            {"index": c.index, "text": c.text, "reward": c.reward, "chosen": c.chosen, "tokens": c.token_count,
             "finish_reason": c.finish_reason}
            for c in record.candidates
        ],
    }  # fmt: skip
