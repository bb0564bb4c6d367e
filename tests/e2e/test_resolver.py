"""Many replicas' loading path: vLLM's filesystem LoRA resolver over the registry volume, verified by the gateway.

A LoRA version is published to a registry; a real vLLM started with
``VLLM_LORA_RESOLVER_CACHE_DIR=<registry>/policy/versions`` has never been told about it.
The swapper (``swap.lora_loading: resolver``) sends the probe under the version's name,
which makes vLLM load it from disk, then checks that vLLM lists it and that the served
log-probs match the probe the trainer stored, and routes to it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from gateway.metrics import Metrics
from gateway.settings import Backend, SwapSettings
from gateway.swap import Swapper
from tests.e2e.conftest import running_vllm
from versioning import probe
from versioning.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _publish_adapter(registry: Registry, base: Path) -> str:
    """A LoRA version with non-zero weights and its probe, saved as a round saves one (base path as the trainer's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype="float32"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    tokenizer = AutoTokenizer.from_pretrained(base)

    def write(directory: Path) -> None:
        model.save_pretrained(str(directory))
        probe.compute(model, probe.sequences(tokenizer)).save(directory)

    version = registry.publish("policy", write, format="lora", parent=None, algorithm="dpo").version
    registry.set_pointer("policy", "current", version, reason="test")
    return version


def test_the_filesystem_resolver_loads_a_version_the_gateway_then_verifies(test_models: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    versions = registry.versions_dir("policy")
    versions.mkdir(parents=True, exist_ok=True)
    base = test_models / "policy"
    env = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(versions)}
    with running_vllm(base, "policy", env=env) as url:
        version = _publish_adapter(registry, base)
        backend = Backend(url=url, model="policy")

        async def swap() -> tuple[dict[str, str], set[str], float | None]:
            metrics = Metrics()
            async with aiohttp.ClientSession() as session:
                swapper = Swapper(session, [backend], "base", SwapSettings(lora_loading="resolver"), registry.root, metrics)
                async with session.get(f"{url}/v1/models") as response:
                    before = {m["id"] for m in (await response.json())["data"]}
                await swapper.sync()
                return swapper.route.models, before, metrics.swap_probe_diff.labels(url)._value.get()

        models, before, diff = asyncio.run(swap())
        assert version not in before  # nobody loaded it: the probe request made vLLM resolve it from the volume
        assert models == {url: version}
        assert diff is not None
        assert diff < 1e-3
