"""Fixtures shared by the test suite; the helpers themselves live in tests/helpers.py."""

from __future__ import annotations

import pytest

from florist.lora import ClientUpdate
from tests.helpers import make_updates


@pytest.fixture
def hetero_updates() -> list[ClientUpdate]:
    """Four clients with ranks 8, 4, 2, 4 and unequal sizes."""
    return make_updates([8, 4, 2, 4])
