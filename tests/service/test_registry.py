"""The model registry: lookups by name and version, and by a session's fingerprint within its model."""

from __future__ import annotations

import dataclasses

from service.models import ModelRegistry, load_version
from service.settings import RuntimeSettings
from tests.conftest import TEST_REPO


def _charlm():
    return load_version(TEST_REPO / "charlm" / "1", RuntimeSettings())


def test_a_fingerprint_is_looked_up_within_its_model():
    charlm = _charlm()
    twin = dataclasses.replace(charlm, manifest=charlm.manifest.model_copy(update={"name": "twin"}))
    registry = ModelRegistry([charlm, twin])
    assert registry.by_fingerprint("charlm", charlm.fingerprint) is charlm
    assert registry.by_fingerprint("twin", charlm.fingerprint) is twin
    assert registry.by_fingerprint("other", charlm.fingerprint) is None
    registry.remove(charlm)
    assert registry.by_fingerprint("charlm", charlm.fingerprint) is None
    assert registry.by_fingerprint("twin", charlm.fingerprint) is twin


def test_a_version_added_again_replaces_the_loaded_one_everywhere():
    first = _charlm()
    again = dataclasses.replace(first)
    registry = ModelRegistry([first])
    registry.add(again)
    assert registry.find("charlm", 1) is again and registry.get("charlm") is again
    assert registry.by_fingerprint("charlm", first.fingerprint) is again
    registry.remove(again)
    assert len(registry) == 0 and registry.by_fingerprint("charlm", first.fingerprint) is None
