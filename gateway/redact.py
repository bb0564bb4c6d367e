"""Redaction of personal data before text is stored in the log (``store.redact``).

Knows four kinds, each replaced by a tag: e-mail addresses (``[EMAIL]``), phone numbers
(``[PHONE]``: a ``+`` or at least 9 digits, with the usual separators), card-like numbers
(``[CARD]``: 13 to 19 digits that pass the Luhn check) and the deployment's own patterns
(``[REDACTED]``). Applied to a record just before it is handed to the log writer, so
neither the database nor the spool ever holds the original: the messages, each
candidate's text (its sampled token ids are dropped when its text changed, since they
would spell the original; the trainer then tokenises the redacted text) and a thumb's
comment. The served answer is never changed. Regular expressions from the standard
library: the kinds are few and fixed, and a dependency (Presidio, scrubadub) would bring
models and languages the gateway has no use for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from gateway.store.records import CompletionRecord, FeedbackRecord, Record

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}")
"""Starts only where a local part can start, with RFC 5321's lengths: linear time on hostile input (a long run of
letters without ``@`` would otherwise be re-scanned from every position)."""
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
PHONE = re.compile(r"(?:\+\d[\d ().-]{6,}\d|\b\d(?:[ ().-]?\d){8,}\b)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class Redactor:
    def __init__(self, patterns: Sequence[str] = (), *, emails: bool = True, phones: bool = True, cards: bool = True) -> None:
        self._custom = [re.compile(p) for p in patterns]
        self._emails, self._phones, self._cards = emails, phones, cards

    def text(self, text: str) -> str:
        """``text`` with every match replaced by its tag (cards before phones: a card number is also digits)."""
        for pattern in self._custom:
            text = pattern.sub("[REDACTED]", text)
        if self._emails:
            text = EMAIL.sub("[EMAIL]", text)
        if self._cards:
            text = CARD.sub(lambda m: "[CARD]" if _luhn(re.sub(r"\D", "", m.group(0))) else m.group(0), text)
        if self._phones:
            text = PHONE.sub("[PHONE]", text)
        return text

    def record(self, record: Record) -> Record:
        """A copy of ``record`` with its texts redacted."""
        if isinstance(record, FeedbackRecord):
            return replace(record, comment=self.text(record.comment)) if record.comment else record
        return self._completion(record)

    def _completion(self, record: CompletionRecord) -> CompletionRecord:
        candidates = []
        for c in record.candidates:
            text = self.text(c.text)
            candidates.append(c if text == c.text else replace(c, text=text, token_ids=[], tokens=c.token_count))
        params = {k: self.text(v) if k == "user" and isinstance(v, str) else v for k, v in record.params.items()}
        return replace(record, messages=[self._message(m) for m in record.messages], candidates=candidates, params=params)

    def _message(self, message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": self.text(content)}
        if isinstance(content, list):
            parts = [{**p, "text": self.text(p["text"])} if isinstance(p.get("text"), str) else p for p in content]
            return {**message, "content": parts}
        return message
