"""Generation: N candidates from a vLLM OpenAI server in one request.

Knows how to ask vLLM for ``n`` samples with log-probs and token ids (vLLM shares the
prompt's prefix across them), whole or streamed (each candidate handed on as soon as it
is finished, so scoring can overlap the others' decoding), how to pick a backend among several (fewest requests in
flight; skipping those whose circuit is open, ``gateway.breaker``; failing over when one
refuses the connection or does not accept it within ``timeouts.connect_s``, since then the
request never reached it), how to relay a token stream, and how vLLM's failures map to typed
errors. Cancelling the awaiting task closes the connection, which makes vLLM abort the
request: an abandoned best-of-8 does not keep the cores busy.

The HTTP client is one shared ``aiohttp.ClientSession``: measured on this machine, a proxy
on one shared ``httpx.AsyncClient`` added 137 ms p50 at 32 concurrent requests, the same
proxy on aiohttp 6.5 ms (the design notes in ``shared/DESIGN.md`` beside the repository, and
``loadtest/``). Does not score or choose.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.breaker import Breakers
from gateway.errors import BackendFailed, BackendRejected, BackendTimeout, BackendUnavailable, Overloaded
from gateway.settings import Backend

JSON = {"content-type": "application/json"}
Finished = Callable[["Candidate"], None]
"""Told each candidate of a streamed best-of-N as soon as vLLM has finished it."""


@dataclass
class Candidate:
    """One sampled answer."""

    index: int
    text: str
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: dict[str, Any] | None = None
    """vLLM's ``logprobs`` object for the choice (OpenAI shape), returned to clients that ask."""
    message: dict[str, Any] = field(default_factory=dict)
    """vLLM's message fields besides ``role`` and ``content`` that it set (``tool_calls``, ``reasoning_content``,
    ``refusal``...), returned as they are; ``content`` is None here when vLLM's was (a tool call's answer)."""

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


@dataclass
class Generation:
    candidates: list[Candidate]
    prompt_tokens: int
    completion_tokens: int
    backend: str


class Generator(Protocol):
    """Where candidates come from (vLLM in production, a fake in unit tests).

    ``models`` (backend URL → model name) is the request's route from the hot-swap
    (``gateway.routing.Route.models``): only those backends are used, each asked for its name
    (possibly a vLLM the config does not list: a blue-green instance serving a full
    version); None: every configured backend, under its configured model name."""

    async def generate(
        self, body: dict[str, Any], n: int, models: dict[str, str] | None = None, on_finished: Finished | None = None
    ) -> Generation:
        """``n`` candidates. ``on_finished``: called with each candidate as soon as it is complete (vLLM streams the
        ``n`` samples), while the others are still being decoded; the Generation returned is the same either way."""
        ...

    def stream(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[bytes, None]:
        """Relay a streaming (N=1) request: yields each SSE ``data:`` payload as raw bytes (close it to let go)."""
        ...

    def sample(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """One sample as a streamed request of its own, with token ids and log-probs: yields vLLM's chunks, parsed
        (``Assembly`` puts them together), each with ``backend``, the URL that answers; closing it closes the
        connection, so vLLM aborts that sample alone."""
        ...

    async def ready(self) -> bool: ...


class VLLMGenerator:
    """Talks to one or more vLLM OpenAI servers over one shared aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        backends: Sequence[Backend],
        request_timeout_s: float,
        connect_timeout_s: float = 5.0,
        breakers: Breakers | None = None,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is required")
        self._session = session
        self._backends = list(backends)
        self._in_flight: dict[str, int] = {}
        """Backend URL → requests in flight (routed backends may be ones the config does not list: blue-green)."""
        # a per-request timeout replaces the session's: the connect timeout is set here again. A relayed stream is
        # bounded between chunks (its length is ``limits.max_stream_s``'s), a buffered request as a whole
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=request_timeout_s)
        self._request_timeout_s = request_timeout_s
        self.breakers = breakers or Breakers(failures=3, cooldown_s=10.0)
        self.on_missing: Callable[[str, str], bool] = lambda url, model: False
        """Told (backend URL, model name) when a backend says it does not have the model it was asked for; True: it is
        a routed version being loaded again (the request tries elsewhere, else a retryable 503), False: a 502."""

    def _order(self, models: dict[str, str] | None) -> list[tuple[str, str]]:
        """(URL, model name) to try: the route's, else the configured backends; fewest requests in flight first."""
        usable = list(models.items()) if models is not None else [(b.url, b.model) for b in self._backends]
        return sorted(usable, key=lambda backend: self._in_flight.get(backend[0], 0))

    @asynccontextmanager
    async def _post(
        self, payload: Callable[[str], dict[str, Any]], models: dict[str, str] | None, timeout: aiohttp.ClientTimeout
    ) -> AsyncIterator[tuple[str, aiohttp.ClientResponse]]:
        """POST a chat request to the first reachable backend; yields it and its 200 response.

        A backend that cannot be connected to is skipped (the request never reached it), and
        so is one whose circuit is open; every other failure, also while the caller reads the
        response, maps to a typed error. Each outcome is reported to the backend's breaker."""
        last_error: Exception | None = None
        order = self._order(models)
        for url, model in order:
            if not self.breakers.claim(url):
                continue
            self._in_flight[url] = self._in_flight.get(url, 0) + 1
            healthy: bool | None = None  # what the outcome says about the backend (None: nothing)
            try:
                try:
                    response = await self._session.post(
                        f"{url}/v1/chat/completions", data=orjson.dumps(payload(model)), headers=JSON, timeout=timeout
                    )
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    healthy, last_error = False, exc
                    continue
                async with response:
                    if response.status == 503:  # refused at once (vLLM's queue is full, or it is starting): try another
                        last_error = Overloaded(f"the model backend is overloaded: {_error_message(await response.text())}")
                        if retry_after := response.headers.get("retry-after"):
                            last_error.headers["retry-after"] = retry_after
                        continue
                    if response.status == 404 and models is not None and self.on_missing(url, model):
                        message = _error_message(await response.text())  # a routed version vLLM no longer has
                        last_error = BackendUnavailable(f"the model backend lost this version; it is being reloaded ({message})")
                        continue
                    if response.status != 200:
                        healthy = None if response.status == 429 else response.status < 500
                        await _json_or_raise(response)
                    self.breakers.succeeded(url)  # it answers: a probe's verdict does not wait for the whole answer
                    yield url, response
                return
            except TimeoutError:
                healthy = False
                raise BackendTimeout(f"the model backend did not answer within {self._request_timeout_s:.0f} s") from None
            except aiohttp.ClientError as exc:
                healthy = False
                raise BackendFailed(f"the model backend failed: {exc.__class__.__name__}") from None
            finally:
                left = self._in_flight[url] - 1
                if left:
                    self._in_flight[url] = left
                else:
                    del self._in_flight[url]  # blue-green instances come and go
                if healthy is None:
                    self.breakers.released(url)
                elif healthy:
                    self.breakers.succeeded(url)
                else:
                    self.breakers.failed(url)
        if last_error is None:  # every backend's circuit is open: fail fast
            retry = self.breakers.retry_in([url for url, _ in order])
            raise BackendUnavailable(f"every model backend is failing (circuit open); retry in {retry:.0f} s", retry)
        if isinstance(last_error, Overloaded | BackendUnavailable):
            raise last_error
        raise BackendUnavailable(f"no model backend is reachable ({last_error.__class__.__name__})")

    async def generate(
        self, body: dict[str, Any], n: int, models: dict[str, str] | None = None, on_finished: Finished | None = None
    ) -> Generation:
        if on_finished is not None:
            return await self._generate_streamed(body, n, models, on_finished)

        def payload(model: str) -> dict[str, Any]:
            return {**body, "model": model, "n": n, "stream": False, "logprobs": True, "return_token_ids": True}

        async with self._post(payload, models, self._timeout) as (url, response):
            return _generation(await _json_or_raise(response), url)
        raise AssertionError("unreachable: _post yields or raises")

    async def _generate_streamed(
        self, body: dict[str, Any], n: int, models: dict[str, str] | None, on_finished: Finished
    ) -> Generation:
        """The same request as ``generate``'s, streamed: the ``n`` samples' chunks are put together as they come, and
        each candidate is handed to ``on_finished`` when its ``finish_reason`` arrives."""

        def payload(model: str) -> dict[str, Any]:
            return {**body, "model": model, "n": n, "stream": True, "logprobs": True, "return_token_ids": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip

        assembly = Assembly()
        async with self._post(payload, models, self._timeout) as (url, response):
            if response.content_type != "text/event-stream":  # a server that ignores ``stream``: all of them at once
                whole = _generation(await _json_or_raise(response), url)
                for candidate in whole.candidates:
                    on_finished(candidate)
                return whole
            async for chunk in _events(response):
                for candidate in assembly.add(chunk):
                    on_finished(candidate)
            if len(assembly.parts) < n:
                raise BackendFailed(f"the model backend's stream ended with {len(assembly.parts)} of {n} answers")
            return assembly.generation(url)
        raise AssertionError("unreachable: _post yields or raises")

    async def stream(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[bytes, None]:
        payload: Callable[[str], dict[str, Any]] = lambda model: {**body, "model": model, "n": 1, "stream": True}  # noqa: E731
        async with self._post(payload, models, self._stream_timeout) as (_, response):
            async for line in response.content:
                if line.startswith(b"data: "):
                    yield line[6:].rstrip(b"\r\n")

    async def sample(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[dict[str, Any], None]:
        def payload(model: str) -> dict[str, Any]:
            return {**body, "model": model, "n": 1, "stream": True, "logprobs": True, "return_token_ids": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip

        async with self._post(payload, models, self._stream_timeout) as (url, response):
            if response.content_type != "text/event-stream":  # a server that ignores ``stream``: the sample at once
                whole = await _json_or_raise(response)
                choice = whole["choices"][0]
                delta = {"role": "assistant", "content": choice["message"].get("content") or ""}
                yield {"choices": [{**choice, "delta": delta}], "usage": whole.get("usage"), "backend": url}
                return
            async for chunk in _events(response):
                chunk["backend"] = url
                yield chunk

    async def ready(self) -> bool:
        for backend in self._backends:
            try:
                async with self._session.get(f"{backend.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                continue
        return False


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """A vLLM stream's chunks, parsed, until ``[DONE]``; an error event (vLLM failed mid-stream, its status was
    already 200) raises ``BackendFailed``."""
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].rstrip(b"\r\n")
        if data == b"[DONE]":
            return
        chunk = orjson.loads(data)
        if "error" in chunk:
            raise BackendFailed(f"the model backend failed: {_error_message(data.decode())}")
        yield chunk


async def _json_or_raise(response: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await response.read()
    if response.status == 200:
        data: dict[str, Any] = orjson.loads(raw)
        return data
    message = _error_message(raw.decode(errors="replace")) or f"HTTP {response.status}"
    if 400 <= response.status < 500 and response.status not in (404, 408, 429):
        raise BackendRejected(message, response.status)
    if response.status in (503, 429):
        raise BackendUnavailable(f"the model backend is overloaded or starting: {message}")
    raise BackendFailed(f"the model backend failed: {message}")


def _error_message(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])
    return None


def _message_fields(message: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in message.items() if k not in ("role", "content") and v not in (None, [])}
    if message.get("content") is None:
        fields["content"] = None
    return fields


def _generation(data: dict[str, Any], backend: str) -> Generation:
    candidates = [
        Candidate(
            index=choice["index"],
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            token_ids=list(choice.get("token_ids") or []),
            logprobs=choice.get("logprobs"),
            message=_message_fields(choice["message"]),
        )
        for choice in data["choices"]
    ]
    candidates.sort(key=lambda c: c.index)
    usage = data.get("usage") or {}
    return Generation(candidates, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), backend)


@dataclass
class Assembly:
    """A streamed best-of-N put back together: per sample its text, token ids, log-probs and finish reason, the
    message's other text fields (``reasoning_content``...), and the usage of the last chunk."""

    parts: dict[int, Candidate] = field(default_factory=dict)
    texts: dict[int, list[str]] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> list[Candidate]:
        """Take one chunk; returns the candidates it finished."""
        finished = []
        for choice in chunk.get("choices") or ():
            index = int(choice["index"])
            candidate = self.parts.get(index)
            if candidate is None:
                candidate = self.parts[index] = Candidate(index=index, text="", finish_reason=None)
                self.texts[index] = []
            delta = choice.get("delta") or {}
            for name, value in delta.items():
                if name == "content":
                    self.texts[index].append(value or "")
                elif isinstance(value, str) and name != "role":
                    candidate.message[name] = candidate.message.get(name, "") + value
            candidate.token_ids.extend(choice.get("token_ids") or ())
            if (logprobs := choice.get("logprobs")) is not None:
                if candidate.logprobs is None:
                    candidate.logprobs = {"content": []}
                candidate.logprobs["content"].extend(logprobs.get("content") or ())
            if choice.get("finish_reason") is not None:
                candidate.finish_reason = choice["finish_reason"]
                candidate.text = "".join(self.texts[index])
                finished.append(candidate)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        return finished

    def text(self, index: int) -> str:
        """The sample's text so far."""
        return "".join(self.texts.get(index, ()))

    def generation(self, backend: str) -> Generation:
        for index, candidate in self.parts.items():
            candidate.text = "".join(self.texts[index])
        candidates = sorted(self.parts.values(), key=lambda c: c.index)
        return Generation(
            candidates, int(self.usage.get("prompt_tokens", 0)), int(self.usage.get("completion_tokens", 0)), backend
        )
