"""A real PostgreSQL server for the tests, started from Debian's ``postgresql`` binaries.

``make test`` installs the package when it is missing (a missing server is an install
step, not a skipped test). As root, the server runs as the ``postgres`` user (PostgreSQL
refuses to run as root). ``stop``/``start`` let the crash tests take the database away.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.vllm_process import free_port


def _bindir() -> Path:
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if versions:
        return Path(versions[-1])
    found = shutil.which("initdb")
    if found is None:
        raise RuntimeError("PostgreSQL is not installed: run `make test` (it installs Debian's postgresql package)")
    return Path(found).parent


@dataclass
class Postgres:
    root: Path
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://bon@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(args), check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-A", "trust", "-U", "bon", "-E", "UTF8", "--no-sync"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-o", options, "-l", str(self.root / "log"), "-w", "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash: connections are cut, nothing is flushed politely."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop")


def start_postgres() -> Postgres:
    root = Path(tempfile.mkdtemp(prefix="bon-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = Postgres(root, free_port(), _bindir())
    server.init()
    server.start()
    return server


def remove(server: Postgres) -> None:
    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
        server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
