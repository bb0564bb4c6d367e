"""The images' Dockerfiles (docker/): they cannot be built or pulled here, so they are read.

Checks that each is multi-stage and ends as an unprivileged user, installs the project from
``pyproject.toml`` with an extra that exists there, copies every package the project declares
(and only paths that exist, never models or data), and that the commands the images and the
manifests run are modules of the project (or vLLM's server) that parse their arguments.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.k8s.kustomize import containers, pod_specs, render

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"": ROOT / "docker" / "Dockerfile", "-cuda": ROOT / "docker" / "Dockerfile.cuda"}
"""Image tag suffix -> the Dockerfile that builds it (bon:<version><suffix>)."""
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("suffix", DOCKERFILES)
def test_multi_stage_unprivileged_and_installed_from_pyproject(suffix: str) -> None:
    steps = instructions(DOCKERFILES[suffix])
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: the build tools stay in the first stage"
    final = steps[stages[-1] :]
    users = [args for op, args in final if op == "USER"]
    assert users, "the final stage names its user"
    assert users[-1] not in ("0", "root"), "the final stage runs as an unprivileged user"
    assert any(op == "COPY" and args.startswith("--from=") for op, args in final)
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    extras = set(re.findall(r'pip install "\.\[([a-z,]+)\]"', " ".join(installs)))
    assert extras == {"gpu" if suffix else "cpu"}
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])


@pytest.mark.parametrize("suffix", DOCKERFILES)
def test_copies_every_package_and_nothing_that_is_not_there(suffix: str) -> None:
    steps = instructions(DOCKERFILES[suffix])
    copied: set[str] = set()
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from="):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.split("/")[0] not in {"models", "data", "registry", "runs"}, "no models or data in images"
                copied.add(source.rstrip("/"))
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    assert "pyproject.toml" in copied


@pytest.mark.parametrize("suffix", DOCKERFILES)
def test_the_default_command_is_the_gateway(suffix: str) -> None:
    from gateway.__main__ import _parser

    (cmd,) = [args for op, args in instructions(DOCKERFILES[suffix]) if op == "CMD"]
    argv = json.loads(cmd)  # the exec form is a JSON array
    assert argv[:3] == ["python", "-m", "gateway"]
    assert _parser().parse_args(argv[3:]).command == "serve"


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_every_image_a_manifest_runs_is_built_here_and_its_commands_exist(overlay: str) -> None:
    version = PYPROJECT["project"]["version"]
    for name, pod in pod_specs(render(overlay)):
        for container in containers(pod):
            image = container["image"]
            if image.startswith("postgres:"):
                continue  # dev's database: the official image
            repository, tag = image.split(":")
            assert repository == "bon", f"{name}: {image}"
            assert tag.removeprefix(version) in DOCKERFILES, f"{name}: {image} (no Dockerfile builds it)"
            command = container["command"]
            if command[:2] == ["accelerate", "launch"]:  # the gpu overlay's rounds: a dependency's console script
                assert any(d.startswith("accelerate") for d in PYPROJECT["project"]["dependencies"])
                command = ["python", *command[command.index("-m") :]]
            if command[:2] == ["python", "-m"]:
                module = command[2]
                if module.startswith("vllm."):
                    assert module == "vllm.entrypoints.openai.api_server"
                else:
                    assert (ROOT / module / "__main__.py").is_file(), f"{name}: python -m {module}"
            else:
                assert command[:2] == ["sh", "-c"], f"{name}: {command}"
