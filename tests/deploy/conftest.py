"""The deployment checks' tools: Debian's promtool and prometheus unpacked under .tools by `make test`,
kubectl 1.27 or newer from the machine, hadolint and kubernetes-validate from the dev dependencies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
_UNPACKED = ROOT / ".tools" / "root" / "usr" / "bin"


def tool(name: str) -> str:
    """The path of a deployment tool; fails (never skips) the test where it is missing."""
    for candidate in (_UNPACKED / name, Path(sys.executable).parent / name):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `make test` unpacks Debian's prometheus under .tools; kubectl is the machine's")
    return found
