"""The model registry: versioned, checksummed model directories and the pointers that say what is served.

Layout under one root (a local directory, or a volume shared by trainer and gateways)::

    <root>/<kind>/versions/<version>/   the model's files + manifest.json (written last)
    <root>/<kind>/current.json          pointer: the version served to everyone
    <root>/<kind>/canary.json           pointer: the version on trial (optional)

``kind`` is ``policy`` (LoRA adapters over the fixed base policy, or full models) or
``reward_model``. A version is published into a temporary directory and renamed into
place in one step, so a crash leaves either nothing or a complete version; its manifest
lists the SHA-256 of every file, and a version whose files do not match is never pointed
at (``verify``). Pointers are small JSON files replaced atomically; each keeps the
versions it replaced, so ``rollback`` goes back one step. The pointers are the single
source of truth for what is served: gateways watch them; the trainer and the CLI only
move them. Knows nothing about training or vLLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

Kind = Literal["policy", "reward_model"]
KINDS: tuple[Kind, ...] = ("policy", "reward_model")
Pointer = Literal["current", "canary"]
MANIFEST = "manifest.json"
_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(Exception):
    """A missing registry, version or pointer, or a version that fails verification; one line for the user."""


@dataclass
class Manifest:
    version: str
    kind: Kind
    format: Literal["lora", "full"]
    parent: str | None
    """The version this one was trained from (None: the base model)."""
    created: float
    algorithm: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data_window: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """Relative path → SHA-256 of every file but the manifest."""


@dataclass
class PointerState:
    version: str
    updated: float
    history: list[str] = field(default_factory=list)
    """Versions this pointer held before, newest last (``rollback`` pops one)."""
    reason: str | None = None


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- versions ----
    def versions_dir(self, kind: Kind) -> Path:
        return self.root / kind / "versions"

    def path(self, kind: Kind, version: str) -> Path:
        if not _VERSION.match(version):
            raise RegistryError(f"{version!r} is not a version name (v0001, v0002, ...)")
        return self.versions_dir(kind) / version

    def versions(self, kind: Kind) -> list[Manifest]:
        """Published versions, oldest first (temporary directories of unfinished publishes are not versions)."""
        found = []
        directory = self.versions_dir(kind)
        if not directory.is_dir():
            return []
        for entry in directory.iterdir():
            if _VERSION.match(entry.name) and (entry / MANIFEST).is_file():
                found.append(self.manifest(kind, entry.name))
        return sorted(found, key=lambda m: _number(m.version))

    def manifest(self, kind: Kind, version: str) -> Manifest:
        path = self.path(kind, version) / MANIFEST
        try:
            return Manifest(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise RegistryError(f"no {kind} version {version} in {self.root}") from None
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"{kind} {version}: unreadable manifest ({exc})") from None

    def publish(
        self,
        kind: Kind,
        write: Callable[[Path], None],
        *,
        format: Literal["lora", "full"],
        parent: str | None,
        algorithm: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        data_window: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
    ) -> Manifest:
        """Run ``write(dir)`` into a temporary directory, checksum it, and rename it into the next version."""
        versions = self.versions_dir(kind)
        versions.mkdir(parents=True, exist_ok=True)
        tmp = versions / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
            if not files:
                raise RegistryError("the new version has no files")
            while True:
                manifest = Manifest(
                    version=self._next_version(kind), kind=kind, format=format, parent=parent, created=time.time(),
                    algorithm=algorithm, hyperparameters=hyperparameters or {}, data_window=data_window or {},
                    evaluation=evaluation or {}, files=files,
                )  # fmt: skip
                _write_json(tmp / MANIFEST, asdict(manifest))
                _fsync_dir(tmp)
                try:
                    tmp.rename(versions / manifest.version)  # atomic; fails if another publisher took the name
                except OSError:
                    if (versions / manifest.version).exists():
                        continue
                    raise
                _fsync_dir(versions)
                return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _next_version(self, kind: Kind) -> str:
        taken = [_number(p.name) for p in self.versions_dir(kind).iterdir() if _VERSION.match(p.name)]
        return f"v{max(taken, default=0) + 1:04d}"

    def verify(self, kind: Kind, version: str) -> Manifest:
        """The manifest, if every listed file is present with its checksum; else RegistryError."""
        manifest = self.manifest(kind, version)
        root = self.path(kind, version)
        for name, digest in manifest.files.items():
            file = root / name
            if not file.is_file():
                raise RegistryError(f"{kind} {version}: file {name} is missing")
            if _sha256(file) != digest:
                raise RegistryError(f"{kind} {version}: file {name} does not match its checksum")
        return manifest

    # ---- pointers ----
    def pointer(self, kind: Kind, name: Pointer) -> PointerState | None:
        path = self.root / kind / f"{name}.json"
        try:
            return PointerState(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"{kind} {name} pointer unreadable ({exc})") from None

    @overload
    def version_at(self, kind: Kind, name: Pointer = "current", default: None = None) -> str | None: ...
    @overload
    def version_at(self, kind: Kind, name: Pointer = "current", *, default: str) -> str: ...
    def version_at(self, kind: Kind, name: Pointer = "current", default: str | None = None) -> str | None:
        """The version ``name`` points at, else ``default`` (the base a deployment serves before any version)."""
        state = self.pointer(kind, name)
        return state.version if state is not None else default

    def set_pointer(self, kind: Kind, name: Pointer, version: str, reason: str | None = None) -> PointerState:
        """Point ``name`` at a verified ``version``; the replaced version goes into the pointer's history."""
        self.verify(kind, version)
        old = self.pointer(kind, name)
        history = [*old.history, old.version] if old is not None and old.version != version else (old.history if old else [])
        state = PointerState(version, time.time(), history[-50:], reason)
        _write_json(self.root / kind / f"{name}.json", asdict(state))
        return state

    def clear_pointer(self, kind: Kind, name: Pointer) -> None:
        (self.root / kind / f"{name}.json").unlink(missing_ok=True)

    def promote(self, kind: Kind, reason: str = "promoted") -> PointerState:
        """The canary becomes current (and the canary pointer is cleared)."""
        canary = self.pointer(kind, "canary")
        if canary is None:
            raise RegistryError(f"no {kind} canary to promote")
        state = self.set_pointer(kind, "current", canary.version, reason)
        self.clear_pointer(kind, "canary")
        return state

    def rollback(self, kind: Kind, reason: str = "rolled back") -> PointerState | None:
        """Drop the canary if there is one; otherwise point current back at the version it replaced.

        Returns the current pointer afterwards."""
        if self.pointer(kind, "canary") is not None:
            self.clear_pointer(kind, "canary")
            return self.pointer(kind, "current")
        current = self.pointer(kind, "current")
        if current is None or not current.history:
            raise RegistryError(f"no earlier {kind} version to roll back to")
        target = current.history[-1]
        self.verify(kind, target)
        state = PointerState(target, time.time(), current.history[:-1], reason)
        _write_json(self.root / kind / "current.json", asdict(state))
        return state

    def retain(self, kind: Kind, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions, never one a pointer (or its last step back) names."""
        pinned = set()
        names: tuple[Pointer, ...] = ("current", "canary")
        for name in names:
            state = self.pointer(kind, name)
            if state is not None:
                pinned.add(state.version)
                pinned.update(state.history[-1:])
        versions = [m.version for m in self.versions(kind)]
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in pinned]
        for version in doomed:
            trash = self.versions_dir(kind) / f".tmp-{uuid.uuid4().hex}"
            self.path(kind, version).rename(trash)  # out of sight first, then removed
            shutil.rmtree(trash, ignore_errors=True)
        for stale in self.versions_dir(kind).glob(".tmp-*"):  # unfinished publishes of crashed rounds
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        return doomed


def _number(version: str) -> int:
    match = _VERSION.match(version)
    assert match is not None
    return int(match.group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write-then-rename with fsync: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
