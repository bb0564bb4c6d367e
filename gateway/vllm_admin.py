"""The vLLM admin client: list served models, load and unload LoRA adapters, and probe what a name serves.

Knows vLLM's OpenAI-server admin endpoints (``/v1/models``, ``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``; runtime LoRA updating on) and the swap probe's request (one
greedy token after each fixed prefix with its top-``K`` log-probs, by token id), every call
bounded by ``timeout_s``. ``load_and_probe`` is one backend's check: load (unless vLLM's
resolver loads on demand), probe, and the difference from the trainer's values. Does not know
the registry's pointers or which version should be served (``gateway.swap``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import aiohttp

from gateway.settings import Backend
from versioning.probe import TOP_K, Probe, difference

log = logging.getLogger("gateway.vllm_admin")


class VerificationError(Exception):
    """A backend does not serve the version it was asked to load."""


class VLLMAdmin:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def models(self, backend: Backend) -> set[str]:
        async with self._session.get(f"{backend.url}/v1/models", timeout=self._timeout) as response:
            data = await response.json()
        return {m["id"] for m in data.get("data", [])}

    async def load_adapter(self, backend: Backend, name: str, path: Path) -> None:
        await self._post(backend, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    async def unload_adapter(self, backend: Backend, name: str) -> None:
        await self._post(backend, "/v1/unload_lora_adapter", {"lora_name": name})

    async def _post(self, backend: Backend, route: str, body: dict[str, Any]) -> None:
        async with self._session.post(f"{backend.url}{route}", json=body, timeout=self._timeout) as response:
            if response.status != 200:
                raise VerificationError(f"{route} answered {response.status}: {(await response.text())[:200]}")

    async def probe(self, backend: Backend, model: str, prefixes: list[list[int]]) -> list[dict[str, float]]:
        """The top next-token log-probs after each prefix (one greedy token each), keyed by token id."""
        served = []
        for ids in prefixes:
            body = {
                "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": TOP_K,
                "return_tokens_as_token_ids": True,
            }  # fmt: skip
            async with self._session.post(f"{backend.url}/v1/completions", json=body, timeout=self._timeout) as response:
                if response.status != 200:
                    raise VerificationError(f"probe answered {response.status}: {(await response.text())[:200]}")
                data = json.loads(await response.text())
            top = data["choices"][0]["logprobs"]["top_logprobs"][0]
            served.append({token.removeprefix("token_id:"): float(value) for token, value in top.items()})
        return served

    async def load_and_probe(
        self, backend: Backend, name: str, path: Path | None, probe: Probe, loading: Literal["admin", "resolver"]
    ) -> float:
        """Make ``backend`` serve ``name`` (load the adapter at ``path`` by the admin API; with the resolver, or
        ``path`` None for a model served as itself, the probe's first request makes vLLM serve it), check that
        ``/v1/models`` lists it, and return the probe's mean difference in nats per token from the trainer's values
        (the caller judges it). Raises VerificationError (or the client's errors) when it cannot."""
        if path is not None and loading == "admin" and name not in await self.models(backend):
            try:
                await self.load_adapter(backend, name, path)
            except VerificationError:
                if name not in await self.models(backend):
                    raise
                # another gateway sharing this backend loaded it meanwhile: the probe below still decides
        served = await self.probe(backend, name, probe.prefixes)  # resolver: the first request loads it
        if name not in await self.models(backend):
            raise VerificationError(f"{name} is not listed in /v1/models")
        return difference(probe.top, served)
