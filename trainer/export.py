"""``python -m trainer pairs export``: the log's window → preference files TRL loads directly.

Knows how to read a time window from the log store (chunked), filter it by policy and
reward-model version, build pairs (``trainer.pairs``) and write them as JSONL or Parquet:
pairs to ``--out``, unpaired thumbs (KTO) beside it as ``<stem>.kto<suffix>``. Does not
know how pairs are made.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gateway.store.records import CompletionRecord, FeedbackRecord
from gateway.store.sql import SqlStore
from trainer.pairs import Exported, build
from trainer.settings import PairSettings

Format = Literal["jsonl", "parquet"]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ExportError(Exception):
    """Bad input for an export (a time that does not parse, an unwritable path); one line."""


def parse_duration(value: str) -> float | None:
    """Seconds in ``7d``/``12h``/``30m``/``45s``/``2w``; None when ``value`` is not such a duration."""
    m = _DURATION.match(value.strip())
    return float(m.group(1)) * _SECONDS[m.group(2)] if m else None


def parse_time(value: str, now: float | None = None) -> float:
    """UTC epoch seconds from ``7d``/``12h``/``30m`` (ago), an ISO 8601 date or time, or epoch seconds."""
    now = time.time() if now is None else now
    value = value.strip()
    if (ago := parse_duration(value)) is not None:
        return now - ago
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        hint = "use 7d, 12h, 30m, an ISO date (2026-11-20T08:00Z) or epoch seconds"
        raise ExportError(f"cannot read time {value!r}: {hint}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def kto_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.kto{out.suffix}")


def window(
    store: SqlStore,
    since: float,
    until: float | None,
    policy_version: str | None = None,
    rm_version: str | None = None,
    keep_thumbed: bool = True,
) -> Iterator[tuple[CompletionRecord, FeedbackRecord | None]]:
    """The window's completed completions (a cancelled one is never trained on); with ``keep_thumbed``, a thumbed
    one is kept whatever its reward model (its pair comes from the thumb, not from those scores)."""
    return pick(store.read_labelled(since, until), since, policy_version, rm_version, keep_thumbed)


def pick(
    labelled: Iterable[tuple[CompletionRecord, FeedbackRecord | None]],
    since: float = 0.0,
    policy_version: str | None = None,
    rm_version: str | None = None,
    keep_thumbed: bool = True,
) -> Iterator[tuple[CompletionRecord, FeedbackRecord | None]]:
    """``window``'s selection over completions already read, so that one read of the log can serve several windows
    (the reward-hacking watch's and the round's) that start at ``since`` or later."""
    for record, thumb in labelled:
        if record.status != "ok" or record.created < since:
            continue
        if policy_version is not None and record.policy_version != policy_version:
            continue
        if rm_version is not None and record.rm_version != rm_version and not (keep_thumbed and thumb is not None):
            continue
        yield record, thumb


def export(
    store: SqlStore,
    out: Path,
    fmt: Format,
    settings: PairSettings,
    since: float = 0.0,
    until: float | None = None,
    policy_version: str | None = None,
    rm_version: str | None = None,
) -> Exported:
    exported = build(window(store, since, until, policy_version, rm_version, settings.thumbs_override), settings)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(exported.pairs, out, fmt)
        write(exported.unpaired, kto_path(out), fmt)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return exported


def write(rows: list[dict[str, Any]], path: Path, fmt: Format) -> None:
    """Written to a temporary file and renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
