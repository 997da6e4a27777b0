"""The container images: their Dockerfiles pass hadolint, copy what exists, and the serving install they
make (runtime dependencies only: no torch, no train extra) starts and answers a stream. No Docker engine
is needed: the install is made in a fresh virtualenv exactly as the CPU image's build stage makes it."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.process import free_port
from service.client import StepReply, StreamClient
from tests.conftest import shipped_versions
from tests.deploy.conftest import DEPLOY, ROOT, tool

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


def test_there_is_an_image_for_cpu_nodes_and_one_for_gpu_nodes() -> None:
    assert [path.name for path in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_image_is_multi_stage_non_root_pinned_and_checks_its_health(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert len(bases) == 1 and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[0]), bases  # a pinned base
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r'^HEALTHCHECK .*\n.*"rnnserve", .*"health"', text, re.M)
    assert "torch" not in re.sub(r"#.*", "", text)  # only in comments, saying there is none
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, re.M):
        if not source.startswith("$"):
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"service", "bench", "export", "models", "requirements", "deploy"} & set(ignored)


@pytest.mark.timeout(600)
def test_the_serving_install_has_no_torch_and_answers_a_stream(tmp_path: Path) -> None:
    """What the CPU image's build stage runs, in a fresh virtualenv: the runtime requirements, then
    rnnserve without its dependencies, from a copy of what the image copies."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements", "service", "bench", "export", "deploy"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    for cache in source.rglob("__pycache__"):
        shutil.rmtree(cache)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip", "-q"]
    runtime = subprocess.run(
        [python, "deploy/docker/runtime_requirements.py", "cpu"], cwd=source, capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "runtime.txt").write_text(runtime)
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [*pip, "install", "-c", "requirements/lock.txt", "-r", str(tmp_path / "runtime.txt")],
        cwd=source,
        check=True,
        env=env,
    )
    subprocess.run([*pip, "install", "--no-deps", "."], cwd=source, check=True, env=env)
    for absent in ("torch", "onnx", "matplotlib", "safetensors"):
        probe = subprocess.run([python, "-c", f"import {absent}"], capture_output=True, check=False)
        assert probe.returncode != 0, f"{absent} is installed in the serving install"
    providers = subprocess.run(
        [python, "-c", "import onnxruntime; print(onnxruntime.get_available_providers())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CUDAExecutionProvider" not in providers  # the CPU build of ONNX Runtime

    port = free_port()
    rnnserve = str(venv / "bin" / "rnnserve")
    server = subprocess.Popen(
        [
            rnnserve,
            "serve",
            "--model-repo",
            str(ROOT / "models"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "none",
        ],
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [rnnserve, "health", "--target", f"127.0.0.1:{port}", "--timeout", "1"],
                capture_output=True,
                check=False,
            ).returncode
            != 0
        ):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.2)
        replies = asyncio.run(_stream(f"127.0.0.1:{port}"))
        assert [reply.seq for reply in replies] == [1, 2, 3]
        assert all(np.isfinite(reply.outputs["logits"]).all() for reply in replies)
    finally:
        server.terminate()
        assert server.wait(30) == 0


async def _stream(target: str) -> list[StepReply]:
    x = np.zeros((1, 84), np.float32)
    x[0, 5] = 1
    async with StreamClient(target) as client:
        session = client.session("charlm-lstm", version=shipped_versions("charlm-lstm", "fp32")[-1])
        return [await session.step(x) for _ in range(3)]
