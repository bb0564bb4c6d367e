"""The managed vLLM's environment (no server is started here; the e2e tests start real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.vllm_process import VLLMProcess


def test_vllm_logs_at_info_even_after_trl_was_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing TRL sets VLLM_LOGGING_LEVEL=ERROR in this process (trl._compat); a vLLM started afterwards must
    still log at INFO (its request log is how operators, and the disconnect e2e test, see requests added and aborted)."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # what that import does, whichever test module imported it first
    vllm = VLLMProcess(Path("model"), "policy")
    assert vllm.environment()["VLLM_LOGGING_LEVEL"] == "INFO"
    assert vllm.environment()["HF_HUB_OFFLINE"] == "1"
    quiet = VLLMProcess(Path("model"), "policy", env={"VLLM_LOGGING_LEVEL": "WARNING"})
    assert quiet.environment()["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert VLLMProcess(Path("model"), "policy", log_level="DEBUG").environment()["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_nice_lowers_the_priority_of_what_vllm_runs(tmp_path: Path) -> None:
    """``nice`` is applied in the child before it runs vLLM (so its engine and workers inherit it): here a stand-in
    command in vLLM's place reports the niceness it runs at."""
    import os
    import sys

    before = os.nice(0)
    (tmp_path / "config.json").write_text("{}")
    out = tmp_path / "nice.txt"
    server = VLLMProcess(tmp_path, "policy", port=0, log_path=tmp_path / "log", nice=7)
    server.args = [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(str(os.nice(0)))"]
    server.start()
    assert server._proc is not None
    assert server._proc.wait(30) == 0
    assert int(out.read_text()) == min(19, before + 7)
    assert os.nice(0) == before  # this process keeps its priority
    server.stop()
