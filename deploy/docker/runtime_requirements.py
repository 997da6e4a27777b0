"""Print what a serving install needs: pyproject's runtime dependencies at the lock file's versions, with
the CPU build of ONNX Runtime (`cpu`) or the GPU build and its CUDA and cuDNN packages (`gpu`). No torch,
no train extra. The Dockerfiles install from it, and tests/deploy/test_images.py proves a virtualenv
holding only this serves a stream.

    python deploy/docker/runtime_requirements.py cpu > runtime.txt
    pip install -c requirements/lock.txt -r runtime.txt && pip install --no-deps .
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(flavour: str, root: Path = ROOT) -> list[str]:
    """The pinned requirement lines for `flavour` (cpu or gpu)."""
    if flavour not in ("cpu", "gpu"):
        raise ValueError(f"flavour must be cpu or gpu, not {flavour!r}")
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (root / "requirements" / "lock.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    lines = []
    for requirement in declared:
        name = _name(requirement)
        if name.startswith("onnxruntime"):
            continue  # chosen below, by flavour
        extras = re.match(r"^[^\[\s<>=!~;]+(\[[^\]]*\])?", requirement)
        lines.append(f"{name}{(extras.group(1) or '') if extras else ''}=={pins[name]}")
    runtime = "onnxruntime" if flavour == "cpu" else "onnxruntime-gpu[cuda,cudnn]"
    lines.append(f"{runtime}=={pins['onnxruntime-gpu']}")
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
