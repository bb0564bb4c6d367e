"""``bench profile``'s attribution of a sampled stack to the package whose code was running."""

from __future__ import annotations

from loadtest.profile import _owner


def test_a_sample_belongs_to_the_named_package_nearest_the_leaf() -> None:
    base = "_run_module_as_main (<frozen runpy>:198);main (gateway/__main__.py:193);Runner.run (asyncio/runners.py:118)"
    assert _owner(f"{base};chat_completions (gateway/routes.py:117);dumps (orjson/__init__.py:1)") == "gateway.routes"
    assert _owner(f"{base};_post (gateway/generate.py:137);_request (aiohttp/client.py:819)") == "aiohttp"
    assert _owner(f"{base};x (/usr/lib/python3.11/site-packages/pydantic/main.py:792)") == "pydantic"
    assert _owner(f"{base};raw_decode (/root/.pyenv/versions/3.11.7/lib/python3.11/json/decoder.py:353)") == "json"
    assert _owner("<module> (somewhere/else.py:1)") == "other"
