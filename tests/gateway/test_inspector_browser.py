"""The inspector page in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

A chat sent through the page shows the candidates and rewards the log holds, a thumb clicked on
the page reaches the log, the recent requests and the versions tables fill in, and a screenshot
of the page is taken (``docs/inspector.png``, which the README shows, is written when missing
or with ``BON_UPDATE_SCREENSHOTS=1``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.store.sql import SqlStore
from tests.gateway.conftest import ANSWERS, REWARDS
from tests.gateway.fakes import FakeGenerator, FakeScorer
from tests.polling import wait_until
from tests.serving import serving

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, SqlStore]]:
    db = f"sqlite:///{tmp_path / 'log.db'}"
    settings = GatewaySettings(
        backends=[{"url": "http://127.0.0.1:9", "model": "policy"}],  # type: ignore[list-item]
        store={"url": db, "data_dir": tmp_path / "data", "flush_interval_ms": 5},  # type: ignore[arg-type]
        swap={"registry_dir": tmp_path / "registry"},  # type: ignore[arg-type]
        n_candidates=4, warmup=False,
    )  # fmt: skip
    store = SqlStore(db)
    with serving(create_app(settings, generator=FakeGenerator(ANSWERS), scorer=FakeScorer(REWARDS))) as url:
        yield url, store
    store.close()


def test_a_chat_and_a_thumb_through_the_page_match_the_log(gateway: tuple[str, SqlStore], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, store = gateway
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: `make test` installs it (Debian package chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/ui")
            page.get_by_test_id("n").select_option("4")
            page.get_by_test_id("send").click()
            rows = page.get_by_test_id("candidates").locator("tbody tr")
            expect(rows).to_have_count(4)
            shown = [
                (rows.nth(i).locator("td").nth(1).inner_text(), rows.nth(i).locator("td.reward").inner_text()) for i in range(4)
            ]
            chosen = page.get_by_test_id("candidates").locator("tbody tr.chosen td").nth(1).inner_text()

            wait_until(lambda: len(store.completion_ids()) == 1, 10, "the chat's record")
            [record] = list(store.read_completions())
            assert shown == [(c.text, f"{c.reward:.3f}") for c in record.candidates]  # what the page shows is the log
            assert chosen == next(c.text for c in record.candidates if c.chosen)
            assert page.get_by_test_id("answer").inner_text() == chosen

            page.get_by_test_id("thumb-up").click()
            expect(page.get_by_test_id("thumb-status")).to_contain_text("recorded")
            assert store.read_feedback([record.id])[record.id].thumb == "up"  # durable before its 200

            page.get_by_test_id("refresh").click()
            recent = page.get_by_test_id("recent").locator(f'tbody tr[data-id="{record.id}"]')
            expect(recent.locator("td.thumb")).to_have_text("up")
            expect(page.get_by_test_id("versions").locator("tbody tr").first).to_contain_text("base")
            expect(page.get_by_test_id("error")).to_have_text("")
            shot = tmp_path / "inspector.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("BON_UPDATE_SCREENSHOTS") or not (DOCS / "inspector.png").exists():
                shutil.copyfile(shot, DOCS / "inspector.png")  # the README's copy; not rewritten on every run
        finally:
            browser.close()
    print(f"\ninspector: the candidates and rewards shown are the log's {shown}; the thumb clicked is logged")
    assert REWARDS[chosen] == max(REWARDS[a] for a in ANSWERS)
