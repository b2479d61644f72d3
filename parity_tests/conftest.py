"""Fixtures for the parity tests: every artifact against the PyTorch reference.

Tiny random models (exporter/tiny.py) exported once per session and shared by every test
(tests/fixtures.py's Workshop, also used by the unit tests, so one run exports each only once).
"""

import pytest


@pytest.fixture(scope="session")
def workshop(tmp_path_factory):
    """Tiny model folders, exported artifact folders and float32 references, made once."""
    from tests.fixtures import workshop_for  # lazily: needs torch and transformers

    return workshop_for(tmp_path_factory)
