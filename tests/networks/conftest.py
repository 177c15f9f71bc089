"""Fixtures for the LoRA network tests."""

from __future__ import annotations

import pytest
from lora_helpers import QWEN, ZIMAGE, ArchCase


@pytest.fixture(params=[QWEN, ZIMAGE], ids=lambda c: c.name)
def arch(request) -> ArchCase:
    return request.param
