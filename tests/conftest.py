"""Fixtures for the unit tests: the session-wide cache of tiny models and exports (tests/fixtures.py)."""

import pytest


@pytest.fixture(scope="session")
def workshop(tmp_path_factory):
    """Tiny model folders and exported artifact folders, made once per session."""
    from tests.fixtures import workshop_for  # lazily: it needs torch, the runtime's tests do not

    return workshop_for(tmp_path_factory)
