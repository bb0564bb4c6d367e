"""The registry: atomic publish, checksums, pointers (promote, rollback), retention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from versioning.registry import Registry, RegistryError


def adapter(content: bytes = b"weights") -> object:
    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(content)
        (directory / "adapter_config.json").write_text(json.dumps({"r": 8}))
        (directory / "probe").mkdir()
        (directory / "probe" / "logprobs.json").write_text("[-1.5, -0.25]")

    return write


def publish(registry: Registry, content: bytes = b"weights", parent: str | None = None) -> str:
    return registry.publish("policy", adapter(content), format="lora", parent=parent, algorithm="dpo").version  # type: ignore[arg-type]


def test_publish_numbers_versions_and_records_every_files_checksum(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.versions("policy") == []
    first, second = publish(registry, b"a"), publish(registry, b"b", parent="v0001")
    assert (first, second) == ("v0001", "v0002")
    manifest = registry.verify("policy", second)
    assert (manifest.parent, manifest.algorithm, manifest.format) == ("v0001", "dpo", "lora")
    assert set(manifest.files) == {"adapter_model.safetensors", "adapter_config.json", "probe/logprobs.json"}
    assert [m.version for m in registry.versions("policy")] == ["v0001", "v0002"]


def test_a_crash_before_the_rename_leaves_no_servable_version(tmp_path: Path) -> None:
    registry = Registry(tmp_path)

    def crash(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # the round dies mid-write

    with pytest.raises(KeyboardInterrupt):
        registry.publish("policy", crash, format="lora", parent=None)
    assert registry.versions("policy") == []
    # a process killed outright leaves its temporary directory: still not a version
    stale = registry.versions_dir("policy") / ".tmp-killed"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert registry.versions("policy") == []
    assert publish(registry) == "v0001"
    os.utime(stale, (0, 0))
    registry.retain("policy", keep=5)
    assert not stale.exists()  # old leftovers are cleaned


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_version_is_refused(tmp_path: Path, damage: str) -> None:
    registry = Registry(tmp_path)
    version = publish(registry)
    weights = registry.path("policy", version) / "adapter_model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(b"weightz")
    else:
        weights.unlink()
    with pytest.raises(RegistryError, match="checksum" if damage == "corrupt" else "missing"):
        registry.verify("policy", version)
    with pytest.raises(RegistryError):
        registry.set_pointer("policy", "current", version)
    assert registry.pointer("policy", "current") is None


def test_promote_and_rollback_move_the_pointers(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    v1, v2, v3 = (publish(registry, bytes([i])) for i in range(3))
    registry.set_pointer("policy", "current", v1)
    registry.set_pointer("policy", "canary", v2)
    assert registry.promote("policy").version == v2
    assert registry.pointer("policy", "canary") is None
    registry.set_pointer("policy", "canary", v3)
    after = registry.rollback("policy")  # a canary is dropped, current untouched
    assert after is not None
    assert after.version == v2
    assert registry.pointer("policy", "canary") is None
    back = registry.rollback("policy", reason="thumbs fell")  # no canary: current steps back
    assert back is not None
    assert (back.version, back.reason) == (v1, "thumbs fell")
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback("policy")
    with pytest.raises(RegistryError, match="no policy canary"):
        registry.promote("policy")


def test_version_at_is_the_pointed_version_else_the_default(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.version_at("policy") is None
    assert registry.version_at("policy", default="base") == "base"
    registry.set_pointer("policy", "canary", publish(registry))
    assert registry.version_at("policy", "canary") == "v0001"
    assert registry.version_at("policy", default="base") == "base"  # current still points nowhere
    assert registry.version_at("reward_model", default="rm-base") == "rm-base"


def test_retention_keeps_the_newest_and_everything_a_pointer_needs(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    versions = [publish(registry, bytes([i])) for i in range(6)]
    registry.set_pointer("policy", "current", versions[0])
    registry.set_pointer("policy", "current", versions[1])  # v0001 stays as its rollback target
    deleted = registry.retain("policy", keep=2)
    assert deleted == ["v0003", "v0004"]
    assert [m.version for m in registry.versions("policy")] == ["v0001", "v0002", "v0005", "v0006"]


def test_pointer_files_are_never_half_written(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.set_pointer("policy", "current", publish(registry))
    leftovers = [p.name for p in (tmp_path / "policy").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert json.loads((tmp_path / "policy" / "current.json").read_text())["version"] == "v0001"
    with pytest.raises(RegistryError, match="not a version name"):
        registry.verify("policy", "../../etc")


def test_cli_lists_shows_promotes_and_rolls_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.__main__ import main

    registry = Registry(tmp_path)
    v1, v2 = publish(registry, b"1"), publish(registry, b"2", parent="v0001")
    registry.set_pointer("policy", "current", v1)
    registry.set_pointer("policy", "canary", v2)
    cli = ["registry", "--registry", str(tmp_path)]
    assert main([*cli[:1], "list", *cli[1:]]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert (listing[0].split()[0], listing[0].split()[-1]) == ("v0001", "current")
    assert (listing[1].split()[0], listing[1].split()[2], listing[1].split()[-1]) == ("v0002", "parent=v0001", "canary")
    assert main([*cli[:1], "show", "v0002", *cli[1:]]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == "v0001"
    assert main([*cli[:1], "promote", *cli[1:]]) == 0
    assert registry.pointer("policy", "current").version == v2  # type: ignore[union-attr]
    assert main([*cli[:1], "rollback", *cli[1:], "--reason", "bad canary"]) == 0
    assert registry.pointer("policy", "current").reason == "bad canary"  # type: ignore[union-attr]
    capsys.readouterr()
    assert main([*cli[:1], "rollback", *cli[1:]]) == 1
    assert capsys.readouterr().err.strip() == "python -m trainer registry: error: no earlier policy version to roll back to"
    assert main(["registry", "list", "--registry", str(tmp_path / "nope")]) == 1
    assert "no registry at" in capsys.readouterr().err
